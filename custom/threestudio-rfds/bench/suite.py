"""Benchmark suites: YAML data naming prompts, seeds, plugin configs and overrides (docs/tools.md).

    name: default                      # required, [A-Za-z0-9_.-]
    description: free text             # optional
    configs:                           # required, >= 1: a path or {path, label, overrides}
      - custom/threestudio-rfds/configs/rfds-sd3.yaml
      - {path: custom/threestudio-rfds/configs/rfds-instaflow.yaml, label: instaflow, overrides: [trainer.max_steps=3000]}
    seeds: [0, 1]                      # optional, default [0]; distinct integers >= 0
    overrides: [trainer.max_steps=5000]  # optional, key=value for every run
    prompts: [...]                     # required, >= 1 distinct non-empty strings (whitespace normalised)
    slurm: {partition: gpu, time_min: 240, sbatch: {qos: high}}  # optional, --executor slurm defaults

A run is one (config, prompt, seed); its id ``<label>/<prompt-slug>/s<seed>`` names its folder.
This module is data only: it imports nothing else of bench/ but the errors and the ``slurm:`` options.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

import yaml

from .errors import SuiteError
from .options import OPTION_KEYS, SlurmOptions

SUITE_KEYS = {"name", "description", "configs", "seeds", "overrides", "prompts", "slurm"}
CONFIG_KEYS = {"path", "label", "overrides"}
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*=.*$")
RESERVED_OVERRIDES = ("system.prompt_processor.prompt", "seed", "exp_root_dir", "name", "tag", "use_timestamp")


@dataclass(frozen=True)
class ConfigEntry:
    path: str
    label: str
    overrides: List[str] = field(default_factory=list)


@dataclass(frozen=True)
class Run:
    """One threestudio launch."""

    config: ConfigEntry
    prompt: str
    prompt_index: int
    seed: int

    @property
    def slug(self) -> str:
        """Slug plus a short hash of the prompt: stable when prompts are added or reordered."""
        return f"{slugify(self.prompt)}-{hashlib.sha1(self.prompt.encode()).hexdigest()[:6]}"

    @property
    def run_id(self) -> str:
        return f"{self.config.label}/{self.slug}/s{self.seed}"


@dataclass
class Suite:
    name: str
    prompts: List[str]
    configs: List[ConfigEntry]
    seeds: List[int] = field(default_factory=lambda: [0])
    overrides: List[str] = field(default_factory=list)
    description: str = ""
    source: Optional[str] = None
    slurm: Dict[str, Any] = field(default_factory=dict)

    def runs(self) -> List[Run]:
        """All runs, config-major (one config's runs share warm caches), then prompt, then seed."""
        return [Run(c, p, i, s) for c in self.configs for i, p in enumerate(self.prompts) for s in self.seeds]

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["configs"] = [asdict(c) for c in self.configs]
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Suite":
        d = dict(d)
        d["configs"] = [ConfigEntry(**c) for c in d["configs"]]
        return cls(**d)


def normalize_prompt(text: str) -> str:
    """Surrounding whitespace stripped, inner runs of whitespace collapsed to one space."""
    return " ".join(text.split())


def slugify(text: str, max_len: int = 48) -> str:
    """Lower-case ASCII slug for file names: runs of other characters become '_'."""
    s = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:max_len].strip("_")
    return s or "prompt"


def _fail(where: str, msg: str) -> None:
    raise SuiteError(f"{where}: {msg}")


def check_overrides(where: str, value: Any) -> List[str]:
    """``value`` as a list of OmegaConf ``key=value`` overrides a suite may set (SuiteError otherwise)."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(o, str) for o in value):
        _fail(where, f"overrides must be a list of 'key=value' strings, got {value!r}")
    for o in value:
        if not _OVERRIDE.match(o):
            _fail(where, f"override {o!r} is not of the form key=value (OmegaConf dotlist)")
        key, val = o.split("=", 1)
        if not val.strip():  # OmegaConf would make it None, and the launch fail late or run with a default
            _fail(where, f"override {o!r} has no value; give key=value (key='' for an empty string)")
        if key in RESERVED_OVERRIDES:
            _fail(where, f"override {o!r} sets {key!r}, which the runner sets itself ({', '.join(RESERVED_OVERRIDES)})")
    return list(value)


def parse_suite(data: Any, where: str = "suite") -> Suite:
    """Validate a loaded YAML mapping and build a :class:`Suite` (raises :class:`SuiteError`)."""
    if not isinstance(data, dict):
        _fail(where, f"a suite must be a mapping with keys {sorted(SUITE_KEYS)}, got {type(data).__name__}")
    unknown = set(data) - SUITE_KEYS
    if unknown:
        _fail(where, f"unknown keys {sorted(unknown)}; allowed keys are {sorted(SUITE_KEYS)}")
    name = data.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        _fail(where, f"'name' must be a string of letters, digits, '_', '.', '-', got {name!r}")

    prompts = data.get("prompts")
    if not prompts:
        _fail(where, "'prompts' is missing or empty; give a list of at least one prompt")
    if not isinstance(prompts, list):
        _fail(where, f"'prompts' must be a list of strings, got {type(prompts).__name__}")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            _fail(where, f"prompt #{i} must be a non-empty string, got {p!r}")
        if "${" in p:
            _fail(where, f"prompt #{i} {p!r} contains '${{', which OmegaConf would interpolate")
    prompts = [normalize_prompt(p) for p in prompts]
    dup = sorted({p for p in prompts if prompts.count(p) > 1})
    if dup:
        _fail(where, f"duplicate prompts {dup} (compared after normalising whitespace)")
    first: Dict[str, str] = {}
    for p in prompts:  # CLIP lower-cases text: R-precision could not tell such prompts apart
        other = first.setdefault(p.lower(), p)
        if other != p:
            _fail(where, f"prompts {other!r} and {p!r} differ only in letter case: the scorer (CLIP) tokenises "
                         "them identically, so R-precision cannot tell them apart; keep one")

    seeds = data.get("seeds", [0])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if not isinstance(seeds, list) or not seeds:
        _fail(where, f"'seeds' must be a non-empty list of integers >= 0, got {seeds!r}")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0 or s >= 2**32:
            _fail(where, f"seed {s!r} is not an integer in [0, 2**32); 'seeds' must be integers >= 0")
    if len(set(seeds)) != len(seeds):
        _fail(where, f"'seeds' has duplicates: {seeds}")

    configs_raw = data.get("configs")
    if not configs_raw or not isinstance(configs_raw, list):
        _fail(where, "'configs' is missing or empty; list at least one threestudio config path")
    configs: List[ConfigEntry] = []
    for i, c in enumerate(configs_raw):
        cw = f"{where}: configs[{i}]"
        if isinstance(c, str):
            c = {"path": c}
        if not isinstance(c, dict):
            _fail(cw, f"must be a path or a mapping with keys {sorted(CONFIG_KEYS)}, got {c!r}")
        unknown = set(c) - CONFIG_KEYS
        if unknown:
            raise SuiteError(f"{cw}: unknown keys {sorted(unknown)}; allowed keys are {sorted(CONFIG_KEYS)}")
        path = c.get("path")
        if not isinstance(path, str) or not path.endswith((".yaml", ".yml")):
            raise SuiteError(f"{cw}: 'path' must be a .yaml config path, got {path!r}")
        label = c.get("label") or os.path.splitext(os.path.basename(path))[0]
        if not isinstance(label, str) or not _NAME.match(label):
            raise SuiteError(f"{cw}: 'label' must be letters, digits, '_', '.', '-', got {label!r}")
        configs.append(ConfigEntry(path, label, check_overrides(cw, c.get("overrides"))))
    labels = [c.label for c in configs]
    if len(set(labels)) != len(labels):
        _fail(where, f"config labels must be unique (set 'label' to tell them apart), got {labels}")

    desc = data.get("description", "")
    if not isinstance(desc, str):
        _fail(where, f"'description' must be a string, got {desc!r}")
    slurm = data.get("slurm") or {}
    if not isinstance(slurm, dict):
        _fail(where, f"'slurm' must be a mapping of executor options, got {slurm!r}")
    unknown = set(slurm) - OPTION_KEYS
    if unknown:
        _fail(where, f"slurm: unknown keys {sorted(unknown)}; allowed keys are {sorted(OPTION_KEYS)}")
    try:
        SlurmOptions(**slurm)
    except SuiteError as e:
        _fail(where, str(e))
    return Suite(name, prompts, configs, list(seeds), check_overrides(where, data.get("overrides")), desc,
                 slurm=dict(slurm))


def suite_search_dirs() -> List[str]:
    """Where a bare suite name is looked up: $RFDS_BENCH_SUITES, the repository's configs/ (for a
    source checkout or editable install), then ./configs."""
    here = os.path.dirname(os.path.realpath(__file__))
    dirs = [d for d in os.environ.get("RFDS_BENCH_SUITES", "").split(os.pathsep) if d]
    dirs += [os.path.normpath(os.path.join(here, "..", "..", "..", "configs")), os.path.abspath("configs")]
    return list(dict.fromkeys(dirs))


def find_suite(name_or_path: str) -> str:
    """A YAML path (relative to the current folder first, then to the repository holding configs/),
    or a bare suite name (``default``) looked up in :func:`suite_search_dirs`."""
    if os.path.isfile(name_or_path):
        return name_or_path
    looked = [os.path.abspath(name_or_path)]
    if name_or_path.endswith((".yaml", ".yml")):
        if not os.path.isabs(name_or_path):
            for d in suite_search_dirs():
                for p in (os.path.join(os.path.dirname(d), name_or_path), os.path.join(d, name_or_path)):
                    if os.path.isfile(p):
                        return p
                    looked.append(p)
        raise SuiteError(f"suite file {name_or_path!r} not found; looked at {list(dict.fromkeys(looked))}")
    for d in suite_search_dirs():
        p = os.path.join(d, name_or_path + ".yaml")
        if os.path.isfile(p):
            return p
    raise SuiteError(
        f"suite {name_or_path!r} not found: not a file, and no {name_or_path}.yaml in {suite_search_dirs()}"
    )


def load_suite(name_or_path: str) -> Suite:
    path = find_suite(name_or_path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise SuiteError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}); save it as UTF-8") from None
    except OSError as e:
        raise SuiteError(f"{path}: cannot read: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SuiteError(f"{path}: not valid YAML: {e}") from e
    suite = parse_suite(data, where=path)
    suite.source = os.path.abspath(path)
    return suite

