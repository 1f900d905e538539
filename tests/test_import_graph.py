"""Imports inside the package run one way (data → mechanisms → orchestration): no module reaches
itself through the modules it imports.  Read from the source (ast), so a function-level import
counts too; a package's ``__init__`` counts as the package."""
import ast
import os

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "custom", "threestudio-rfds")


def modules():
    """{dotted name relative to the package ('' = the package): file}."""
    out = {}
    for dirpath, _dirs, files in os.walk(PKG):
        if "__pycache__" in dirpath or "configs" in dirpath:
            continue
        rel = os.path.relpath(dirpath, PKG)
        base = [] if rel == "." else rel.split(os.sep)
        for f in files:
            if f.endswith(".py"):
                name = base if f == "__init__.py" else base + [f[:-3]]
                out[".".join(name)] = os.path.join(dirpath, f)
    return out


def imports(name: str, path: str, known) -> set:
    """The package modules ``name`` imports (relative imports only)."""
    package = name.split(".") if path.endswith("__init__.py") else name.split(".")[:-1]
    package = [p for p in package if p]
    found = set()
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if not (isinstance(node, ast.ImportFrom) and node.level):
            continue
        base = package[: len(package) - (node.level - 1)]
        target = base + (node.module.split(".") if node.module else [])
        for alias in node.names:  # `from . import x` may name a submodule
            sub = ".".join(target + [alias.name])
            found.add(sub if sub in known else ".".join(target))
    return {m for m in found if m in known and m != name}


def test_the_package_has_no_import_cycle():
    mods = modules()
    graph = {m: imports(m, p, mods) for m, p in mods.items()}
    done, path = set(), []

    def visit(m):
        assert m not in path, "import cycle: " + " → ".join(path[path.index(m):] + [m])
        if m in done:
            return
        path.append(m)
        for d in sorted(graph[m]):
            visit(d)
        path.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)
