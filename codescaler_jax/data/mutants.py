"""Small behaviour-changing edits of a correct program ("mutants"), to make failing candidates.

Two kinds: single-token edits (a swapped operator, an off-by-one constant, a flipped boolean,
``return None``) and statement-level edits (a deleted line; the code cut after a line, as an
unfinished generation leaves it).

Mutations are applied to token spans found with Python's ``tokenize`` module, inside a given
character range (the solution body), so everything else in the program keeps its exact
formatting: a positive and its mutant differ only in the mutated token. Every mutant is
syntactically valid (``ast.parse``); whether it really fails is for the sandbox to decide.
"""

from __future__ import annotations

import ast
import io
import random
import tokenize

_OP_SWAPS = {
    "<": ["<=", ">"],
    "<=": ["<", ">="],
    ">": [">=", "<"],
    ">=": [">", "<="],
    "==": ["!="],
    "!=": ["=="],
    "+": ["-"],
    "-": ["+"],
    "*": ["+", "//"],
    "//": ["%", "*"],
    "%": ["//"],
    "+=": ["-="],
    "-=": ["+="],
}
_NAME_SWAPS = {
    "True": ["False"],
    "False": ["True"],
    "and": ["or"],
    "or": ["and"],
    "min": ["max"],
    "max": ["min"],
}


def _edits(code: str, lo: int, hi: int) -> list[tuple[int, int, str]]:
    """Candidate edits ``(start, end, replacement)`` on tokens inside ``[lo, hi)``."""
    lines = code.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))

    def pos(rc: tuple[int, int]) -> int:
        return offsets[rc[0] - 1] + rc[1]

    out: list[tuple[int, int, str]] = []
    try:
        toks = list(tokenize.generate_tokens(io.StringIO(code).readline))
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return out
    for i, t in enumerate(toks):
        s, e = pos(t.start), pos(t.end)
        if s < lo or e > hi:
            continue
        if t.type == tokenize.OP and t.string in _OP_SWAPS:
            out.extend((s, e, r) for r in _OP_SWAPS[t.string])
        elif t.type == tokenize.NAME and t.string in _NAME_SWAPS:
            out.extend((s, e, r) for r in _NAME_SWAPS[t.string])
        elif t.type == tokenize.NAME and t.string == "not":
            out.append((s, e + 1 if code[e : e + 1] == " " else e, ""))
        elif t.type == tokenize.NUMBER and t.string.isdigit():
            v = int(t.string)
            out.append((s, e, str(v + 1)))
            if v > 0:
                out.append((s, e, str(v - 1)))
        elif t.type == tokenize.NAME and t.string == "return":
            # `return <expr>` -> `return None` when the expression sits on this line
            nxt = toks[i + 1] if i + 1 < len(toks) else None
            if nxt is not None and nxt.type not in (tokenize.NEWLINE, tokenize.COMMENT):
                line_end = code.find("\n", e)
                line_end = len(code) if line_end < 0 else line_end
                if line_end <= hi and "\\" not in code[e:line_end]:
                    out.append((e, line_end, " None"))
    return out


def _valid(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return False
    return True


def _line_edits(code: str, lo: int, hi: int) -> list[tuple[int, int, str]]:
    """Statement-level edits inside ``[lo, hi)``: delete one line, or cut the code after a
    line (an unfinished solution, as a truncated generation leaves it)."""
    out: list[tuple[int, int, str]] = []
    starts = [lo]
    pos = lo
    while True:
        nl = code.find("\n", pos, hi)
        if nl < 0:
            break
        pos = nl + 1
        starts.append(pos)
    lines = [(a, b) for a, b in zip(starts, starts[1:] + [hi]) if code[a:b].strip()]
    for a, b in lines:
        out.append((a, b, ""))  # delete this line
    for a, _ in lines[1:]:
        out.append((a, len(code), ""))  # cut everything from this line on
    return out


MUTANT_KINDS = ("token", "delete_line", "cut")


def make_mutants_with_kinds(
    code: str,
    *,
    n: int,
    seed: int = 0,
    lo: int = 0,
    hi: int | None = None,
    line_fraction: float = 0.25,
) -> list[tuple[str, str]]:
    """Up to ``n`` distinct, syntactically valid mutants of ``code`` with their kind.

    Kinds: ``token`` (a swapped operator, an off-by-one constant, a flipped boolean,
    ``return None``), ``delete_line`` (one statement removed) and ``cut`` (the code cut after a
    line, an unfinished solution). A ``line_fraction`` share of ``n`` goes to the two
    statement-level kinds (half each), the rest to token edits; a kind that runs out of edits
    leaves its share to the others. Only the character range ``[lo, hi)`` is edited (e.g. the
    solution body, not the signature and docstring). Deterministic for a given seed.
    """
    hi = len(code) if hi is None else hi
    rng = random.Random(seed)
    pools: dict[str, list[tuple[int, int, str]]] = {"token": _edits(code, lo, hi)}
    line = _line_edits(code, lo, hi)
    pools["delete_line"] = [e for e in line if e[1] != len(code) or e[2]]
    pools["cut"] = [e for e in line if e[1] == len(code) and not e[2]]
    for pool in pools.values():
        rng.shuffle(pool)
    n_line = round(n * line_fraction)
    quotas = {"cut": n_line - n_line // 2, "delete_line": n_line // 2, "token": n - n_line}
    seen = {code.strip()}
    out: list[tuple[str, str]] = []
    cursor = dict.fromkeys(pools, 0)

    def take(kind: str, quota: int) -> None:
        taken = 0
        pool = pools[kind]
        while cursor[kind] < len(pool) and taken < quota and len(out) < n:
            s, e, r = pool[cursor[kind]]
            cursor[kind] += 1
            m = code[:s] + r + code[e:]
            key = m.strip()
            if key in seen or not _valid(m):
                continue
            seen.add(key)
            out.append((m, kind))
            taken += 1

    for kind in ("cut", "delete_line", "token"):
        take(kind, quotas[kind])
    for kind in ("token", "cut", "delete_line"):  # fill what a short pool left over
        take(kind, n)
    return out


def make_mutants(
    code: str,
    *,
    n: int,
    seed: int = 0,
    lo: int = 0,
    hi: int | None = None,
    line_fraction: float = 0.25,
) -> list[str]:
    """The codes of ``make_mutants_with_kinds``."""
    return [
        m
        for m, _ in make_mutants_with_kinds(
            code, n=n, seed=seed, lo=lo, hi=hi, line_fraction=line_fraction
        )
    ]
