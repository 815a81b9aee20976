"""The layers of docs/architecture.md, checked on the source: who may import whom, and no import cycles.

Every `import` and `from ... import` in flux2_lora/ counts, at module level or inside a function (a lazy import is
still a dependency). `from .pkg import name` depends on `pkg.name` when that is a module, else on `pkg`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "flux2_lora"

# Bottom to top; a module may import its own layer and the ones below it, never one above.
LAYERS = {
    "foundation": ["errors", "resources", "references", "config", "recipe", "sources"],
    "core": ["model", "flow", "quant", "memory", "swap", "sampling", "plots", "checkpoint", "distributed",
             "callbacks", "safety", "data", "draws", "ema"],
    "runs": ["train", "optim", "run_files", "train_checkpoint", "train_validation", "evaluate", "interop", "launch",
             "tune", "system"],
    "app": ["ui"],
    "commands": ["commands", "cli", "__main__"],
}  # fmt: skip
ORDER = list(LAYERS)


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the flux2_lora modules it imports."""
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    where = ".".join(base + ([node.module] if node.module else []))
                else:
                    where = node.module or ""
                targets = [f"{where}.{a.name}" if f"{where}.{a.name}" in mods else where for a in node.names]
            graph[name] |= {t for t in targets if t in mods and t != name}
    return graph


def layer(module: str) -> str:
    top = module.split(".")[1] if "." in module else ""
    top = top or "__init__"
    for name, members in LAYERS.items():
        if top in members:
            return name
    return "foundation" if top == "__init__" else "unknown"


GRAPH = imports(modules())


def test_every_module_has_a_layer() -> None:
    assert [m for m in GRAPH if layer(m) == "unknown"] == [], "add new modules to LAYERS and docs/architecture.md"


def test_no_module_below_the_command_layer_imports_the_cli() -> None:
    wrong = sorted(
        f"{m} imports {t}"
        for m, targets in GRAPH.items()
        if layer(m) != "commands"
        for t in targets
        if layer(t) == "commands"
    )
    assert wrong == []


def test_no_layer_imports_one_above_it() -> None:
    wrong = sorted(
        f"{m} ({layer(m)}) imports {t} ({layer(t)})"
        for m, targets in GRAPH.items()
        for t in targets
        if ORDER.index(layer(t)) > ORDER.index(layer(m))
    )
    assert wrong == []


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_spans_more_than_a_package_and_two_parts() -> None:
    assert [c for c in cycles(GRAPH) if len(c) > 3] == []


def test_the_checks_see_what_they_check(tmp_path: Path) -> None:
    """The graph builder finds lazy and relative imports, and the cycle finder finds a cycle."""
    (tmp_path / "flux2_lora" / "sub").mkdir(parents=True)
    (tmp_path / "flux2_lora" / "__init__.py").write_text("")
    (tmp_path / "flux2_lora" / "a.py").write_text("def f():\n    from .sub import b\n")
    (tmp_path / "flux2_lora" / "sub" / "__init__.py").write_text("")
    (tmp_path / "flux2_lora" / "sub" / "b.py").write_text("from ..cli import main\n")
    (tmp_path / "flux2_lora" / "cli.py").write_text("from .a import f\n")
    found = {}
    for path in sorted((tmp_path / "flux2_lora").rglob("*.py")):
        parts = list(path.relative_to(tmp_path).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = imports(found)
    assert graph["flux2_lora.a"] == {"flux2_lora.sub.b"} and graph["flux2_lora.sub.b"] == {"flux2_lora.cli"}
    assert cycles(graph) == [["flux2_lora.a", "flux2_lora.cli", "flux2_lora.sub.b"]]


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_docs_name_each_layer(name: str) -> None:
    text = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    assert f"**{name}**" in text


MAX_MODULE_LINES = 650


def test_no_module_is_longer_than_a_reader_can_hold() -> None:
    """A module over 650 lines is two topics: split it (docs/architecture.md, "Size")."""
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}
