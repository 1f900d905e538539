"""The launch of one run: its threestudio command line, the definition that fixes what it computes (and
its digest), and the preflight that tries the imports a launch does first.

Each launch is ``<python> memwrap.py <stats> launch.py --config C --train --gpu G
system.prompt_processor.prompt='P' seed=S exp_root_dir=OUT/runs name=<label> tag=<tag> use_timestamp=false
<suite overrides> <config overrides> <--override ...>`` with cwd = the threestudio checkout.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
from typing import Any, Dict, List, Mapping, Optional

from .errors import SuiteError
from .logs import error_line
from .paths import RunPaths
from .suite import Run, Suite

MEMWRAP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "memwrap.py")
# what launch.py imports before it loads extensions; threestudio's own __init__ imports tinycudann
PREFLIGHT = "import threestudio"


def yaml_quote(value: str) -> str:
    """A YAML single-quoted scalar, so OmegaConf's dotlist parser keeps the value a plain string
    (a prompt such as ``a cat: cute`` or ``[draft] vase`` would otherwise parse as a mapping/list)."""
    return "'" + value.replace("'", "''") + "'"


def resolve_config(path: str, threestudio: str, suite: Suite) -> str:
    """An absolute config path: as given, else relative to the threestudio checkout, else to the
    repository holding the suite file (its parent's parent), else to the current directory."""
    if os.path.isabs(path):
        candidates = [path]
    else:
        candidates = [os.path.join(threestudio, path)]
        if suite.source:
            candidates.append(os.path.join(os.path.dirname(os.path.dirname(suite.source)), path))
        candidates.append(os.path.abspath(path))
    for c in candidates:
        if os.path.isfile(c):
            return os.path.abspath(c)
    raise SuiteError(f"config {path!r} not found; looked at {candidates}")


def file_sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def run_definition(run: Run, suite: Suite, config_sha: str, extra_overrides: List[str]) -> Dict[str, Any]:
    """What a run computes, independent of where it runs: config (label, path, content hash), prompt,
    seed, and every override in the order launch.py gets them."""
    return {"config": run.config.label, "config_path": run.config.path, "config_sha": config_sha,
            "prompt": run.prompt, "seed": run.seed,
            "overrides": [*suite.overrides, *run.config.overrides, *extra_overrides]}


def digest(definition: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()[:16]


def build_command(run: Run, paths: RunPaths, config: str, overrides: List[str], out_dir: str, threestudio: str,
                  python: str, gpu: str = "0") -> List[str]:
    """The argv of one attempt (``config``: the resolved config file, ``overrides``: the definition's)."""
    return [
        python, MEMWRAP, paths.stats, os.path.join(threestudio, "launch.py"),
        "--config", config, "--train", "--gpu", gpu,
        f"system.prompt_processor.prompt={yaml_quote(run.prompt)}",
        f"seed={run.seed}",
        f"exp_root_dir={yaml_quote(os.path.join(os.path.abspath(out_dir), 'runs'))}",
        f"name={run.config.label}",
        f"tag={paths.tag}",
        "use_timestamp=false",
        *overrides,
    ]


def preflight(python: str, threestudio: str, env: Optional[Mapping[str, str]] = None,
              timeout: float = 300.0) -> Optional[str]:
    """Run ``import threestudio`` as launch.py would (``python``, cwd = the checkout, the launches'
    environment); None if it works, else the line that says why (``ModuleNotFoundError: …``)."""
    try:
        p = subprocess.run([python, "-c", PREFLIGHT], cwd=threestudio, env=dict(env or os.environ),
                           capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return f"it did not finish within {timeout:g} s"
    except OSError as e:
        return f"{python} did not start: {e.strerror}"
    if p.returncode == 0:
        return None
    return error_line(p.stderr) or f"exit code {p.returncode}"
