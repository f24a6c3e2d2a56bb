"""Verified RM pairs per split: split the problems first, then rewrites, mutants, sandbox, pairs.

The order matters: problems are split by the fixed rule of ``data/splits.py`` *before* anything
is generated, and every candidate inherits its problem's split, so no held-out problem is seen
in training in any form. Per problem:

1. positives: the canonical solution (``chosen_kind="canonical"``) and semantics-preserving
   rewrites of it (``data/rewrites.py``, ``chosen_kind="rewrite"``) that pass all the tests in
   the sandbox;
2. negatives: mutants of *every* positive (``make_mutants_by_kind``, spread over the mutation
   kinds), so that neither surface form is a shortcut; only mutants the sandbox shows to fail
   count (mutants that still pass are dropped and counted);
3. pairs: each positive with its own failing mutants (minimal pairs: they differ only in the
   bug), plus ``cross_pairs_per_problem`` pairs of a positive with a mutant of another positive,
   capped at ``max_pairs_per_problem`` (training problems) or ``eval_max_pairs_per_problem``
   (validation and held-out problems) by a seeded draw.

Training problems use ``train_mutant_kinds`` and ``train_mutants_per_positive`` (recipe
choices); validation and held-out problems always use every kind in ``FINE_MUTANT_KINDS`` and
``mutants_per_positive``, so the measured mix is fixed and tuning the training mix cannot
change what it is measured on. Deterministic for a seed.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

from codescaler_jax.data.mutants import FINE_MUTANT_KINDS, make_mutants_by_kind
from codescaler_jax.data.pairs import Pair
from codescaler_jax.data.problems import Problem
from codescaler_jax.data.rewrites import TRANSFORMS, make_rewrites
from codescaler_jax.data.source_edits import body_range
from codescaler_jax.data.splits import SPLITS, split_problem_ids
from codescaler_jax.data.verified import label_candidates

log = logging.getLogger("codescaler_jax")


@dataclasses.dataclass(frozen=True)
class AugmentOptions:
    """How candidates and pairs are made (see the module docstring)."""

    rewrites_per_problem: int = 3
    rewrite_candidates: int = 6  # rewrites tried per problem (sandbox-checked; best kept)
    rewrite_transforms: tuple[str, ...] = tuple(TRANSFORMS)
    mutants_per_positive: int = 9
    train_mutants_per_positive: int | None = None  # training problems (None: the same)
    train_mutant_kinds: tuple[str, ...] = FINE_MUTANT_KINDS
    max_pairs_per_problem: int = 40  # training problems
    cross_pairs_per_problem: int = 0
    eval_max_pairs_per_problem: int = 24  # validation and held-out problems (fixed)


@dataclasses.dataclass
class _Positive:
    code: str
    kind: str  # canonical | rewrite
    transforms: tuple[str, ...] = ()


def _problem_seed(seed: int, problem_id: str, what: str) -> int:
    return random.Random(f"{seed}:{problem_id}:{what}").getrandbits(32)


def build_split_pairs(
    problems: Sequence[Problem],
    *,
    held_out_fraction: float,
    validation_fraction: float,
    options: AugmentOptions = AugmentOptions(),
    seed: int = 0,
    workers: int = 2,
    time_limit_s: float = 5.0,
    progress: bool = True,
    timeout_retry_factor: float = 4.0,
) -> tuple[dict[str, list[Pair]], dict[str, Any]]:
    """``({"train": pairs, "validation": pairs, "held_out": pairs}, statistics)``."""
    for p in problems:
        if p.solution is None:
            raise ValueError(f"problem {p.problem_id} has no reference solution")
        if "entry_point" not in p.tests:
            raise ValueError(f"problem {p.problem_id} has no entry_point in its tests")
    split_of = split_problem_ids(
        [p.problem_id for p in problems],
        held_out_fraction=held_out_fraction,
        validation_fraction=validation_fraction,
    )

    # 1. positives: canonical + rewrites that pass
    tried: list[list[tuple[str, str, tuple[str, ...]]]] = []
    for p in problems:
        rws = make_rewrites(
            p.solution,
            p.tests["entry_point"],
            n=options.rewrite_candidates if options.rewrites_per_problem else 0,
            seed=_problem_seed(seed, p.problem_id, "rewrites"),
            transforms=options.rewrite_transforms,
        )
        tried.append([(p.solution, "canonical", ())] + [(c, "rewrite", t) for c, t in rws])
    labels = label_candidates(
        problems,
        [[(c, k) for c, k, _ in cands] for cands in tried],
        workers=workers,
        time_limit_s=time_limit_s,
        progress=progress,
        timeout_retry_factor=timeout_retry_factor,
    )
    stats: dict[str, Any] = {"problems": {s: 0 for s in SPLITS}}
    counts: Counter[str] = Counter()
    transform_counts: Counter[str] = Counter()
    positives: list[list[_Positive]] = []
    li = iter(labels)
    for p, cands in zip(problems, tried):
        stats["problems"][split_of[p.problem_id]] += 1
        kept: list[_Positive] = []
        for code, kind, transforms in cands:
            res = next(li)
            counts[f"{kind}_tried"] += 1
            if not res.passed:
                counts[f"{kind}_failed"] += 1
                continue
            if kind == "rewrite" and len(kept) - 1 >= options.rewrites_per_problem:
                continue
            kept.append(_Positive(code, kind, transforms))
            counts[f"{kind}_kept"] += 1
            transform_counts.update(transforms)
        positives.append(kept)

    # 2. negatives: mutants of every positive
    mut_cands, owners = [], []
    for p, kept in zip(problems, positives):
        train = split_of[p.problem_id] == "train"
        kinds = options.train_mutant_kinds if train else FINE_MUTANT_KINDS
        n_mutants = options.mutants_per_positive
        if train and options.train_mutants_per_positive is not None:
            n_mutants = options.train_mutants_per_positive
        cands, own = [], []
        for i, pos in enumerate(kept):
            rng = body_range(pos.code, p.tests["entry_point"])
            lo, hi = rng if rng is not None else (0, len(pos.code))
            for m, kind in make_mutants_by_kind(
                pos.code,
                n=n_mutants,
                kinds=kinds,
                seed=_problem_seed(seed, p.problem_id, f"mutants{i}"),
                lo=lo,
                hi=hi,
            ):
                cands.append((m, kind))
                own.append(i)
        mut_cands.append(cands)
        owners.append(own)
    mlabels = label_candidates(
        problems, mut_cands, workers=workers, time_limit_s=time_limit_s, progress=progress,
        timeout_retry_factor=timeout_retry_factor,
    )

    # 3. pairs
    out: dict[str, list[Pair]] = {s: [] for s in SPLITS}
    mutant_counts: dict[str, Counter[str]] = {s: Counter() for s in SPLITS}
    li = iter(mlabels)
    for p, kept, cands, own in zip(problems, positives, mut_cands, owners):
        split = split_of[p.problem_id]
        negs: list[tuple[int, str, str]] = []
        for (code, kind), parent in zip(cands, own):
            res = next(li)
            mutant_counts[split][f"{kind}/{'failing' if not res.passed else 'passing'}"] += 1
            if not res.passed:
                negs.append((parent, code, kind))
        rng = random.Random(_problem_seed(seed, p.problem_id, "pairs"))
        pairs = [
            Pair(
                p.prompt,
                kept[parent].code,
                code,
                p.problem_id,
                kind=kind,
                chosen_kind=kept[parent].kind,
            )
            for parent, code, kind in negs
        ]
        cross = [(i, n) for i in range(len(kept)) for n in negs if n[0] != i]
        rng.shuffle(cross)
        # cross pairs only for training: the measured sets are minimal pairs
        n_cross = options.cross_pairs_per_problem if split == "train" else 0
        for i, (_, code, kind) in cross[:n_cross]:
            pairs.append(
                Pair(
                    p.prompt, kept[i].code, code, p.problem_id, kind=kind, chosen_kind=kept[i].kind
                )
            )
        seen, unique = set(), []
        for pr in pairs:
            key = (pr.chosen.strip(), pr.rejected.strip())
            if key not in seen and key[0] != key[1]:
                seen.add(key)
                unique.append(pr)
        rng.shuffle(unique)
        cap = (
            options.max_pairs_per_problem
            if split == "train"
            else options.eval_max_pairs_per_problem
        )
        if len(unique) > cap:
            counts["pairs_over_cap"] += len(unique) - cap
            unique = unique[:cap]
        out[split].extend(unique)

    stats["candidates"] = dict(counts)
    stats["rewrite_transforms"] = dict(sorted(transform_counts.items()))
    stats["mutants"] = {s: dict(sorted(c.items())) for s, c in mutant_counts.items()}
    stats["pairs"] = {s: len(v) for s, v in out.items()}
    stats["pairs_by_kind"] = {
        s: dict(sorted(Counter(pr.kind for pr in v).items())) for s, v in out.items()
    }
    stats["pairs_by_positive"] = {
        s: dict(sorted(Counter(pr.chosen_kind for pr in v).items())) for s, v in out.items()
    }
    stats["split_rule"] = {
        "held_out_fraction": held_out_fraction,
        "validation_fraction": validation_fraction,
        "held_out_ids": sorted(k for k, v in split_of.items() if v == "held_out"),
        "validation_ids": sorted(k for k, v in split_of.items() if v == "validation"),
    }
    log.info("augmented pairs: %s; candidates %s", stats["pairs"], stats["candidates"])
    return out, stats
