"""Train / validation / held-out split of problems by a fixed rule, before any data is made.

The rule: rank the problem ids by ``sha256(SPLIT_SALT + id)``; the first
``round(held_out_fraction * n)`` are held out, the next ``round(validation_fraction * n)`` are
the validation split, the rest are trained on. It does not depend on the training seed, on
the data built from the problems or on any result, so the held-out problems cannot be chosen
to flatter a model; everything derived from a problem (rewrites, mutants, pairs, SFT
examples) inherits its problem's split.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

SPLIT_SALT = "codescaler-jax/problem-split/v1:"
SPLITS = ("train", "validation", "held_out")


def problem_rank_key(problem_id: str) -> str:
    return hashlib.sha256((SPLIT_SALT + problem_id).encode("utf-8")).hexdigest()


def split_problem_ids(
    ids: Iterable[str], *, held_out_fraction: float, validation_fraction: float = 0.0
) -> dict[str, str]:
    """``{problem_id: "train" | "validation" | "held_out"}`` by the fixed hash rule."""
    if not 0.0 <= held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in [0, 1), got {held_out_fraction}")
    if not 0.0 <= validation_fraction < 1.0 - held_out_fraction:
        raise ValueError(
            f"validation_fraction must be in [0, {1.0 - held_out_fraction}), "
            f"got {validation_fraction}"
        )
    ranked = sorted(set(ids), key=problem_rank_key)
    n = len(ranked)
    n_held = int(round(held_out_fraction * n))
    n_val = int(round(validation_fraction * n))
    out = {}
    for i, pid in enumerate(ranked):
        out[pid] = "held_out" if i < n_held else "validation" if i < n_held + n_val else "train"
    return out


def held_out_needles(problem) -> list[tuple[str, str]]:
    """``(what, text)`` pieces of a held-out problem that no training text may contain: its
    prompt, the entry point's docstring, the canonical solution and its body."""
    from codescaler_jax.data.source_edits import body_range, find_function, parse

    out = [("prompt", problem.prompt.strip())]
    sol = problem.solution or ""
    if sol.strip():
        out.append(("solution", sol.strip()))
        tree = parse(sol)
        entry = problem.tests.get("entry_point", "") if isinstance(problem.tests, dict) else ""
        func = find_function(tree, entry) if tree is not None and entry else None
        doc = func is not None and ast_docstring(func)
        if doc and len(doc.strip()) >= 20:
            out.append(("docstring", doc.strip()))
        rng = body_range(sol, entry) if entry else None
        if rng is not None and len(sol[rng[0] : rng[1]].strip()) >= 40:
            out.append(("solution body", sol[rng[0] : rng[1]].strip()))
    return [(w, t) for w, t in out if t]


def ast_docstring(func) -> str | None:
    import ast

    return ast.get_docstring(func, clean=False)


def find_leaks(
    held_out: Iterable,
    records: Iterable[tuple[str, str, Iterable[str]]],
    *,
    held_out_texts: Iterable[str] = (),
) -> list[str]:
    """Every way a held-out problem shows up in training data, as readable lines (empty: none).

    ``held_out``: the held-out ``Problem``s. ``records``: ``(where, problem_id, texts)`` for each
    training or validation item (a pair's problem / chosen / rejected text, a rewrite, an SFT
    prompt and response). ``held_out_texts``: further held-out texts (its rewrites and
    mutants) that must not appear verbatim. A record leaks when its id is a held-out id, or
    one of its texts contains a held-out prompt, docstring or solution, or equals a held-out
    text.
    """
    held = list(held_out)
    ids = {p.problem_id for p in held}
    needles = [(p.problem_id, w, t) for p in held for w, t in held_out_needles(p)]
    exact = {t.strip() for t in held_out_texts if t.strip()}
    out = []
    for where, pid, texts in records:
        if pid in ids:
            out.append(f"{where}: problem id {pid} is held out")
        for text in texts:
            if text.strip() in exact:
                out.append(f"{where}: a held-out candidate text appears verbatim")
            for hid, what, needle in needles:
                if needle in text:
                    out.append(f"{where}: contains the {what} of held-out {hid}")
    return out
