"""The layout tells the architecture (issue 11), and keeps telling it.

Read from the source (every ``import``, function-level ones included):
no import cycle; the rules (``core/``) import nothing of the I/O layers; the
formats import no tool, daemon or CLI; the tools never import click; a
connection never imports the server (its handler is injected); and every
module under ``src/`` is reachable from an entry point (nothing exists only
for tests).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
ENTRY_POINTS = {
    "tidstorage",               # the front door (wrap, TIDStorage, __version__)
    "tidstorage.__main__",      # python -m tidstorage
    "tidstorage.cli",           # the console script
    "tidstorage.zodb.zconfig",  # %import tidstorage (component.xml)
    "tidstorage.demo.workload", # run by the demo as python -m
}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in (SRC / "tidstorage").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _imports(mod: str, path: Path) -> set[str]:
    """Modules of the package that ``mod`` imports (anywhere in it)."""
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            names = [name] + [f"{name}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        found.update(n for n in names if n in MODULES and n != mod)
    return found


GRAPH = {mod: _imports(mod, path) for mod, path in MODULES.items()}


def _cycles() -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    assert _cycles() == []


def _layer(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


@pytest.mark.parametrize("layer, allowed", [
    ("core", {"core", "errors"}),
    ("formats", {"core", "formats", "errors", "config"}),
    ("zodb", {"core", "zodb", "errors", "config", "daemon"}),
    ("daemon", {"core", "formats", "errors", "config", "daemon"}),
    ("tools", {"core", "formats", "errors", "config", "daemon", "tools"}),
])
def test_layers_import_only_what_they_stand_on(layer, allowed):
    wrong = {mod: sorted(d for d in deps if _layer(d) not in allowed)
             for mod, deps in GRAPH.items() if _layer(mod) == layer}
    assert {m: d for m, d in wrong.items() if d} == {}


def test_the_tools_never_import_click():
    for mod, path in MODULES.items():
        if _layer(mod) == "tools":
            tree = ast.parse(path.read_text())
            names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
            assert not {n for n in names if n and n.split(".")[0] in {"click", "rich"}}, mod


def test_a_connection_gets_its_handler_injected():
    assert "tidstorage.daemon.server" not in GRAPH["tidstorage.daemon.connection"]


def test_every_module_is_reachable_from_an_entry_point():
    seen: set[str] = set()
    todo = [m for m in ENTRY_POINTS if m in MODULES]
    assert len(todo) == len(ENTRY_POINTS)
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        todo.extend(GRAPH[mod])
        # importing a module imports its packages
        todo.extend(p for p in (mod.rsplit(".", k)[0] for k in range(1, mod.count(".") + 1))
                    if p in MODULES)
    assert sorted(set(MODULES) - seen) == []


def test_the_readme_layout_table_names_every_module():
    readme = (SRC.parent / "README.md").read_text()
    table = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    missing = []
    for mod, path in MODULES.items():
        parts = mod.split(".")
        if len(parts) == 3 and path.name != "__init__.py":  # tidstorage.<folder>.<module>
            if f"`{path.name}`" not in table:
                missing.append(mod)
        elif len(parts) == 2 and path.parent.name == "tidstorage" and path.name not in (
                "__main__.py", "errors.py"):
            if f"`{path.name}`" not in table and f"`{parts[1]}/`" not in table:
                missing.append(mod)
    assert missing == []
