"""Semantics-preserving rewrites of a passing solution: positives that are not the canonical text.

Each transform edits the original text at AST-located spans (``data/source_edits.py``), so a
rewrite differs from its source only where the transform applies; ``reformat`` is the one
global transform (``ast.unparse``: spacing, quotes, parentheses and comments normalised).

Transforms (registered by name in ``TRANSFORMS``):

- ``rename_locals``: rename local variables of the solution's functions (never the entry point,
  a module-level name, an attribute or a keyword-argument name) to fresh names;
- ``rename_params``: the same for the functions' parameters;
- ``reformat``: ``ast.unparse`` of the whole program;
- ``quotes``: single <-> double quotes on simple string literals;
- ``aug_assign``: ``x += e`` <-> ``x = x + e``;
- ``comprehension``: ``r = []; for v in it: r.append(e)`` <-> ``r = [e for v in it]``;
- ``ternary``: ``if c: x = a else: x = b`` <-> ``x = a if c else b`` (and the ``return`` form);
- ``early_return``: ``if c: return a else: rest`` <-> ``if c: return a`` then ``rest``;
- ``compare_mirror``: ``a < b`` -> ``b > a``;
- ``strip_docstring``: drop the entry point's docstring (the problem text already has it);
- ``range_zero``: ``range(0, n)`` <-> ``range(n)``;
- ``bool_return``: ``if c: return True`` / ``return False`` -> ``return c``.

Whether a rewrite still passes is for the sandbox to decide (a transform can change behaviour,
e.g. ``x = x + y`` on an aliased list, or a leaked loop variable); only passing rewrites are
used. Everything is deterministic for a given seed.
"""

from __future__ import annotations

import ast
import builtins
import io
import keyword
import random
import tokenize
from collections.abc import Callable

from codescaler_jax.data.source_edits import (
    Edit,
    Positions,
    apply_edits,
    find_function,
    indent_of,
    is_docstring,
    parse,
    reindent,
)

Transform = Callable[[str, ast.Module, str, random.Random], "str | None"]

_NAME_POOL = (
    "value item elem result res total acc current curr tmp temp idx index pos k j m p q a b x "
    "y z n num number count cnt word words chars ch s t left right lo hi start end seen out "
    "output answer ans buf parts digits lst arr values items key val flag ok best prev nxt step "
    "size length data entry part piece token cur running found target limit"
).split()

# Nodes that need parentheses when their source is embedded in a larger expression.
_LOOSE = (ast.BoolOp, ast.Compare, ast.IfExp, ast.Lambda, ast.NamedExpr, ast.BinOp, ast.UnaryOp)


def _seg(code: str, pos: Positions, node: ast.AST) -> str:
    s, e = pos.span(node)
    return code[s:e]


def _paren(code: str, pos: Positions, node: ast.AST, loose=_LOOSE) -> str:
    text = _seg(code, pos, node)
    return f"({text})" if isinstance(node, loose) else text


def _one_line(node: ast.AST) -> bool:
    return node.lineno == node.end_lineno


def _identifiers(tree: ast.Module) -> set[str]:
    out = set(dir(builtins)) | set(keyword.kwlist)
    for node in ast.walk(tree):
        for attr in ("id", "arg", "attr", "name", "asname"):
            v = getattr(node, attr, None)
            if isinstance(v, str):
                out.add(v)
        if isinstance(node, ast.Global | ast.Nonlocal):
            out.update(node.names)
    return out


def _pick_sites(sites: list, rng: random.Random, p: float = 0.5) -> list:
    """A random non-empty subset of ``sites`` (each kept with probability ``p``)."""
    if not sites:
        return []
    chosen = [s for s in sites if rng.random() < p]
    return chosen or [rng.choice(sites)]


def _non_overlapping(spans: list[tuple[int, int, object]]) -> list[tuple[int, int, object]]:
    out, last = [], -1
    for s, e, x in sorted(spans, key=lambda t: (t[0], -t[1])):
        if s >= last:
            out.append((s, e, x))
            last = e
    return out


# ----------------------------------------------------------------------------- renaming


def _rename(code: str, tree: ast.Module, entry: str, rng: random.Random, params: bool):
    pos = Positions(code)
    used = _identifiers(tree)
    module_names = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            module_names.add(node.name)
        if not isinstance(node, ast.Assign | ast.Import | ast.ImportFrom):
            continue
        for t in ast.walk(node):
            if isinstance(t, ast.Name):
                module_names.add(t.id)
            if isinstance(t, ast.alias):
                module_names.add((t.asname or t.name).split(".")[0])
    edits: list[Edit] = []
    taken: set[str] = set()
    for func in tree.body:
        if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        bound: set[str] = set()
        args: set[str] = set()
        excluded: set[str] = set(module_names) | {entry}
        for node in ast.walk(func):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store | ast.Del):
                bound.add(node.id)
            elif isinstance(node, ast.arg):
                args.add(node.arg)
            elif isinstance(node, ast.Global | ast.Nonlocal):
                excluded.update(node.names)
            elif isinstance(node, ast.keyword) and node.arg:
                excluded.add(node.arg)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                excluded.add(node.name)
            elif isinstance(node, ast.alias):
                excluded.add((node.asname or node.name).split(".")[0])
            elif isinstance(node, ast.ExceptHandler) and node.name:
                excluded.add(node.name)  # its span covers the whole handler
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("locals", "vars", "eval", "exec", "globals")
            ):
                return None  # names looked up dynamically: renaming is unsafe
        names = (args if params else bound - args) - excluded
        if params:
            names -= {"self", "cls"}
        names = sorted(names)
        chosen = _pick_sites(names, rng, 0.6)
        if not chosen:
            continue
        mapping = {}
        for old in chosen:
            pool = [n for n in _NAME_POOL if n not in used and n not in taken]
            new = rng.choice(pool) if pool else f"{old}_{len(taken)}"
            taken.add(new)
            mapping[old] = new
        for node in ast.walk(func):
            if isinstance(node, ast.Name) and node.id in mapping:
                s, e = pos.span(node)
                if code[s:e] != node.id:
                    return None  # e.g. a position inside an f-string: do not guess
                edits.append((s, e, mapping[node.id]))
            elif isinstance(node, ast.arg) and node.arg in mapping:
                s = pos.offset(node.lineno, node.col_offset)
                e = s + len(node.arg)
                if code[s:e] != node.arg:
                    return None
                edits.append((s, e, mapping[node.arg]))
    return apply_edits(code, edits) if edits else None


def rename_locals(code, tree, entry, rng):
    return _rename(code, tree, entry, rng, params=False)


def rename_params(code, tree, entry, rng):
    return _rename(code, tree, entry, rng, params=True)


# ----------------------------------------------------------------------------- surface


def reformat(code, tree, entry, rng):
    return ast.unparse(tree) + "\n"


def quotes(code, tree, entry, rng):
    try:
        toks = list(tokenize.generate_tokens(io.StringIO(code).readline))
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return None
    # convert the simple strings of the more common style to the other one
    single = sum(t.type == tokenize.STRING and t.string.lstrip("rRbBuUfF")[:1] == "'" for t in toks)
    double = sum(
        t.type == tokenize.STRING
        and t.string.lstrip("rRbBuUfF")[:1] == '"'
        and t.string.lstrip("rRbBuUfF")[:3] != '"""'
        for t in toks
    )
    other = "'" if single >= double else '"'
    target = "'" if other == '"' else '"'
    pos = Positions(code)
    edits = []
    for t in toks:
        if t.type != tokenize.STRING:
            continue
        s = t.string
        prefix = s[: len(s) - len(s.lstrip("rRbBuUfF"))]
        body = s[len(prefix) :]
        if body[:3] in ('"""', "'''") or not body.startswith(other) or not body.endswith(other):
            continue
        inner = body[1:-1]
        if target in inner or "\\" in inner or (prefix.lower().count("f") and "{" in inner):
            continue
        start = pos.offset(t.start[0], 0) + t.start[1]
        end = pos.offset(t.end[0], 0) + t.end[1]
        edits.append((start, end, prefix + target + inner + target))
    return apply_edits(code, edits) if edits else None


def strip_docstring(code, tree, entry, rng):
    func = find_function(tree, entry)
    if func is None or not func.body or not is_docstring(func.body[0]) or len(func.body) < 2:
        return None
    doc = func.body[0]
    pos = Positions(code)
    s, e = pos.span(doc)
    ls, le = pos.line_start(doc.lineno), pos.line_end(doc.end_lineno)
    if code[ls:s].strip() or code[e:le].strip():
        return None
    return code[:ls] + code[le:]


# ----------------------------------------------------------------------------- statements

_OPS = {
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.Div: "/",
    ast.FloorDiv: "//",
    ast.Mod: "%",
    ast.Pow: "**",
    ast.BitOr: "|",
    ast.BitAnd: "&",
    ast.BitXor: "^",
    ast.LShift: "<<",
    ast.RShift: ">>",
}


_PREC = {
    ast.Pow: 6,
    ast.Mult: 5,
    ast.Div: 5,
    ast.FloorDiv: 5,
    ast.Mod: 5,
    ast.Add: 4,
    ast.Sub: 4,
    ast.LShift: 3,
    ast.RShift: 3,
    ast.BitAnd: 2,
    ast.BitXor: 1,
    ast.BitOr: 0,
}


def aug_assign(code, tree, entry, rng):
    pos = Positions(code)
    sites = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.stmt) or not _one_line(node):
            continue
        if (
            isinstance(node, ast.AugAssign)
            and isinstance(node.target, ast.Name)
            and type(node.op) in _OPS
        ):
            op = _OPS[type(node.op)]
            v = node.value
            tight = isinstance(v, ast.BinOp) and _PREC[type(v.op)] > _PREC[type(node.op)]
            val = _seg(code, pos, v) if tight else _paren(code, pos, v)
            sites.append((node, f"{node.target.id} = {node.target.id} {op} {val}"))
        elif (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and isinstance(node.value, ast.BinOp)
            and type(node.value.op) in _OPS
            and isinstance(node.value.left, ast.Name)
            and node.value.left.id == node.targets[0].id
        ):
            op = _OPS[type(node.value.op)]
            right = _seg(code, pos, node.value.right)
            sites.append((node, f"{node.targets[0].id} {op}= {right}"))
    edits = [(*pos.span(n), text) for n, text in _pick_sites(sites, rng)]
    return apply_edits(code, edits) if edits else None


def _blocks(tree: ast.AST):
    """Every statement list in the tree (bodies, else-branches, handlers)."""
    for node in ast.walk(tree):
        for field in ("body", "orelse", "finalbody"):
            block = getattr(node, field, None)
            if isinstance(block, list) and block and isinstance(block[0], ast.stmt):
                yield block


def _append_call(stmt: ast.stmt, name: str) -> ast.expr | None:
    """``e`` when ``stmt`` is ``name.append(e)``."""
    if (
        isinstance(stmt, ast.Expr)
        and isinstance(stmt.value, ast.Call)
        and isinstance(stmt.value.func, ast.Attribute)
        and stmt.value.func.attr == "append"
        and isinstance(stmt.value.func.value, ast.Name)
        and stmt.value.func.value.id == name
        and len(stmt.value.args) == 1
        and not stmt.value.keywords
        and not isinstance(stmt.value.args[0], ast.Starred)
    ):
        return stmt.value.args[0]
    return None


def _unit(code: str, pos: Positions, outer: ast.stmt, inner: ast.stmt) -> str:
    """The indentation step between a compound statement and its body."""
    return indent_of(code, pos.span(inner)[0])[len(indent_of(code, pos.span(outer)[0])) :]


def comprehension(code, tree, entry, rng):
    pos = Positions(code)
    sites = []
    for block in _blocks(tree):
        for a, b in zip(block, block[1:]):
            if not (
                isinstance(a, ast.Assign)
                and len(a.targets) == 1
                and isinstance(a.targets[0], ast.Name)
                and isinstance(a.value, ast.List)
                and not a.value.elts
                and isinstance(b, ast.For)
                and not b.orelse
                and len(b.body) == 1
            ):
                continue
            name = a.targets[0].id
            cond = None
            body = b.body[0]
            if isinstance(body, ast.If) and not body.orelse and len(body.body) == 1:
                cond, body = body.test, body.body[0]
            elt = _append_call(body, name)
            if elt is None:
                continue
            text = (
                f"{name} = [{_seg(code, pos, elt)} for {_seg(code, pos, b.target)} in "
                f"{_seg(code, pos, b.iter)}"
                + (f" if {_paren(code, pos, cond, (ast.IfExp, ast.Lambda))}" if cond else "")
                + "]"
            )
            sites.append((pos.span(a)[0], pos.span(b)[1], text))
        for stmt in block:
            if (
                isinstance(stmt, ast.Assign)
                and len(stmt.targets) == 1
                and isinstance(stmt.targets[0], ast.Name)
                and isinstance(stmt.value, ast.ListComp)
                and len(stmt.value.generators) == 1
                and not stmt.value.generators[0].is_async
                and len(stmt.value.generators[0].ifs) <= 1
            ):
                gen = stmt.value.generators[0]
                name = stmt.targets[0].id
                ind = indent_of(code, pos.span(stmt)[0])
                unit = "    "
                lines = [
                    f"{name} = []",
                    f"{ind}for {_seg(code, pos, gen.target)} in {_seg(code, pos, gen.iter)}:",
                ]
                inner = ind + unit
                if gen.ifs:
                    lines.append(f"{inner}if {_seg(code, pos, gen.ifs[0])}:")
                    inner += unit
                lines.append(f"{inner}{name}.append({_seg(code, pos, stmt.value.elt)})")
                sites.append((*pos.span(stmt), "\n".join(lines)))
    edits = [(s, e, t) for s, e, t in _non_overlapping(_pick_sites(sites, rng))]
    return apply_edits(code, edits) if edits else None


def ternary(code, tree, entry, rng):
    pos = Positions(code)
    sites = []
    loose = (ast.IfExp, ast.Lambda, ast.NamedExpr)
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and len(node.body) == 1 and len(node.orelse) == 1:
            a, b = node.body[0], node.orelse[0]
            if code[pos.span(node)[0] : pos.span(node)[0] + 4] == "elif":
                continue
            c = _paren(code, pos, node.test, loose)
            if (
                isinstance(a, ast.Assign)
                and isinstance(b, ast.Assign)
                and len(a.targets) == len(b.targets) == 1
                and isinstance(a.targets[0], ast.Name)
                and isinstance(b.targets[0], ast.Name)
                and a.targets[0].id == b.targets[0].id
            ):
                text = (
                    f"{a.targets[0].id} = {_paren(code, pos, a.value, loose)} if {c} else "
                    f"{_paren(code, pos, b.value, loose)}"
                )
                sites.append((*pos.span(node), text))
            elif (
                isinstance(a, ast.Return)
                and isinstance(b, ast.Return)
                and a.value is not None
                and b.value is not None
            ):
                text = (
                    f"return {_paren(code, pos, a.value, loose)} if {c} else "
                    f"{_paren(code, pos, b.value, loose)}"
                )
                sites.append((*pos.span(node), text))
        elif isinstance(node, ast.Assign | ast.Return) and isinstance(node.value, ast.IfExp):
            if isinstance(node, ast.Assign) and (
                len(node.targets) != 1 or not isinstance(node.targets[0], ast.Name)
            ):
                continue
            v = node.value
            ind = indent_of(code, pos.span(node)[0])
            head = f"{node.targets[0].id} = " if isinstance(node, ast.Assign) else "return "
            text = (
                f"if {_seg(code, pos, v.test)}:\n{ind}    {head}{_seg(code, pos, v.body)}\n"
                f"{ind}else:\n{ind}    {head}{_seg(code, pos, v.orelse)}"
            )
            sites.append((*pos.span(node), text))
    edits = _non_overlapping(_pick_sites(sites, rng))
    return apply_edits(code, edits) if edits else None


def _has_multiline_string(nodes: list[ast.stmt]) -> bool:
    for stmt in nodes:
        for n in ast.walk(stmt):
            if isinstance(n, ast.Constant | ast.JoinedStr) and n.lineno != n.end_lineno:
                return True
    return False


def early_return(code, tree, entry, rng):
    pos = Positions(code)
    sites = []
    for block in _blocks(tree):
        for i, node in enumerate(block):
            if not (isinstance(node, ast.If) and isinstance(node.body[-1], ast.Return)):
                continue
            if_col = len(indent_of(code, pos.span(node)[0]))
            if node.orelse:
                first = node.orelse[0]
                else_ln = first.lineno - 1
                else_line = code[pos.line_start(else_ln) : pos.line_end(else_ln)]
                if else_line.strip() != "else:" or _has_multiline_string(node.orelse):
                    continue
                delta = len(indent_of(code, pos.span(first)[0])) - if_col
                edits = reindent(code, pos, first.lineno, node.orelse[-1].end_lineno, -delta)
                if edits is None or delta <= 0:
                    continue
                edits.append((pos.line_start(else_ln), pos.line_end(else_ln), ""))
                sites.append(edits)
            elif i + 1 < len(block) and not _has_multiline_string(block[i + 1 :]):
                rest = block[i + 1 :]
                unit = len(_unit(code, pos, node, node.body[0]))
                if unit <= 0:
                    continue
                edits = reindent(code, pos, rest[0].lineno, rest[-1].end_lineno, unit)
                if edits is None:
                    continue
                start = pos.line_start(rest[0].lineno)
                edits.append((start, start, " " * if_col + "else:\n"))
                sites.append(edits)
    if not sites:
        return None
    return apply_edits(code, rng.choice(sites))


_MIRROR = {ast.Lt: ">", ast.Gt: "<", ast.LtE: ">=", ast.GtE: "<=", ast.Eq: "==", ast.NotEq: "!="}


def compare_mirror(code, tree, entry, rng):
    pos = Positions(code)
    sites = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _MIRROR:
            left = _paren(code, pos, node.left)
            right = _paren(code, pos, node.comparators[0])
            sites.append((*pos.span(node), f"{right} {_MIRROR[type(node.ops[0])]} {left}"))
    edits = _non_overlapping(_pick_sites(sites, rng))
    return apply_edits(code, edits) if edits else None


def range_zero(code, tree, entry, rng):
    pos = Positions(code)
    sites = []
    for node in ast.walk(tree):
        if not (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "range"
            and not node.keywords
        ):
            continue
        if (
            len(node.args) == 2
            and isinstance(node.args[0], ast.Constant)
            and node.args[0].value == 0
            and not isinstance(node.args[0].value, bool)
        ):
            sites.append((*pos.span(node), f"range({_seg(code, pos, node.args[1])})"))
        elif len(node.args) == 1 and not isinstance(node.args[0], ast.Starred):
            sites.append((*pos.span(node), f"range(0, {_seg(code, pos, node.args[0])})"))
    edits = _non_overlapping(_pick_sites(sites, rng))
    return apply_edits(code, edits) if edits else None


def bool_return(code, tree, entry, rng):
    pos = Positions(code)
    sites = []

    def const(stmt, value):
        return (
            isinstance(stmt, ast.Return)
            and isinstance(stmt.value, ast.Constant)
            and stmt.value.value is value
        )

    for block in _blocks(tree):
        for i, node in enumerate(block):
            if not (isinstance(node, ast.If) and len(node.body) == 1):
                continue
            if code[pos.span(node)[0] : pos.span(node)[0] + 4] == "elif":
                continue
            nxt = node.orelse[0] if len(node.orelse) == 1 else None
            end = pos.span(node)[1]
            if nxt is None and not node.orelse and i + 1 < len(block):
                nxt = block[i + 1]
                end = pos.span(nxt)[1]
            if nxt is None:
                continue
            test = node.test
            if const(node.body[0], True) and const(nxt, False):
                cond = _seg(code, pos, test)
                as_bool = isinstance(test, ast.Compare) or (
                    isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not)
                )
                text = f"return {cond}" if as_bool else f"return bool({cond})"
                sites.append((pos.span(node)[0], end, text))
    edits = _non_overlapping(_pick_sites(sites, rng))
    return apply_edits(code, edits) if edits else None


TRANSFORMS: dict[str, Transform] = {
    "rename_locals": rename_locals,
    "rename_params": rename_params,
    "reformat": reformat,
    "quotes": quotes,
    "aug_assign": aug_assign,
    "comprehension": comprehension,
    "ternary": ternary,
    "early_return": early_return,
    "compare_mirror": compare_mirror,
    "strip_docstring": strip_docstring,
    "range_zero": range_zero,
    "bool_return": bool_return,
}


def apply_transform(name: str, code: str, entry_point: str, rng: random.Random) -> str | None:
    """``TRANSFORMS[name]`` on ``code``; ``None`` when it does not apply or breaks the syntax."""
    tree = parse(code)
    if tree is None:
        return None
    out = TRANSFORMS[name](code, tree, entry_point, rng)
    if out is None or out == code or parse(out) is None:
        return None
    return out


def make_rewrites(
    code: str,
    entry_point: str,
    *,
    n: int,
    seed: int = 0,
    transforms: tuple[str, ...] | list[str] | None = None,
    max_transforms: int = 3,
    tries_per_rewrite: int = 6,
) -> list[tuple[str, tuple[str, ...]]]:
    """Up to ``n`` distinct rewrites of ``code``: ``(text, names of the transforms applied)``.

    Each rewrite applies 1..``max_transforms`` transforms (drawn from those that apply) in a
    random order. Every rewrite parses and differs from ``code`` and from the others (after
    stripping); none is checked for behaviour here (the sandbox does that).
    """
    names = list(transforms) if transforms is not None else list(TRANSFORMS)
    unknown = [t for t in names if t not in TRANSFORMS]
    if unknown:
        raise ValueError(f"unknown rewrite transform(s) {unknown}; known: {sorted(TRANSFORMS)}")
    rng = random.Random(seed)
    seen = {code.strip()}
    out: list[tuple[str, tuple[str, ...]]] = []
    for _ in range(n * tries_per_rewrite):
        if len(out) >= n:
            break
        k = rng.randint(1, max_transforms)
        order = rng.sample(names, len(names))
        cur, applied = code, []
        for name in order:
            if len(applied) >= k:
                break
            nxt = apply_transform(name, cur, entry_point, rng)
            if nxt is not None:
                cur, applied = nxt, applied + [name]
        key = cur.strip()
        if applied and key not in seen:
            seen.add(key)
            out.append((cur, tuple(applied)))
    return out
