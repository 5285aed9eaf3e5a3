"""No module over about 500 lines, no function over about 60 (issue 19, item 6).

The developers' guide asks for short modules and functions except where splitting would
hide a loop: a numerical kernel or a training loop reads best whole. Every module under
``anomaly/`` is measured with :mod:`ast` (a function is its ``def`` line to its last line,
docstring included, nested functions counted inside their parent and on their own). The
exceptions are listed below, each with its reason; an entry that no longer exceeds its
limit fails too, so the list never outlives its reason.

``python tests/test_code_shape.py`` prints the longest functions and the longest modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "anomaly"

MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60

LONG_MODULES: dict[str, str] = {
    # path relative to the repository -> why it may exceed MAX_MODULE_LINES
}

LONG_FUNCTIONS: dict[str, str] = {
    # "path:qualified name" -> why it may exceed MAX_FUNCTION_LINES
    "anomaly/probe/sweep.py:_sweep_group": "numerical kernel: the chunked sweep over the pairs of one head "
                                           "group, one loop whose body shares its chunk's buffers",
    "anomaly/probe/stats.py:_case_d": "numerical kernel: case-(d) counts and weights over every causal pair "
                                      "in one pass, split only by hiding its loop",
    "anomaly/coca/attention.py:coca_attention": "numerical kernel: one fused attention call; 27 of its lines "
                                                "are the argument contract in its docstring",
}


def _qualified(tree: ast.AST) -> list[tuple[str, ast.AST]]:
    """``(qualified name, node)`` of every function and method in ``tree``."""
    out: list[tuple[str, ast.AST]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    out.append((name, child))
                visit(child, name + ".")
            else:
                visit(child, prefix)

    visit(tree, "")
    return out


def measure() -> tuple[dict[str, int], dict[str, int]]:
    """Lines per module (``{"anomaly/x.py": n}``) and per function (``{"anomaly/x.py:f": n}``)."""
    modules, functions = {}, {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        source = path.read_text(encoding="utf-8")
        modules[rel] = len(source.splitlines())
        for name, node in _qualified(ast.parse(source, filename=rel)):
            functions[f"{rel}:{name}"] = node.end_lineno - node.lineno + 1
    return modules, functions


def test_no_module_is_too_long():
    modules, _ = measure()
    long = {m: n for m, n in modules.items() if n > MAX_MODULE_LINES and m not in LONG_MODULES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines (split them, or list them with a reason): {long}"


def test_no_function_is_too_long():
    _, functions = measure()
    long = {f: n for f, n in functions.items() if n > MAX_FUNCTION_LINES and f not in LONG_FUNCTIONS}
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them, or list them with a reason): {long}"


def test_every_exception_is_still_needed():
    modules, functions = measure()
    stale = [m for m in LONG_MODULES if modules.get(m, 0) <= MAX_MODULE_LINES]
    stale += [f for f in LONG_FUNCTIONS if functions.get(f, 0) <= MAX_FUNCTION_LINES]
    assert not stale, f"listed as too long but no longer are (remove them from the list): {stale}"


if __name__ == "__main__":
    modules, functions = measure()
    print(f"functions over {MAX_FUNCTION_LINES} lines: {sum(n > MAX_FUNCTION_LINES for n in functions.values())}")
    for name, n in sorted(functions.items(), key=lambda kv: -kv[1])[:15]:
        print(f"{n:5d}  {name}{'  (listed)' if name in LONG_FUNCTIONS else ''}")
    print("modules over 400 lines:")
    for name, n in sorted(modules.items(), key=lambda kv: -kv[1]):
        if n > 400:
            print(f"{n:5d}  {name}{'  (listed)' if name in LONG_MODULES else ''}")
