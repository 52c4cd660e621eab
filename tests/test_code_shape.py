"""The code's shape, as DESIGN.md states it: imports run one way between the packages, and no function is long
(complexity is ruff's C901, at most 15, in ``make lint``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"schemas": "schemas", "engine": "engine", "stages": "stages", "podar": "podar"}
MAX_FUNCTION_LINES = 60
# package → the podar packages it may import
ALLOWED = {"schemas": {"schemas"}, "engine": {"schemas", "engine"}, "stages": {"schemas", "engine", "stages"},
           "podar": {"schemas", "engine", "stages", "podar"}}
# modules of engine that stages must not import: the machine and the runner (stages never fire moves)
STAGES_NEVER = {"podar.engine.machine", "podar.engine.runner"}


def _modules():
    for package, folder in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            yield package, path, ast.parse(path.read_text(), filename=str(path))


def _imported(tree: ast.AST, package: str, path: Path) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside its own package
                names.add(f"podar.{package}" if package != "podar" else "podar")
            elif node.module:
                names.add(node.module)
    return names


def _package_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "podar":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in PACKAGES else "podar"


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_imports_run_one_way(package):
    bad = []
    for pkg, path, tree in _modules():
        if pkg != package:
            continue
        for module in _imported(tree, pkg, path):
            target = _package_of(module)
            if target is not None and target not in ALLOWED[pkg]:
                bad.append(f"{path.relative_to(ROOT)} imports {module}")
            if pkg == "stages" and module in STAGES_NEVER:
                bad.append(f"{path.relative_to(ROOT)} imports {module} (stages never fire moves)")
    assert not bad, "\n".join(bad)


def test_no_function_longer_than_60_lines():
    long = []
    for _pkg, path, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "\n".join(long)
