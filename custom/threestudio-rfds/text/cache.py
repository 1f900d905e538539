"""On-disk cache of prompt embeddings: one safetensors file per (model, prompt, options, dtype).

    key  = sha256(json(spec + prompt))            → <cache_dir>/<key>.safetensors
    file = tensors of one prompt + metadata {"spec": json, "sha256": digest of the tensor bytes}

Writes go to a temporary file in the same directory and are published with ``os.replace``
(atomic), so a reader never sees a half-written file.  A truncated or corrupt file (unreadable,
wrong spec, checksum mismatch) counts as a miss and is recomputed, and so does an entry whose
shapes or dtypes differ from what the model produces (``expect``).  Computing the misses holds
a directory-wide ``filelock``, so concurrent runs sharing a directory encode each prompt once
and never load several copies of a large text encoder at the same time.

Sharing: entries and the lock are created with the permissions of the user's umask (``umask
002`` and a group-writable folder let a group share one cache).  A cache that cannot be written
(full disk, read-only folder, unreadable entry) never costs the computed embeddings: they are
returned and one warning line is logged (logger ``threestudio_rfds``).

Limit: a local model is fingerprinted by (file, size, mtime) of its text-encoder and tokenizer
files (:func:`model_fingerprint`, as git's index does), not by hashing the weights; weights
replaced by files of the same sizes and mtimes are served the old embeddings.  Clear the cache
after such a swap: ``rm -rf <cache_dir>`` (docs/tools.md, "Guarantees").
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import struct
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..atomic import atomic_write

Embeddings = Dict[str, Tensor]
Expect = Dict[str, Tuple[Sequence[Optional[int]], str]]  # name → (per-prompt shape, None = any size; dtype)
LOCK_NAME = ".lock"
log = logging.getLogger("threestudio_rfds")


def mismatch(tensors: Embeddings, expect: Optional[Expect]) -> Optional[str]:
    """Why one prompt's tensors do not match ``expect`` (names, shapes, dtypes), or None."""
    if expect is None:
        return None
    if set(tensors) != set(expect):
        return f"tensors {sorted(tensors)}, expected {sorted(expect)}"
    for k, (shape, dtype) in expect.items():
        t = tensors[k]
        if str(t.dtype) != dtype or t.ndim != len(shape) or any(e is not None and e != n for e, n in zip(shape, t.shape)):
            return f"{k!r} is {str(t.dtype)} {tuple(t.shape)}, expected {dtype} {tuple(shape)}"
    return None


def cache_key(spec: dict, prompt: str) -> str:
    """sha256 of the canonical JSON of the spec and the prompt."""
    blob = json.dumps({"spec": spec, "prompt": prompt}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def tensors_digest(tensors: Embeddings) -> str:
    """sha256 over names, dtypes, shapes and raw bytes (bf16 included)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself: no copy of a large tensor
    return h.hexdigest()


def model_fingerprint(path: str, prefixes=("text_encoder", "tokenizer")) -> Optional[list]:
    """For a local folder: (file, size, mtime) of its text encoder/tokenizer files, so that a
    rebuilt model invalidates the cache; None for a hub id (its revision is in the spec)."""
    if not os.path.isdir(path):
        return None
    rows = []
    for sub in sorted(os.listdir(path)):
        if sub.startswith(prefixes) and os.path.isdir(os.path.join(path, sub)):
            for name in sorted(os.listdir(os.path.join(path, sub))):
                st = os.stat(os.path.join(path, sub, name))
                rows.append([f"{sub}/{name}", st.st_size, st.st_mtime_ns])
    return rows


class EmbeddingCache:
    """A directory of per-prompt embedding files (see the module docstring)."""

    def __init__(self, cache_dir: str, lock_timeout: float = 1800.0):
        self.dir = os.path.abspath(os.path.expanduser(cache_dir))
        self.lock_timeout = lock_timeout
        self.usable = True
        try:
            os.makedirs(self.dir, exist_ok=True)
        except OSError as e:  # e.g. a full disk or a read-only parent: work uncached
            log.warning(f"embedding cache: cannot create {self.dir} ({e.strerror}); embeddings are computed uncached")
            self.usable = False

    def path(self, key: str) -> str:
        return os.path.join(self.dir, key + ".safetensors")

    def load(self, spec: dict, prompt: str) -> Optional[Embeddings]:
        """The cached tensors, or None if absent, unreadable, for another spec or corrupt.

        The file is read once into memory and header and tensors are parsed from that one
        snapshot: ``safetensors.safe_open`` may open the path again for the tensors, and a
        concurrent ``os.replace`` would then pair one file's metadata with another's tensors."""
        from safetensors.torch import load as load_bytes

        try:
            with open(self.path(cache_key(spec, prompt)), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        except OSError as e:  # e.g. another user's entry without read permission: recompute it
            log.warning(f"embedding cache: cannot read {e.filename} ({e.strerror}); recomputing")
            return None
        try:
            (n,) = struct.unpack("<Q", data[:8])
            meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
            tensors = load_bytes(data)
        except Exception:  # truncated/corrupt file: struct, json and safetensors raise their own types
            return None
        entry = json.dumps({"spec": spec, "prompt": prompt}, sort_keys=True, default=str)
        if meta.get("entry") != entry or meta.get("sha256") != tensors_digest(tensors):
            return None
        return tensors

    def save(self, spec: dict, prompt: str, tensors: Embeddings) -> str:
        """Write atomically: temporary file in the cache directory, fsync, os.replace."""
        from safetensors import SafetensorError
        from safetensors.torch import save_file

        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        meta = {"entry": json.dumps({"spec": spec, "prompt": prompt}, sort_keys=True, default=str),
                "sha256": tensors_digest(tensors)}
        def write(tmp: str) -> None:
            try:
                save_file(tensors, tmp, metadata=meta)
            except SafetensorError as e:  # how safetensors reports I/O errors (a full disk): an OSError here
                raise OSError(f"{e} writing {tmp}") from e

        return atomic_write(self.path(cache_key(spec, prompt)), write)

    def load_valid(self, spec: dict, prompt: str, expect: Optional[Expect]) -> Optional[Embeddings]:
        """:meth:`load`, and None (with a warning) for an entry that ``expect`` rejects."""
        tensors = self.load(spec, prompt)
        why = None if tensors is None else mismatch(tensors, expect)
        if why is not None:
            log.warning(f"embedding cache: entry for {prompt!r} in {self.dir} has {why}; recomputing")
            return None
        return tensors

    @contextlib.contextmanager
    def _lock(self):
        """The directory lock; without it (read-only folder) the misses are computed unlocked."""
        from filelock import FileLock, Timeout

        try:
            lock = FileLock(os.path.join(self.dir, LOCK_NAME), timeout=self.lock_timeout)
            lock.acquire()
        except Timeout as e:
            raise TimeoutError(f"embedding cache {self.dir}: could not take {LOCK_NAME} within "
                               f"{self.lock_timeout}s (another run is encoding into this directory)") from e
        except OSError as e:
            log.warning(f"embedding cache: cannot lock {self.dir} ({e.strerror}); encoding without the cache lock")
            yield
            return
        try:
            yield
        finally:
            lock.release()

    def _store(self, spec: dict, rows: Dict[str, Embeddings]) -> None:
        """Save computed rows; a failed write (full disk, permissions) is one warning, not an error."""
        failed = []
        for p, row in rows.items():
            try:
                self.save(spec, p, row)
            except OSError as e:
                failed.append(e)
        if failed:
            e = failed[0]
            log.warning(f"embedding cache: could not store {len(failed)} of {len(rows)} new entries in {self.dir} "
                        f"({e.strerror or e}); the computed embeddings are used uncached")

    def get_or_compute(
        self, spec: dict, prompts: List[str], compute: Callable[[List[str]], Embeddings],
        expect: Optional[Expect] = None,
    ) -> Embeddings:
        """Embeddings [N, ...] for ``prompts``; ``compute(missing)`` encodes the misses in one batch.

        Entries that do not match ``expect`` (what the model produces) are recomputed; without
        ``expect``, the computed rows (or else the first prompt's entry) set the shapes the others
        must share."""
        if not self.usable:
            batch = compute(list(dict.fromkeys(prompts)))
            index = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
            return {k: v[[index[p] for p in prompts]] for k, v in batch.items()}
        found = {p: self.load_valid(spec, p, expect) for p in dict.fromkeys(prompts)}
        missing = [p for p, v in found.items() if v is None]
        if missing:
            with self._lock():
                for p in missing:  # another process may have written them meanwhile
                    found[p] = self.load_valid(spec, p, expect)
                missing = [p for p in missing if found[p] is None]
                if missing:
                    batch = compute(missing)
                    rows = {p: {k: v[i].detach().cpu() for k, v in batch.items()} for i, p in enumerate(missing)}
                    self._store(spec, rows)
                    found.update(rows)
        # the model's own rows are the reference; with none computed, ``expect`` or the first entry
        ref = _signature(found[missing[0]]) if missing else expect or _signature(found[prompts[0]])
        odd = [p for p, v in found.items() if mismatch(v, ref)]
        if odd and not missing and expect is None:
            odd = list(found)  # entries disagree and no model row says which are right: recompute all
        if odd:
            log.warning(f"embedding cache: {len(odd)} entries in {self.dir} differ in shape/dtype from the "
                        f"model's output; recomputing them")
            batch = compute(odd)
            rows = {p: {k: v[i].detach().cpu() for k, v in batch.items()} for i, p in enumerate(odd)}
            self._store(spec, rows)
            found.update(rows)
        keys = list(found[prompts[0]])
        return {k: torch.stack([found[p][k] for p in prompts]) for k in keys}


def _signature(tensors: Embeddings) -> Expect:
    return {k: (tuple(v.shape), str(v.dtype)) for k, v in tensors.items()}


__all__ = ["EmbeddingCache", "cache_key", "tensors_digest", "model_fingerprint", "mismatch"]
