"""CLIP similarity and CLIP R-precision of a benchmark's test renders (docs/tools.md).

For a render I (one test view) of a run with prompt p, among the suite's prompts P:

    s(I, q)      = cos(E_img(I), E_txt(q))                    (CLIP embeddings, L2-normalised)
    CLIP score   = 100 · max(s(I, p), 0)                       (torchmetrics' CLIPScore convention)
    R-precision  = 1[argmax_q∈P s(I, q) = p]                   (R = 1, DreamFusion / T3Bench style)

Both are reported per view and averaged over the views of a run.  Prompts that the scorer's tokenizer
turns into the same tokens (CLIP lower-cases and truncates to 77 tokens) have identical text embeddings:
they are one class for R-precision (a hit on either counts), and the scorer says so.  R-precision is only
informative with several classes: with one it is 1 by construction (flagged in the output).
Preprocessing (no torchvision): keep the first panel of threestudio's test grid (rgb | normal |
opacity, square panels), bicubic resize of the short side, centre crop, CLIP normalisation — the
sizes and statistics come from the model's ``preprocessor_config.json`` when it has one.
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from ..atomic import write_json
from ..backends.base import resolve_device
from .paths import local_path
from .results import Results, read_suite_file

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PANELS = ("first-square", "full")


class Preprocessor:
    """Resize shortest side → centre crop → (x/255 − mean)/std, as CLIPImageProcessor does."""

    def __init__(self, size: int, crop: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
        self.size, self.crop = int(size), int(crop)
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)

    @classmethod
    def from_pretrained(cls, path: str, model_image_size: int) -> "Preprocessor":
        from transformers.utils import cached_file

        cfg_file = None
        try:
            cfg_file = cached_file(path, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
        except OSError:
            cfg_file = None
        if not cfg_file:
            return cls(model_image_size, model_image_size)
        with open(cfg_file) as f:
            cfg = json.load(f)
        size = cfg.get("size", model_image_size)
        if isinstance(size, dict):
            size = size.get("shortest_edge") or min(size.get("height", model_image_size), size.get("width", model_image_size))
        crop = cfg.get("crop_size", size)
        if isinstance(crop, dict):
            crop = min(crop.get("height", size), crop.get("width", size))
        return cls(size, crop, cfg.get("image_mean", CLIP_MEAN), cfg.get("image_std", CLIP_STD))

    def __call__(self, img: Image.Image) -> np.ndarray:
        img = img.convert("RGB")
        w, h = img.size
        s = self.size / min(w, h)
        nw, nh = max(self.crop, round(w * s)), max(self.crop, round(h * s))
        img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - self.crop) // 2, (nh - self.crop) // 2
        img = img.crop((left, top, left + self.crop, top + self.crop))
        x = np.asarray(img, np.float32) / 255.0
        return ((x - self.mean) / self.std).transpose(2, 0, 1)


def load_render(path: str, panel: str = "first-square") -> Image.Image:
    """A test render; ``first-square`` keeps the leftmost H×H panel of a wider grid image."""
    if panel not in PANELS:
        raise ValueError(f"panel must be one of {list(PANELS)}, got {panel!r}")
    with Image.open(path) as im:
        img = im.convert("RGB")  # decodes now: a truncated file fails here
    w, h = img.size
    if panel == "first-square" and w > h:
        img = img.crop((0, 0, h, h))
    return img


def pick_views(n: int, max_views: Optional[int]) -> List[int]:
    """All indices, or ``max_views`` evenly spaced ones (around the orbit)."""
    if not max_views or max_views >= n:
        return list(range(n))
    if max_views < 1:
        raise ValueError(f"max_views must be >= 1, got {max_views}")
    return sorted({int(round(i * n / max_views)) % n for i in range(max_views)})


@contextlib.contextmanager
def _quiet_hub():
    """transformers / huggingface_hub log retries and warnings while failing offline: keep errors only."""
    import logging

    from transformers.utils import logging as tlog

    old_t, hub = tlog.get_verbosity(), logging.getLogger("huggingface_hub")
    old_h = hub.level
    bars = tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    hub.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        tlog.set_verbosity(old_t)
        if bars:
            tlog.enable_progress_bar()
        hub.setLevel(old_h)


class ClipScorer:
    def __init__(self, model: str = DEFAULT_CLIP, device: str = "auto", batch_size: int = 32):
        from transformers import AutoTokenizer, CLIPModel

        self.device = resolve_device(device)
        if model.startswith(("/", ".", "~")) and not os.path.isdir(os.path.expanduser(model)):
            raise OSError(f"cannot load CLIP model {model!r}: no such folder; pass --clip-model with a local "
                          f"folder or a hub id such as {DEFAULT_CLIP}")
        try:
            with _quiet_hub():
                self.model = CLIPModel.from_pretrained(model).to(self.device).eval()
                self.tokenizer = AutoTokenizer.from_pretrained(model)
        except OSError as e:
            first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
            raise OSError(
                f"cannot load CLIP model {model!r} ({first[:200]}); pass --clip-model with a local folder, "
                f"or download it first with `hf download {model}`"
            ) from None
        self.preprocess = Preprocessor.from_pretrained(model, self.model.config.vision_config.image_size)
        self.batch_size = batch_size
        self.name = model

    @property
    def max_length(self) -> int:
        return getattr(self.model.config.text_config, "max_position_embeddings", 77)

    def prompt_classes(self, prompts: Sequence[str]) -> List[int]:
        """For each prompt, the index of the first prompt the tokenizer turns into the same tokens."""
        ids = self.tokenizer(list(prompts), truncation=True, max_length=self.max_length)["input_ids"]
        first: Dict[tuple, int] = {}
        return [first.setdefault(tuple(t), i) for i, t in enumerate(ids)]

    @torch.no_grad()
    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        tok = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        out = self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                           attention_mask=tok["attention_mask"].to(self.device))
        out = getattr(out, "pooler_output", out)
        return torch.nn.functional.normalize(out.float(), dim=-1)

    @torch.no_grad()
    def image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        feats = []
        for i in range(0, len(images), self.batch_size):
            x = torch.from_numpy(np.stack([self.preprocess(im) for im in images[i:i + self.batch_size]]))
            out = self.model.get_image_features(pixel_values=x.to(self.device, next(self.model.parameters()).dtype))
            feats.append(getattr(out, "pooler_output", out).float())
        return torch.nn.functional.normalize(torch.cat(feats), dim=-1)


def score_views(sims: torch.Tensor, true_index: int, classes: Optional[Sequence[int]] = None) -> List[Dict[str, float]]:
    """Per-view metrics from cosine similarities ``sims`` [V, P] against all prompts; ``classes[p]``
    (default: each prompt its own) says which prompts R-precision counts as the same."""
    classes = list(range(sims.shape[1])) if classes is None else list(classes)
    top = sims.argmax(dim=1)
    return [
        {"cosine": float(sims[v, true_index]), "clip_score": 100.0 * max(float(sims[v, true_index]), 0.0),
         "top1": int(top[v]), "r_precision": float(classes[int(top[v])] == classes[true_index])}
        for v in range(sims.shape[0])
    ]


def score_results(out_dir: str, scorer: ClipScorer, *, panel: str = "first-square",
                  max_views: Optional[int] = None, log=print) -> Dict[str, object]:
    """Score every finished run of the suite's current revision; writes and returns ``scores.json``."""
    if panel not in PANELS:
        raise ValueError(f"panel must be one of {list(PANELS)}, got {panel!r}")
    suite = read_suite_file(out_dir)
    prompts: List[str] = suite["prompts"]
    digests = suite.get("digests", {})
    classes = scorer.prompt_classes(prompts)
    merged = [[p for p, c in zip(prompts, classes) if c == k] for k in sorted(set(classes))]
    for group in (g for g in merged if len(g) > 1):
        log(f"prompts {group} tokenise identically for {scorer.name} (truncated to {scorer.max_length} tokens, "
            "lower-cased): R-precision scores them as one class")
    text = scorer.text_features(prompts)
    runs: Dict[str, object] = {}
    for rid, rec in sorted(Results(out_dir).states().items()):
        if rec["status"] == "missing":
            log(f"skipping {rid}: {rec['missing']}")
            continue
        if rec["status"] != "done" or not rec.get("renders"):
            continue
        if rec.get("digest") and digests.get(rid) and rec["digest"] != digests[rid]:
            log(f"skipping {rid}: done with the settings of an earlier revision of the suite")
            continue
        if rec["prompt"] not in prompts:
            log(f"skipping {rid}: its prompt is not in suite.json")
            continue
        idx = pick_views(len(rec["renders"]), max_views)
        renders_dir = local_path(out_dir, rec["renders_dir"])
        files, images, bad = [], [], []
        for i in idx:
            f = os.path.join(renders_dir, rec["renders"][i])
            try:
                images.append(load_render(f, panel))
                files.append(f)
            except (OSError, SyntaxError, ValueError) as e:  # missing, truncated, not an image
                bad.append((f, e))
        if bad:
            f, e = bad[0]
            log(f"{rid}: skipping {len(bad)} unreadable render(s) of {len(idx)}, e.g. "
                f"{os.path.relpath(f, out_dir)}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        if not images:
            log(f"skipping {rid}: no readable render")
            continue
        sims = scorer.image_features(images) @ text.T
        views = score_views(sims.cpu(), prompts.index(rec["prompt"]), classes)
        for v, f in zip(views, files):
            v["file"] = os.path.relpath(f, out_dir)
        cs = np.array([v["clip_score"] for v in views])
        runs[rid] = {"prompt": rec["prompt"], "config": rec["config"], "seed": rec["seed"], "n_views": len(views),
                     "n_unreadable": len(bad),
                     "clip_score": float(cs.mean()), "clip_score_std": float(cs.std()),
                     "r_precision": float(np.mean([v["r_precision"] for v in views])), "views": views}
        log(f"{rid}: CLIP score {cs.mean():.2f}, R-precision {runs[rid]['r_precision']:.3f} over {len(views)} views")
    result = {"clip_model": scorer.name, "panel": panel, "max_views": max_views, "prompts": prompts,
              "prompt_classes": classes, "r_precision_informative": len(set(classes)) > 1, "runs": runs}
    write_json(os.path.join(out_dir, "scores.json"), result, sort_keys=True)
    return result
