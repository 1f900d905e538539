"""bench/ imports run one way: the suite as data → the launch command and trial paths → the executors →
the runner and the tools on top (bench/__init__.py lists the layers).  Read from the source (ast), so a
function-level import counts too."""
import ast
import os

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "custom", "threestudio-rfds", "bench")
LAYERS = [
    {"errors", "options", "suite"},                                                         # the suite as data
    {"paths", "command", "ledger", "results", "logs", "owner", "procs", "memwrap"},        # launch, trial paths, records
    {"scheduler", "executors", "slurm"},                                                    # executors
    {"runner", "status", "score", "report", "cli", "measure_fanout"},                       # on top
]
LAYER = {m: i for i, mods in enumerate(LAYERS) for m in mods}


def bench_imports(module: str):
    """The bench/ modules ``module`` imports (relative imports: ``from .x import``, ``from . import x``)."""
    with open(os.path.join(BENCH, module + ".py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            out |= {node.module} if node.module else {a.name for a in node.names}
    return out


def test_every_module_has_a_layer():
    mods = {f[:-3] for f in os.listdir(BENCH) if f.endswith(".py") and f != "__init__.py"}
    assert mods == set(LAYER), f"unplaced: {mods - set(LAYER)}, gone: {set(LAYER) - mods}"


@pytest.mark.parametrize("module", sorted(LAYER))
def test_imports_only_from_below(module):
    for dep in bench_imports(module):
        assert LAYER[dep] < LAYER[module] or (LAYER[dep] == LAYER[module] and dep != module), (module, dep)


def test_no_import_cycle():
    graph = {m: bench_imports(m) for m in LAYER}
    done, path = set(), []

    def visit(m):
        assert m not in path, " → ".join(path + [m])
        if m in done:
            return
        path.append(m)
        for d in graph[m]:
            visit(d)
        path.pop()
        done.add(m)

    for m in graph:
        visit(m)
