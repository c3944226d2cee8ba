"""The package's shape, as README's module table and issue 20 promise it: every module opens with a
comment saying its job, no import cycle between serving's modules (imports inside functions, which
run later, are not cycles), and the README module table names every module that exists and no other."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "serving"


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def module_level_imports(path: Path, known: dict[str, Path]) -> set[str]:
    """serving modules this one imports when it is imported (not under TYPE_CHECKING, not in functions)."""
    found: set[str] = set()

    def visit(nodes):
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, (ast.If, ast.Try)):
                visit(node.body + node.orelse + getattr(node, "finalbody", []) +
                      [n for h in getattr(node, "handlers", []) for n in h.body])
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("serving"):
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names if alias.name.startswith("serving"))

    visit(ast.parse(path.read_text()).body)
    return {name for name in found if name in known}


def test_every_module_opens_with_its_job():
    assert [str(p) for p in modules().values() if not ast.get_docstring(ast.parse(p.read_text()))] == []


def test_no_import_cycles_in_serving():
    known = modules()
    graph = {name: module_level_imports(path, known) - {name} for name, path in known.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def walk(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep] if dep in path else [name, dep])
            elif dep not in state:
                walk(dep, path + [dep])
        state[name] = 2

    for name in graph:
        if name not in state:
            walk(name, [name])
    assert cycles == []


def test_the_readme_module_table_is_the_tree():
    readme = (ROOT / "README.md").read_text()
    table = set(re.findall(r"^\| `(serving/[\w/]+\.py)` \|", readme, flags=re.MULTILINE))
    tree = {str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    assert sorted(tree - table) == [] and sorted(table - tree) == []
