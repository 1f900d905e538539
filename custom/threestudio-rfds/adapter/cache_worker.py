"""Prompt encoding into threestudio's on-disk embedding cache, run in threestudio's ``spawn``
subprocess.  Kept free of threestudio imports so that the child process starts quickly, and
importable as ``threestudio_rfds.adapter.cache_worker`` (never through the ``custom/`` folder
name, which the child could not import).

Cache layout (threestudio's): ``<cache_dir>/<md5(f"{model}-{prompt}")>.pt`` holding, per prompt,
the tensor ``encoder_hidden_states[i]`` (CLIP/InstaFlow, as threestudio's own processor) or the
dict ``{"prompt_embeds": [L, D], "pooled_prompt_embeds": [P]}`` (SD3).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from functools import partial
from typing import Callable, Dict, List, Optional

import torch

from ..atomic import atomic_write


def threestudio_prompt_hash(model: str, prompt: str) -> str:
    """threestudio's ``hash_prompt``: md5 of ``f"{model}-{prompt}"``."""
    return hashlib.md5(f"{model}-{prompt}".encode()).hexdigest()


def options_tag(family: str, options: Dict) -> str:
    """Subfolder name for one encoder setting (options change the embeddings, not the file name)."""
    blob = json.dumps({"family": family, **options}, sort_keys=True, default=str)
    return f"rfds-{family}-{hashlib.sha1(blob.encode()).hexdigest()[:10]}"


def encode_to_threestudio_cache(
    family: str, options: Dict, pretrained_model_name_or_path: str, prompts: List[str], cache_dir: str
) -> None:
    """Encode ``prompts`` with :func:`threestudio_rfds.text.encode_prompts` and save one file per
    prompt where threestudio's ``PromptProcessor.load_from_cache`` looks for it."""
    from ..text import encode_prompts

    options = dict(options)
    device, dtype = options.pop("device", "auto"), options.pop("dtype", "auto")
    emb = encode_prompts(family, pretrained_model_name_or_path, list(prompts), device=device, dtype=dtype, **options)
    os.makedirs(cache_dir, exist_ok=True)
    for i, prompt in enumerate(prompts):
        item = {k: v[i].detach().cpu().clone() for k, v in emb.items()}
        obj = item["encoder_hidden_states"] if family == "instaflow" else item
        path = os.path.join(cache_dir, f"{threestudio_prompt_hash(pretrained_model_name_or_path, prompt)}.pt")
        atomic_write(path, partial(torch.save, obj))


def spawn_target(family: str, options: Dict, error_file: Optional[str] = None) -> Callable[[str, List[str], str], None]:
    """A picklable ``spawn_func(model, prompts, cache_dir)`` bound to one encoder setting; with
    ``error_file`` a failure also writes "Type: message" there for the parent to report."""
    ensure_importable_by_name()
    if error_file is None:
        return partial(encode_to_threestudio_cache, family, dict(options))
    return partial(_encode_reporting, error_file, family, dict(options))


def _encode_reporting(error_file: str, family: str, options: Dict, *args) -> None:
    try:
        encode_to_threestudio_cache(family, options, *args)
    except BaseException as e:
        with open(error_file, "w", encoding="utf-8") as f:
            f.write(f"{type(e).__name__}: {e}")
        raise


def new_error_file() -> str:
    """An empty file the spawned child writes its error into."""
    fd, path = tempfile.mkstemp(prefix="rfds-prompt-error-", suffix=".txt")
    os.close(fd)
    return path


def child_error(error_file: str) -> str:
    """The child's recorded error, or what is known when it recorded none; removes the file."""
    try:
        with open(error_file, encoding="utf-8") as f:
            text = f.read().strip()
        os.remove(error_file)
    except OSError:
        text = ""
    return text or "the child recorded no error (killed from outside, e.g. out of memory?)"


PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _findable_by_name() -> bool:
    """Whether a fresh interpreter with this sys.path finds this folder as ``threestudio_rfds``."""
    for finder in sys.meta_path:
        try:
            spec = finder.find_spec("threestudio_rfds", None)
        except (AttributeError, ImportError, ValueError, TypeError):
            continue
        if spec is not None and spec.origin:
            return os.path.realpath(os.path.dirname(spec.origin)) == os.path.realpath(PACKAGE_DIR)
    return False


def ensure_importable_by_name() -> None:
    """Let spawned children ``import threestudio_rfds`` when this process loaded the package
    from its ``custom/threestudio-rfds`` folder by file path (no ``pip install``): a link named
    ``threestudio_rfds`` in a temporary folder, appended to sys.path (which children inherit)."""
    if _findable_by_name():
        return
    root = os.path.join(tempfile.gettempdir(), "threestudio-rfds-" + hashlib.sha1(PACKAGE_DIR.encode()).hexdigest()[:10])
    os.makedirs(root, exist_ok=True)
    link = os.path.join(root, "threestudio_rfds")
    try:
        os.symlink(PACKAGE_DIR, link, target_is_directory=True)
    except FileExistsError:
        pass
    if root not in sys.path:
        sys.path.append(root)
