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


# ----------------------------------------------------------------------------- by kind
#
# Finer kinds, for pairs whose negatives come from many mutation kinds. The token edits above
# are split by what they change; AST-located kinds add bugs a token swap cannot make. Every
# edit replaces an exact span of the original text (``data/source_edits.py``).

_COMPARISON_TOKENS = {"<", "<=", ">", ">=", "==", "!="}
_OPERATOR_TOKENS = {"+", "-", "*", "//", "%", "+=", "-=", "and", "or", "min", "max"}

# Kinds of `make_mutants_by_kind`, in a fixed order (the evaluation mix uses all of them).
FINE_MUTANT_KINDS = (
    "comparison",
    "operator",
    "constant",
    "range_bound",
    "swap_operands",
    "wrong_return",
    "remove_condition",
    "delete_line",
    "cut",
)
# Kinds for training pairs only (``data.train_mutant_kinds``): validation and held-out pairs
# keep exactly FINE_MUTANT_KINDS. duplicate_line repeats a one-line simple statement (an
# assignment, augmented assignment or expression such as ``out.append(x)``) right after
# itself: a negative *longer* than its positive, against the "longer input wins" shortcut of
# the deletion kinds (repeats that change nothing pass in the sandbox and are dropped).
# wrong_name uses another local variable or argument in place of one that is read (the
# "variable misuse" bug of learned bug detectors); undefined_name reads a name that nothing
# defines (a NameError, drawn from the identifiers the rewrites rename to: the slip a small
# policy trained on several renamings of a solution makes most).
TRAIN_ONLY_MUTANT_KINDS = ("duplicate_line", "wrong_name", "undefined_name")
_NON_COMMUTATIVE = {
    ast.Sub: "-",
    ast.Div: "/",
    ast.FloorDiv: "//",
    ast.Mod: "%",
    ast.Pow: "**",
    ast.LShift: "<<",
    ast.RShift: ">>",
}
_ORDERING = {ast.Lt: "<", ast.Gt: ">", ast.LtE: "<=", ast.GtE: ">="}
_LOOSE = (ast.BoolOp, ast.Compare, ast.IfExp, ast.Lambda, ast.NamedExpr, ast.BinOp, ast.UnaryOp)


def _token_kind(code: str, edit: tuple[int, int, str]) -> str:
    s, e, r = edit
    orig = code[s:e]
    if r == " None":
        return "wrong_return"
    if orig in _COMPARISON_TOKENS:
        return "comparison"
    if orig in _OPERATOR_TOKENS:
        return "operator"
    if orig.strip() == "not":
        return "remove_condition"
    return "constant"  # numbers +-1, True <-> False


def _ast_edits(code: str, lo: int, hi: int) -> dict[str, list[tuple[int, int, str]]]:
    from codescaler_jax.data.source_edits import Positions, nodes_in, parse, reindent

    out: dict[str, list[tuple[int, int, str]]] = {
        "range_bound": [],
        "swap_operands": [],
        "wrong_return": [],
        "remove_condition": [],
    }
    tree = parse(code)
    if tree is None:
        return out
    pos = Positions(code)

    def seg(n):
        s, e = pos.span(n)
        return code[s:e]

    def paren(n):
        return f"({seg(n)})" if isinstance(n, _LOOSE) else seg(n)

    def shift(n, d):
        if isinstance(n, ast.Constant) and type(n.value) is int:
            return str(n.value + d)
        return f"{paren(n)} {'+' if d > 0 else '-'} {abs(d)}"

    nodes = nodes_in(tree, pos, lo, hi)
    local_names = sorted(
        {n.id for n in nodes if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        | {n.arg for n in ast.walk(tree) if isinstance(n, ast.arg)}
    )
    for n in nodes:
        if (
            isinstance(n, ast.Call)
            and isinstance(n.func, ast.Name)
            and n.func.id == "range"
            and 1 <= len(n.args) <= 3
            and not n.keywords
            and not any(isinstance(a, ast.Starred) for a in n.args)
        ):
            bounds = [n.args[0]] if len(n.args) == 1 else [n.args[1], n.args[0]]
            for b in bounds:
                for d in (1, -1):
                    out["range_bound"].append((*pos.span(b), shift(b, d)))
        elif isinstance(n, ast.Slice):
            for b in (n.lower, n.upper):
                if b is not None:
                    for d in (1, -1):
                        out["range_bound"].append((*pos.span(b), shift(b, d)))
        elif isinstance(n, ast.BinOp) and type(n.op) in _NON_COMMUTATIVE:
            op = _NON_COMMUTATIVE[type(n.op)]
            if seg(n.left) != seg(n.right):
                out["swap_operands"].append(
                    (*pos.span(n), f"{paren(n.right)} {op} {paren(n.left)}")
                )
        elif isinstance(n, ast.Compare) and len(n.ops) == 1 and type(n.ops[0]) in _ORDERING:
            if seg(n.left) != seg(n.comparators[0]):
                op = _ORDERING[type(n.ops[0])]
                out["swap_operands"].append(
                    (*pos.span(n), f"{paren(n.comparators[0])} {op} {paren(n.left)}")
                )
        elif isinstance(n, ast.Return) and n.value is not None:
            v = n.value
            if isinstance(v, ast.Constant) and v.value is None:
                continue
            s, e = pos.span(v)
            if isinstance(v, ast.Compare | ast.BoolOp) or (
                isinstance(v, ast.Constant) and isinstance(v.value, bool)
            ):
                out["wrong_return"].append((s, e, f"not {paren(v)}"))
            elif isinstance(v, ast.List | ast.ListComp | ast.Tuple):
                out["wrong_return"].append((s, e, "[]"))
            elif isinstance(v, ast.JoinedStr) or (
                isinstance(v, ast.Constant) and isinstance(v.value, str)
            ):
                out["wrong_return"].append((s, e, "''"))
            elif isinstance(v, ast.Constant) and isinstance(v.value, int | float):
                out["wrong_return"].append((s, e, "0" if v.value != 0 else "1"))
            for name in local_names:
                if name != seg(v):
                    out["wrong_return"].append((s, e, name))
        elif isinstance(n, ast.If):
            t = n.test
            if not (isinstance(t, ast.UnaryOp) and isinstance(t.op, ast.Not)):
                out["remove_condition"].append((*pos.span(t), f"not {paren(t)}"))
            head = pos.span(n)[0]
            is_elif = code[head : head + 4] == "elif"
            if not n.orelse and not is_elif and n.body[0].lineno > n.lineno:
                # drop the guard: its body runs unconditionally
                ind = len(code[pos.line_start(n.lineno) : head])
                delta = pos.span(n.body[0])[0] - pos.line_start(n.body[0].lineno) - ind
                edits = reindent(code, pos, n.body[0].lineno, n.end_lineno, -delta)
                if edits and delta > 0 and n.body[0].lineno == n.lineno + 1:
                    merged = code
                    for s, e, r in sorted(edits, reverse=True):
                        merged = merged[:s] + r + merged[e:]
                    start = pos.line_start(n.lineno)
                    body_start = pos.line_start(n.body[0].lineno)
                    end = pos.line_end(n.end_lineno)
                    shrink = len(code) - len(merged)
                    out["remove_condition"].append((start, end, merged[body_start : end - shrink]))
        elif isinstance(n, ast.BoolOp) and len(n.values) >= 2:
            for i in range(len(n.values)):
                rest = [paren(v) for j, v in enumerate(n.values) if j != i]
                op = " and " if isinstance(n.op, ast.And) else " or "
                out["remove_condition"].append((*pos.span(n), op.join(rest)))
        elif isinstance(n, ast.While):
            t = n.test
            if not (isinstance(t, ast.Constant) and t.value is True):
                out["remove_condition"].append((*pos.span(t), f"not {paren(t)}"))
    return out


def _duplicate_edits(code: str, lo: int, hi: int) -> list[tuple[int, int, str]]:
    """Insertions ``(end, end, line)`` repeating a one-line simple statement inside
    ``[lo, hi)`` on the next line (same indentation)."""
    from codescaler_jax.data.source_edits import Positions, nodes_in, parse

    tree = parse(code)
    if tree is None:
        return []
    pos = Positions(code)
    out = []
    for n in nodes_in(tree, pos, lo, hi):
        if not isinstance(n, ast.Assign | ast.AugAssign | ast.AnnAssign | ast.Expr):
            continue
        if n.lineno != n.end_lineno or (isinstance(n, ast.Expr) and isinstance(
                n.value, ast.Constant)):
            continue  # multi-line statements, docstrings
        start, end = pos.line_start(n.lineno), pos.line_end(n.lineno)
        line = code[start:end]
        if code[start : pos.span(n)[0]].strip() or code[pos.span(n)[1] : end].strip(" \t\n;"):
            continue  # not alone on its line
        out.append((end, end, line if line.endswith("\n") else "\n" + line))
    return out


def _name_misuse_edits(
    code: str, lo: int, hi: int
) -> tuple[list[tuple[int, int, str]], list[tuple[int, int, str]]]:
    """Edits of each read of a local variable or argument inside ``[lo, hi)``: ``wrong_name``
    (another local in its place) and ``undefined_name`` (a name that the code neither uses nor
    defines, by assignment, argument, ``def``, ``class`` or import, nor a builtin, in its
    place)."""
    import builtins

    from codescaler_jax.data.rewrites import _NAME_POOL
    from codescaler_jax.data.source_edits import Positions, nodes_in, parse

    tree = parse(code)
    if tree is None:
        return [], []
    pos = Positions(code)
    nodes = list(ast.walk(tree))
    stores = {n.id for n in nodes if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    args = {n.arg for n in nodes if isinstance(n, ast.arg)}
    local = sorted(stores | args)
    used = {n.id for n in nodes if isinstance(n, ast.Name)} | args
    used |= {n.attr for n in nodes if isinstance(n, ast.Attribute)}
    # names bound without an ast.Name: functions, classes and imports (a helper `digits` of
    # the solution is defined: using it is no NameError)
    used |= {n.name for n in nodes
             if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    used |= {(a.asname or a.name).split(".")[0] for n in nodes
             if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    fresh = [n for n in _NAME_POOL if n not in used and not hasattr(builtins, n)]
    wrong, undefined = [], []
    for n in nodes_in(tree, pos, lo, hi):
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and n.id in local:
            span = pos.span(n)
            wrong.extend((*span, other) for other in local if other != n.id)
            undefined.extend((*span, other) for other in fresh)
    return wrong, undefined


def mutant_edits_by_kind(code: str, lo: int, hi: int) -> dict[str, list[tuple[int, int, str]]]:
    """Candidate edits ``(start, end, replacement)`` inside ``[lo, hi)``, by fine kind (and the
    training-only kinds)."""
    pools: dict[str, list[tuple[int, int, str]]] = {
        k: [] for k in FINE_MUTANT_KINDS + TRAIN_ONLY_MUTANT_KINDS
    }
    pools["duplicate_line"] = _duplicate_edits(code, lo, hi)
    pools["wrong_name"], pools["undefined_name"] = _name_misuse_edits(code, lo, hi)
    for edit in _edits(code, lo, hi):
        pools[_token_kind(code, edit)].append(edit)
    for kind, edits in _ast_edits(code, lo, hi).items():
        pools[kind].extend(edits)
    line = _line_edits(code, lo, hi)
    pools["delete_line"] = [e for e in line if e[1] != len(code) or e[2]]
    pools["cut"] = [e for e in line if e[1] == len(code) and not e[2]]
    return pools


def make_mutants_by_kind(
    code: str,
    *,
    n: int,
    kinds: tuple[str, ...] | list[str] = FINE_MUTANT_KINDS,
    seed: int = 0,
    lo: int = 0,
    hi: int | None = None,
) -> list[tuple[str, str]]:
    """Up to ``n`` distinct, syntactically valid mutants ``(code, kind)`` spread evenly over
    ``kinds`` (round robin in a seeded order; a kind out of edits leaves its turn to the
    others). Only ``[lo, hi)`` is edited. Deterministic for a given seed."""
    known = FINE_MUTANT_KINDS + TRAIN_ONLY_MUTANT_KINDS
    unknown = [k for k in kinds if k not in known]
    if unknown:
        raise ValueError(f"unknown mutant kind(s) {unknown}; known: {list(known)}")
    hi = len(code) if hi is None else hi
    rng = random.Random(seed)
    pools = mutant_edits_by_kind(code, lo, hi)
    order = list(kinds)
    rng.shuffle(order)
    for k in order:
        rng.shuffle(pools[k])
    cursor = dict.fromkeys(order, 0)
    seen = {code.strip()}
    out: list[tuple[str, str]] = []
    active = [k for k in order if pools[k]]
    while len(out) < n and active:
        for kind in list(active):
            if len(out) >= n:
                break
            while cursor[kind] < len(pools[kind]):
                s, e, r = pools[kind][cursor[kind]]
                cursor[kind] += 1
                m = code[:s] + r + code[e:]
                if m.strip() not in seen and _valid(m):
                    seen.add(m.strip())
                    out.append((m, kind))
                    break
            if cursor[kind] >= len(pools[kind]):
                active.remove(kind)
    return out
