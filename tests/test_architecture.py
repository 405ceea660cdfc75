"""The package's shape: no import cycle, and a configuration package that stands alone."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "creditrl"


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the creditrl modules it names in an import statement anywhere in its file (module level,
    inside functions, under TYPE_CHECKING alike); `from creditrl.a import b` names creditrl.a.b when b is a
    module, else creditrl.a."""
    modules = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        named = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                named |= {known(alias.name) for alias in node.names if alias.name.startswith("creditrl")}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parents = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parents + ([base] if base else []))
                if base.startswith("creditrl"):
                    named |= {known(f"{base}.{alias.name}") if f"{base}.{alias.name}" in modules else known(base)
                              for alias in node.names}
        graph[module] = named - {None, module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_planted_cycle(tmp_path):
    package = tmp_path / "creditrl"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from creditrl.sub import b\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "b.py").write_text("def f():\n    from creditrl import c\n")
    (package / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import creditrl.a\n")
    graph = import_graph(package)
    assert graph["creditrl.a"] == {"creditrl.sub.b"} and graph["creditrl.sub.b"] == {"creditrl.c"}
    assert cycles(graph) == [["creditrl.a", "creditrl.c", "creditrl.sub.b"]]


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_config_package_is_a_leaf():
    graph = import_graph()
    def inside(module: str) -> bool:
        return module == "creditrl.config" or module.startswith("creditrl.config.")

    outside = {m: sorted(d for d in deps if not inside(d)) for m, deps in graph.items() if inside(m)}
    assert len(outside) >= 4
    assert all(not deps for deps in outside.values()), outside


def test_importing_the_config_loads_no_torch():
    code = "import creditrl.config, sys; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
