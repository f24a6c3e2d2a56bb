"""Labelled candidate solutions of a split's problems: sandbox-checked rewrites and mutants.

Two users:

- best-of-N on the held-out problems (``best_of_n --held-out-candidates``): per problem ``n``
  fenced responses, ``passing`` of them passing positives (the canonical solution and
  semantics-preserving rewrites of it, ``data/rewrites.py``) and the rest failing mutants of
  those positives (``data/mutants.py``, every kind in ``FINE_MUTANT_KINDS``), shuffled, each
  with the pass/fail label the sandbox gave it;
- the SFT warm start (``sft/data.py``): the passing positives of the training problems.

The split is the fixed hash rule of ``data/splits.py`` over *all* problems given, so a
problem's split does not depend on which subset a caller asks for. Deterministic for a seed.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

from codescaler_jax.data.mutants import FINE_MUTANT_KINDS, make_mutants_by_kind
from codescaler_jax.data.problems import Problem
from codescaler_jax.data.rewrites import apply_transform, make_rewrites
from codescaler_jax.data.source_edits import body_range
from codescaler_jax.data.splits import split_problem_ids
from codescaler_jax.data.verified import label_candidates


def fence(code: str) -> str:
    """A response holding ``code`` in one ```python block (what the extractors read)."""
    return "```python\n" + code.strip("\n") + "\n```"


def problems_of_split(
    problems: Sequence[Problem], split: str, *, held_out_fraction: float,
    validation_fraction: float,
) -> list[Problem]:
    """The problems of ``split`` (``train`` / ``validation`` / ``held_out``), in input order."""
    split_of = split_problem_ids([p.problem_id for p in problems],
                                 held_out_fraction=held_out_fraction,
                                 validation_fraction=validation_fraction)
    return [p for p in problems if split_of[p.problem_id] == split]


def _seed(seed: int, pid: str, what: str) -> int:
    return random.Random(f"{seed}:{pid}:{what}").getrandbits(32)


@dataclasses.dataclass(frozen=True)
class Positive:
    """A passing solution: ``kind`` is ``canonical`` or ``rewrite``."""

    problem_id: str
    code: str
    kind: str


def passing_positives(
    problems: Sequence[Problem], *, rewrites: int, rewrite_candidates: int, seed: int = 0,
    strip_docstring: bool = False, workers: int = 2, time_limit_s: float = 5.0,
    progress: bool = False,
) -> list[list[Positive]]:
    """Per problem: its canonical solution and up to ``rewrites`` rewrites of it, all passing.

    ``strip_docstring``: drop the entry point's docstring from every candidate first (the
    problem text already holds it; the SFT responses stay short). Candidates are checked in the
    sandbox and only passing ones are kept (the canonical one may be dropped too).
    """
    tried: list[list[tuple[str, str]]] = []
    for p in problems:
        entry = p.tests["entry_point"]
        base = p.solution or ""
        cands = [(base, "canonical")] + [
            (c, "rewrite") for c, _ in make_rewrites(
                base, entry, n=rewrite_candidates if rewrites else 0,
                seed=_seed(seed, p.problem_id, "rewrites"))
        ]
        if strip_docstring:
            rng = random.Random(_seed(seed, p.problem_id, "strip"))
            cands = [(apply_transform("strip_docstring", c, entry, rng) or c, k) for c, k in cands]
        seen, uniq = set(), []
        for c, k in cands:
            if c.strip() not in seen:
                seen.add(c.strip())
                uniq.append((c, k))
        tried.append(uniq)
    labels = iter(label_candidates(problems, tried, workers=workers, time_limit_s=time_limit_s,
                                   progress=progress))
    out = []
    for p, cands in zip(problems, tried, strict=True):
        kept: list[Positive] = []
        for code, kind in cands:
            res = next(labels)
            if res.passed and (kind == "canonical" or
                               sum(k.kind == "rewrite" for k in kept) < rewrites):
                kept.append(Positive(p.problem_id, code, kind))
        out.append(kept)
    return out


@dataclasses.dataclass
class CandidateSet:
    """Best-of-N candidates: ``problems[i]`` has ``responses[i]`` (``n`` fenced programs) with
    ``passed[i]`` labels and ``kinds[i]`` (``canonical``/``rewrite``/a mutant kind)."""

    problems: list[Problem]
    responses: list[list[str]]
    passed: list[list[bool]]
    kinds: list[list[str]]
    stats: dict[str, Any]


def best_of_n_candidates(
    problems: Sequence[Problem], *, n: int = 8, passing: int = 2, rewrites: int = 3,
    rewrite_candidates: int = 4, mutants_per_positive: int = 6, seed: int = 0,
    workers: int = 2, time_limit_s: float = 5.0, progress: bool = False,
) -> CandidateSet:
    """``n`` labelled candidates per problem: up to ``passing`` passing positives, the rest
    failing mutants of them (a problem with too few failing mutants is skipped and counted).

    The passing ones are drawn from the canonical solution and its rewrites, so the canonical
    wording is no tell; the failing ones are spread over the positives they mutate.
    """
    if not 1 <= passing < n:
        raise ValueError(f"need 1 <= passing < n, got passing={passing}, n={n}")
    positives = passing_positives(problems, rewrites=rewrites,
                                  rewrite_candidates=rewrite_candidates, seed=seed,
                                  workers=workers, time_limit_s=time_limit_s, progress=progress)
    mut: list[list[tuple[str, str]]] = []
    for p, kept in zip(problems, positives, strict=True):
        cands = []
        for i, pos in enumerate(kept):
            lo, hi = body_range(pos.code, p.tests["entry_point"]) or (0, len(pos.code))
            cands += make_mutants_by_kind(pos.code, n=mutants_per_positive,
                                          kinds=FINE_MUTANT_KINDS,
                                          seed=_seed(seed, p.problem_id, f"mutants{i}"),
                                          lo=lo, hi=hi)
        mut.append(cands)
    labels = iter(label_candidates(problems, mut, workers=workers, time_limit_s=time_limit_s,
                                   progress=progress))
    out = CandidateSet([], [], [], [], {})
    skipped: Counter[str] = Counter()
    kind_counts: Counter[str] = Counter()
    for p, kept, cands in zip(problems, positives, mut, strict=True):
        failing = [(c, k) for c, k in cands if not next(labels).passed]
        rng = random.Random(_seed(seed, p.problem_id, "best_of_n"))
        if not kept:
            skipped["no_passing_solution"] += 1
            continue
        pos = rng.sample(kept, min(passing, len(kept)))
        need = n - len(pos)
        if len(failing) < need:
            skipped["too_few_failing_mutants"] += 1
            continue
        neg = rng.sample(failing, need)
        rows = [(x.code, True, x.kind) for x in pos] + [(c, False, k) for c, k in neg]
        rng.shuffle(rows)
        out.problems.append(p)
        out.responses.append([fence(c) for c, _, _ in rows])
        out.passed.append([ok for _, ok, _ in rows])
        out.kinds.append([k for _, _, k in rows])
        kind_counts.update(k for _, _, k in rows)
    out.stats = {"problems_in": len(problems), "problems_used": len(out.problems),
                 "skipped": dict(skipped), "n": n, "passing_per_problem": passing,
                 "candidate_kinds": dict(sorted(kind_counts.items()))}
    return out
