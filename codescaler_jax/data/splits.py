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
