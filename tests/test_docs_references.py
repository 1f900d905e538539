"""docs/*.md name the functions that implement each equation: every such name must exist."""
import importlib
import re
from pathlib import Path

import pytest

DOCS = sorted((Path(__file__).resolve().parents[1] / "docs").glob("*.md"))
MODULES = ("flow", "rfds", "protocol", "analytic", "checks", "backends", "text", "tools", "bench", "adapter", "splats",
           "steptime")
# `flow.interpolate`, `rfds.rfds_rev`, `backends.sd3.SD3Backend`, "— rfds.irfds_update", FlowConvention.to_velocity
NAME = re.compile(r"(?:`|— )((?:%s)(?:\.[A-Za-z_][A-Za-z0-9_]*)+)" % "|".join(MODULES + ("FlowConvention",)))


def references():
    refs = set()
    for doc in DOCS:
        for name in NAME.findall(doc.read_text()):
            if not name.endswith((".py", ".md", ".yaml")):
                refs.add((doc.name, name))
    return sorted(refs)


def resolve(name: str):
    parts = name.split(".")
    if parts[0] == "FlowConvention":
        parts = ["flow"] + parts
    for i in range(len(parts), 0, -1):  # longest importable module prefix, then attributes
        try:
            obj = importlib.import_module("threestudio_rfds." + ".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(name)


def test_docs_name_some_functions():
    assert len(references()) >= 30


@pytest.mark.parametrize("doc,name", references())
def test_referenced_name_exists(doc, name):
    if name.startswith("adapter"):
        pytest.importorskip("threestudio", reason="the adapter imports threestudio")
    assert resolve(name) is not None, f"{doc} names {name}, which does not exist"
