"""A text of another domain than WikiText for quality checks: the docstrings of Python's standard library
(technical prose and code words, PSF license), module by module in name order, written once to
``bench/data/stdlib-docstrings.txt`` (committed, so every later measurement reads the same bytes).

    python bench/other_text.py [--max-bytes 400000]
"""

from __future__ import annotations

import argparse
import ast
import sys
import sysconfig
from pathlib import Path

OUT = Path(__file__).resolve().parent / "data" / "stdlib-docstrings.txt"


def docstrings(path: Path) -> list[str]:
    """The module's, its classes' and functions' docstrings, in source order."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError):
        return []
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef | ast.FunctionDef))]
    out = []
    for node in nodes:
        doc = ast.get_docstring(node)
        if doc and len(doc) > 200:
            out.append(doc.strip())
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-bytes", type=int, default=400_000)
    args = ap.parse_args()
    lib = Path(sysconfig.get_paths()["stdlib"])
    parts: list[str] = []
    size = 0
    for path in sorted(lib.glob("*.py")):
        for doc in docstrings(path):
            parts.append(doc)
            size += len(doc.encode()) + 2
        if size >= args.max_bytes:
            break
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n\n".join(parts) + "\n", encoding="utf-8")
    print(f"{OUT}: {size} bytes from Python {sys.version.split()[0]}'s standard library")


if __name__ == "__main__":
    main()
