"""threestudio's ``requirements.txt`` split into what ``rfds-setup`` installs and what it skips
or replaces (by :data:`.envset.REQUIREMENT_POLICY`), each with the reason."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import List, Optional, Tuple

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from .envset import REQUIREMENT_POLICY

URL_NAMES = {"tiny-cuda-nn": "tinycudann"}  # git repository name → the distribution it builds


@dataclass(frozen=True)
class Decision:
    line: str  # the requirements.txt entry
    install: Optional[str]  # what to install instead (None: skipped)
    reason: str  # empty: installed as it is


def requirement_name(line: str) -> str:
    """Canonical distribution name of one entry (git URLs: the repository name)."""
    if line.startswith("git+") or "://" in line:
        path = re.sub(r"[#@].*$", "", line.split("://", 1)[1].rstrip("/"))
        repo = path.rstrip("/").split("/")[-1]
        repo = repo[:-4] if repo.endswith(".git") else repo
        return canonicalize_name(URL_NAMES.get(repo.lower(), repo))
    return canonicalize_name(Requirement(line).name)


def read_requirements(path: str) -> List[str]:
    """The entries of a requirements file (comments, blank lines and options dropped)."""
    with open(path, encoding="utf-8") as f:
        lines = [ln.split(" #", 1)[0].strip() for ln in f]
    return [ln for ln in lines if ln and not ln.startswith(("#", "-"))]


def decide(line: str) -> Decision:
    """Install ``line`` as it is, replace it by the known-good pin, or skip it."""
    policy = {canonicalize_name(k): v for k, v in REQUIREMENT_POLICY.items()}
    try:
        name = requirement_name(line)
    except InvalidRequirement as e:
        return Decision(line, None, f"not a requirement pip understands here ({e})")
    if name in policy:
        pin, reason = policy[name]
        return Decision(line, pin, reason)
    if line.startswith("git+") or "://" in line:
        return Decision(line, None, f"a URL (needs GitHub); install it yourself if you need it: pip install {line}")
    return Decision(line, line, "")


def plan_requirements(root: str) -> Tuple[List[Decision], List[str]]:
    """(decisions for every entry of ``<root>/requirements.txt``, the entries to install)."""
    path = os.path.join(root, "requirements.txt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: is {root!r} a threestudio checkout?")
    decisions = [decide(line) for line in read_requirements(path)]
    return decisions, [d.install for d in decisions if d.install]
