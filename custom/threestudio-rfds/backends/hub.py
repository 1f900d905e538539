"""Where a model comes from, decided before ``from_pretrained`` starts: a local folder, the local
Hugging Face cache or the hub.  Errors arrive in seconds instead of after the hub client's
retries: a path-like name that is no folder, offline mode without the files in the cache, or a
hub that does not answer (one probe per process and endpoint, :data:`PROBE_TIMEOUT` seconds)."""
from __future__ import annotations

import functools
import os
import urllib.error
import urllib.request
from typing import Optional

PROBE_TIMEOUT = 3.0  # seconds the hub may take to answer one HEAD request
PATH_PREFIXES = ("./", "../", "/", "~", ".\\", "..\\")


class ModelLoadError(OSError):
    """A model folder or hub repository could not be loaded."""


def looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a folder: it starts with ./ ../ / ~, has more than one "/"
    (hub ids are "name" or "org/name"), uses the OS separator where that is not "/", or its
    first part is an existing folder (``models/tiny-sd`` beside a ``models`` folder)."""
    if name in (".", "..") or name.startswith(PATH_PREFIXES):
        return True
    if os.sep != "/" and os.sep in name:
        return True
    parts = name.split("/")
    return len(parts) > 2 or (len(parts) == 2 and os.path.isdir(parts[0]))


def offline(local_files_only: Optional[bool]) -> bool:
    """``local_files_only=True`` or HF_HUB_OFFLINE set (as the hub client reads it at import)."""
    from huggingface_hub import constants

    return bool(local_files_only) or bool(constants.HF_HUB_OFFLINE)


def cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def in_local_cache(repo_id: str) -> bool:
    """Whether the hub cache holds a snapshot of model ``repo_id``."""
    from huggingface_hub.file_download import repo_folder_name

    snapshots = os.path.join(cache_dir(), repo_folder_name(repo_id=repo_id, repo_type="model"), "snapshots")
    return os.path.isdir(snapshots) and bool(os.listdir(snapshots))


@functools.lru_cache(maxsize=None)
def unreachable(endpoint: str, timeout: float = PROBE_TIMEOUT) -> Optional[str]:
    """None when ``endpoint`` answers HTTP (any status), else why it does not."""
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # it answered
    except (urllib.error.URLError, OSError, ValueError) as e:
        return str(getattr(e, "reason", e))
    return None


def ways_out(repo_id: str) -> str:
    return (f"either pass a local folder that holds the model, or download it where there is internet with "
            f"`hf download {repo_id}` (gated models such as SD3: `hf auth login` and accept the licence first) "
            "and load it offline with local_files_only=True or HF_HUB_OFFLINE=1")


def resolve_source(path: str, local_files_only: Optional[bool]) -> Optional[bool]:
    """Check ``path`` before loading; returns the ``local_files_only`` to pass on (True when the
    hub does not answer but the cache has the model, so the client does not retry)."""
    if os.path.isdir(path):
        return local_files_only
    if looks_like_path(path):
        raise ModelLoadError(f"model folder {path!r} does not exist ({os.path.abspath(os.path.expanduser(path))}); "
                             "pass an existing folder, or a hub id such as 'org/name'")
    if offline(local_files_only):
        if in_local_cache(path):
            return local_files_only
        raise ModelLoadError(f"{path!r} is not in the local Hugging Face cache ({cache_dir()}) and offline mode is "
                             f"on (HF_HUB_OFFLINE=1 or local_files_only=True): run `hf download {path}` on a machine "
                             "with internet (gated models such as SD3: `hf auth login` first), or pass a local folder")
    from huggingface_hub import constants

    why = unreachable(constants.ENDPOINT)
    if why is None:
        return local_files_only
    if in_local_cache(path):
        return True
    raise ModelLoadError(f"no network ({constants.ENDPOINT} does not answer: {why}) and {path!r} is not in the local "
                         f"cache ({cache_dir()}); {ways_out(path)}")
