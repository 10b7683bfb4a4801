"""The layering rules of the package, checked on its source (docs/design.md, "Architecture").

* the library (``exactgn/*.py``) never imports the lab (``exactgn.lab``), numpy, matplotlib, tqdm or argparse;
  only ``cli.py`` (which nothing imports) reaches into the lab;
* no module imports another module's private (``_name``) names;
* the import graph of the package, imports inside functions included, has no cycle;
* ``import exactgn`` loads neither the lab nor matplotlib.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "exactgn"
ENTRY_POINTS = {"exactgn.cli", "exactgn.__main__"}
LAB_ONLY = ("numpy", "matplotlib", "tqdm", "argparse")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(path: Path) -> list[tuple[str, str | None]]:
    """``(module, name)`` for every import in the file (``name`` is ``None`` for ``import module``)."""
    module = module_name(path)
    out: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node, path.name == "__init__.py")
            out += [(target, alias.name) for alias in node.names]
    return out


def internal_edges(path: Path, modules: set[str]) -> set[str]:
    """The package modules a file imports (``from . import x`` counts as importing ``exactgn.x``)."""
    edges = set()
    for target, name in imports(path):
        if name is not None and f"{target}.{name}" in modules:
            edges.add(f"{target}.{name}")
        elif target in modules:
            edges.add(target)
    return edges


SOURCES = sorted(PACKAGE.rglob("*.py"))
MODULES = {module_name(p): p for p in SOURCES}


def _library() -> list[Path]:
    return [
        p for p in SOURCES if "lab" not in p.relative_to(PACKAGE).parts and module_name(p) not in ENTRY_POINTS
    ]


@pytest.mark.parametrize("path", _library(), ids=lambda p: p.name)
def test_library_imports_neither_the_lab_nor_lab_dependencies(path):
    for target, _ in imports(path):
        assert not target.startswith("exactgn.lab"), (
            f"{path.name} imports {target}: the library must not use the lab"
        )
        assert target.split(".")[0] not in LAB_ONLY, f"{path.name} imports {target}, a lab-only dependency"


def test_nothing_imports_the_cli():
    for path in SOURCES:
        if module_name(path) == "exactgn.__main__":
            continue
        for target, name in imports(path):
            assert target != "exactgn.cli" and (target, name) != ("exactgn", "cli"), (
                f"{path} imports exactgn.cli"
            )


def test_no_module_imports_another_modules_private_names():
    for path in SOURCES:
        for target, name in imports(path):
            if (
                target.startswith("exactgn")
                and name is not None
                and name.startswith("_")
                and name != "__version__"
            ):
                pytest.fail(f"{module_name(path)} imports {target}.{name}, a private name")


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the directed graph as a list of nodes, or ``None``."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_import_graph_has_no_cycle():
    modules = set(MODULES)
    # A package's __init__ importing its own modules is not a cycle of the design: leave packages out.
    graph = {
        m: {t for t in internal_edges(p, modules) if MODULES[t].name != "__init__.py"}
        for m, p in MODULES.items()
        if p.name != "__init__.py"
    }
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph) or [])}"


def test_import_exactgn_loads_neither_the_lab_nor_matplotlib():
    code = (
        "import sys, exactgn; bad = [m for m in sys.modules if m.startswith(('exactgn.lab', 'matplotlib', "
        "'pydantic', 'exactgn.cli'))]; print(bad); sys.exit(1 if bad else 0)"
    )  # torch itself loads tqdm
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
