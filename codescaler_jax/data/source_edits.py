"""Text edits located with Python's ``ast``: node spans as character offsets, edits applied
back to front, the editable region of a solution (its entry point's body).

Rewrites (``data/rewrites.py``) and AST-level mutants (``data/mutants.py``) both edit the
original text at a node's exact span, so everything outside the edit keeps its formatting:
a candidate and the program it was derived from differ only where the edit is.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable

Edit = tuple[int, int, str]  # (start, end, replacement) in characters of the code


class Positions:
    """Maps ``ast`` positions (1-based line, UTF-8 *byte* column) to character offsets."""

    def __init__(self, code: str):
        self.lines = code.splitlines(keepends=True)
        self.starts = [0]
        for line in self.lines:
            self.starts.append(self.starts[-1] + len(line))

    def offset(self, lineno: int, col_byte: int) -> int:
        line = self.lines[lineno - 1] if lineno - 1 < len(self.lines) else ""
        col = len(line.encode("utf-8")[:col_byte].decode("utf-8", "replace"))
        return self.starts[lineno - 1] + col

    def span(self, node: ast.AST) -> tuple[int, int]:
        """``[start, end)`` of ``node`` (an expression or statement) in characters."""
        return (
            self.offset(node.lineno, node.col_offset),
            self.offset(node.end_lineno, node.end_col_offset),
        )

    def line_start(self, lineno: int) -> int:
        return self.starts[lineno - 1]

    def line_end(self, lineno: int) -> int:
        """Offset just past the newline of line ``lineno`` (or the end of the code)."""
        return self.starts[min(lineno, len(self.lines))]


def apply_edits(code: str, edits: Iterable[Edit]) -> str:
    """Apply non-overlapping edits (any order) to ``code``."""
    out = code
    last = len(code) + 1
    for s, e, r in sorted(edits, key=lambda x: (x[0], x[1]), reverse=True):
        if e > last:
            raise ValueError(f"overlapping edits at {s}:{e}")
        out = out[:s] + r + out[e:]
        last = s
    return out


def parse(code: str) -> ast.Module | None:
    """``ast.parse`` or ``None`` when the code is not valid Python."""
    try:
        return ast.parse(code)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None


def is_docstring(stmt: ast.stmt) -> bool:
    return (
        isinstance(stmt, ast.Expr)
        and isinstance(stmt.value, ast.Constant)
        and isinstance(stmt.value.value, str)
    )


def find_function(tree: ast.Module, name: str) -> ast.FunctionDef | None:
    """The top-level function ``name`` (the entry point), else ``None``."""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name:
            return node  # type: ignore[return-value]
    return None


def body_statements(func: ast.FunctionDef) -> list[ast.stmt]:
    """The function's statements without its docstring."""
    body = list(func.body)
    if body and is_docstring(body[0]):
        body = body[1:]
    return body


def body_range(code: str, entry_point: str) -> tuple[int, int] | None:
    """``[lo, hi)``: from the first line of the entry point's first non-docstring statement to
    the end of the function. ``None`` when the code does not parse or has no such function."""
    tree = parse(code)
    func = find_function(tree, entry_point) if tree is not None else None
    if func is None:
        return None
    body = body_statements(func)
    if not body:
        return None
    pos = Positions(code)
    return pos.line_start(body[0].lineno), pos.line_end(func.end_lineno)


def nodes_in(tree: ast.AST, pos: Positions, lo: int, hi: int) -> list[ast.AST]:
    """Every node with a position whose span lies inside ``[lo, hi)``, in source order."""
    out = []
    for node in ast.walk(tree):
        if not hasattr(node, "lineno") or getattr(node, "end_lineno", None) is None:
            continue
        s, e = pos.span(node)
        if lo <= s and e <= hi:
            out.append(node)
    out.sort(key=lambda n: pos.span(n))
    return out


def indent_of(code: str, offset: int) -> str:
    """The leading whitespace of the line containing ``offset``."""
    start = code.rfind("\n", 0, offset) + 1
    line = code[start:]
    return line[: len(line) - len(line.lstrip(" \t"))]


def reindent(code: str, pos: Positions, first: int, last: int, delta: int) -> list[Edit] | None:
    """Edits moving lines ``first..last`` by ``delta`` columns (negative: dedent)."""
    edits = []
    for ln in range(first, last + 1):
        s = pos.line_start(ln)
        line = code[s : pos.line_end(ln)]
        if not line.strip():
            continue
        if delta < 0:
            if line[:-delta].strip(" "):
                return None
            edits.append((s, s - delta, ""))
        else:
            edits.append((s, s, " " * delta))
    return edits
