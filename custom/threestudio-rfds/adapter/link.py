"""Make this package a threestudio extension (the mechanism behind ``rfds-link``, whose command
line is :mod:`.link_cli`).

Symlinks the installed package folder to ``<threestudio>/custom/threestudio-rfds`` (where
threestudio's ``launch.py`` loads extensions) after checking the threestudio checkout, its
version (>= 0.2.0, read from the source without importing it) and the versions of the
libraries the adapter needs.  ``--check`` changes nothing and prints the full environment table
of :mod:`.envcheck` (exit status 1 on any problem; ``--for training`` also counts what stops
``launch.py --train``: no GPU, CUDA extensions, the link); ``--force`` replaces an existing link.
"""
from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from importlib import metadata
from typing import List, Optional

from packaging.version import Version

from .compat import MIN_THREESTUDIO_VERSION, ThreestudioVersionError, check_threestudio_version

EXTENSION_NAME = "threestudio-rfds"
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIN_VERSIONS = {"diffusers": "0.29", "transformers": "4.41", "torch": "2.1"}  # SD3 support in diffusers 0.29


class LinkError(RuntimeError):
    """The threestudio checkout or the environment is not usable; the message says why."""


def threestudio_version(root: str) -> str:
    """``__version__`` of the threestudio checkout at ``root`` (parsed, not imported)."""
    init = os.path.join(root, "threestudio", "__init__.py")
    if not os.path.isfile(os.path.join(root, "launch.py")) or not os.path.isfile(init):
        raise LinkError(f"{root!r} is not a threestudio checkout (expected launch.py and threestudio/__init__.py)")
    with open(init, encoding="utf-8") as f:
        m = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", f.read(), re.M)
    if m is None:
        raise LinkError(f"{init} defines no __version__: threestudio is older than {MIN_THREESTUDIO_VERSION}; git pull it")
    return m.group(1)


def check_versions(root: str) -> List[str]:
    """Lines describing the versions found; raises :class:`LinkError` on a version too old."""
    found = threestudio_version(root)
    try:
        check_threestudio_version(found)
    except ThreestudioVersionError as e:
        raise LinkError(f"{e} (checkout at {root})") from e
    lines = [f"threestudio {found} (>= {MIN_THREESTUDIO_VERSION}) at {root}"]
    for dist, minimum in MIN_VERSIONS.items():
        try:
            have = metadata.version(dist)
        except metadata.PackageNotFoundError as e:
            raise LinkError(f"{dist} is not installed (threestudio-rfds needs >= {minimum})") from e
        if Version(have.split("+")[0]) < Version(minimum):
            raise LinkError(f"{dist} {have} is too old: threestudio-rfds needs >= {minimum}")
        lines.append(f"{dist} {have} (>= {minimum})")
    return lines


@dataclass(frozen=True)
class LinkState:
    """What ``<root>/custom/threestudio-rfds`` is now, and a command that makes it this package."""

    kind: str  # "linked", "absent", "broken", "other" (a link elsewhere), "copy" (a folder), "file"
    detail: str
    fix: Optional[str]  # None when linked

    @property
    def needs_force(self) -> bool:
        return self.kind in ("broken", "other")


def _version_of(folder: str) -> Optional[str]:
    try:
        with open(os.path.join(folder, "version.py"), encoding="utf-8") as f:
            m = re.search(r"""__version__\s*=\s*["']([^"']+)["']""", f.read())
    except OSError:
        return None
    return m.group(1) if m else None


def link_state(root: str, source: str = PACKAGE_DIR) -> LinkState:
    """The extension folder's state; each ``fix`` is a command that works from that state
    (``rfds-link`` never deletes a folder, so a copy is moved aside first: launch.py skips
    folders whose names end in ``_disabled``)."""
    target = os.path.join(root, "custom", EXTENSION_NAME)
    q = shlex.quote
    if os.path.realpath(target) == os.path.realpath(source) and os.path.exists(target):
        return LinkState("linked", f"{target} -> {source}", None)
    if os.path.islink(target):
        kind = "other" if os.path.exists(target) else "broken"
        what = "links to" if kind == "other" else "is a broken link to"
        return LinkState(kind, f"{target} {what} {os.readlink(target)}, not this package ({source})",
                         f"rfds-link {q(root)} --force")
    if not os.path.exists(target):
        return LinkState("absent", f"not linked yet ({target} does not exist)", f"rfds-link {q(root)}")
    aside = f"mv {q(target)} {q(target + '_disabled')} && rfds-link {q(root)}"
    if os.path.isdir(target):
        theirs, ours = _version_of(target), _version_of(source)
        versions = "" if theirs is None else f", version {theirs} (this package: {ours})"
        return LinkState("copy", f"{target} is a copy{versions}, not a link: launch.py loads that copy, not this "
                                 f"package ({source})", aside)
    return LinkState("file", f"{target} is a file, not this package", aside)


def link(root: str, force: bool = False, source: str = PACKAGE_DIR) -> str:
    """Create ``<root>/custom/threestudio-rfds`` → ``source``; returns the link path.  An existing
    link elsewhere (or a broken one) is replaced only with ``force``; a folder or file never."""
    threestudio_version(root)  # a checkout, or LinkError
    custom = os.path.join(root, "custom")
    os.makedirs(custom, exist_ok=True)  # git keeps no empty folder: fresh clones lack custom/
    target = os.path.join(custom, EXTENSION_NAME)
    state = link_state(root, source)
    if state.kind == "linked":
        return target
    if state.kind in ("copy", "file"):
        raise LinkError(f"{state.detail}; it is never deleted here: {state.fix} (nothing was changed)")
    if state.needs_force:
        if not force:
            raise LinkError(f"{state.detail}; pass --force to replace the link: {state.fix}")
        os.remove(target)
    os.symlink(source, target, target_is_directory=True)
    return target


def link_problem(root: str, force: bool = False) -> Optional[str]:
    """Why :func:`link` would fail at ``root`` (without changing anything), or None: another link
    without ``force``, a folder or file in the way, or no write access where the link goes."""
    state = link_state(root)
    if state.kind == "linked":
        return None
    if state.kind in ("copy", "file") or (state.needs_force and not force):
        return f"{state.detail}; first: {state.fix}"
    custom = os.path.join(root, "custom")
    where = custom if os.path.isdir(custom) else root
    if not os.access(where, os.W_OK):
        return f"{where} is not writable (a read-only checkout?): the link goes in {custom}; make it writable"
    return None
