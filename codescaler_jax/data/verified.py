"""Verified preference data: run candidate solutions in the sandbox, label pass/fail, pair them.

A candidate passes when it passes *all* of its problem's tests; it fails when any test fails
(the reference's labels). The embedded default builds candidates from the bundled HumanEval
problems: the canonical solution, and mutants of it (single-token edits of the body).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from tqdm.auto import tqdm

from codescaler_jax.data.mutants import make_mutants_with_kinds
from codescaler_jax.data.pairs import Candidate, Pair, PairStats, build_pairs
from codescaler_jax.data.problems import Problem

log = logging.getLogger("codescaler_jax")


def label_candidates(
    problems: Sequence[Problem],
    codes: Sequence[Sequence[str | tuple[str, str]]],
    *,
    workers: int = 2,
    time_limit_s: float = 5.0,
    progress: bool = True,
    timeout_retry_factor: float = 4.0,
) -> list[Candidate]:
    """Run ``codes[i]`` (candidates of ``problems[i]``: code strings or ``(code, kind)``)
    against that problem's tests.

    A candidate that timed out is run once more with ``timeout_retry_factor`` times the
    limit (1: never): a correct but slow program (e.g. a quadratic list build) near the limit
    would otherwise pass or fail with the machine's load, and the same seed would build other
    pairs; a program that never ends times out again."""
    from codescaler_jax.code.sandbox import Sandbox, SandboxConfig, tests_from_record

    items, owners = [], []
    for prob, cands in zip(problems, codes, strict=True):
        tests = tests_from_record(prob.tests)
        for cand in cands:
            code, kind = (cand, "") if isinstance(cand, str) else cand
            items.append((code, tests))
            owners.append((prob, code, kind))
    cfg = SandboxConfig(time_limit_s=time_limit_s, workers=workers, stop_on_first_failure=True)
    results = []
    bar = tqdm(total=len(items), desc="sandbox", unit="program", disable=not progress, leave=False)
    with Sandbox(cfg) as sandbox:
        for start in range(0, len(items), 64):
            results.extend(sandbox.run_many(items[start : start + 64]))
            bar.update(min(64, len(items) - start))
    bar.close()
    retry = [i for i, r in enumerate(results) if not r.passed and r.status == "timeout"]
    if retry and timeout_retry_factor > 1:
        slow = SandboxConfig(time_limit_s=time_limit_s * timeout_retry_factor, workers=workers,
                             stop_on_first_failure=True)
        with Sandbox(slow) as sandbox:
            for i, res in zip(retry, sandbox.run_many([items[i] for i in retry]), strict=True):
                results[i] = res
    return [
        Candidate(prob.problem_id, prob.prompt, code, bool(res.passed), kind)
        for (prob, code, kind), res in zip(owners, results, strict=True)
    ]


def humaneval_candidates_with_kinds(
    problems: Sequence[Problem],
    *,
    mutants_per_problem: int,
    seed: int = 0,
    line_fraction: float = 0.25,
) -> list[list[tuple[str, str]]]:
    """Per problem: ``(code, kind)`` of the reference solution (kind ``reference``) followed
    by up to ``mutants_per_problem`` mutants edited only inside the body (the signature and
    docstring stay as given)."""
    out = []
    for i, p in enumerate(problems):
        if p.solution is None:
            raise ValueError(f"problem {p.problem_id} has no reference solution to mutate")
        lo = len(p.stub) if p.solution.startswith(p.stub) else 0
        out.append(
            [(p.solution, "reference")]
            + make_mutants_with_kinds(
                p.solution,
                n=mutants_per_problem,
                seed=seed + i,
                lo=lo,
                line_fraction=line_fraction,
            )
        )
    return out


def humaneval_candidates(
    problems: Sequence[Problem],
    *,
    mutants_per_problem: int,
    seed: int = 0,
    line_fraction: float = 0.25,
) -> list[list[str]]:
    """The codes of ``humaneval_candidates_with_kinds`` (reference solution first)."""
    return [
        [code for code, _ in cands]
        for cands in humaneval_candidates_with_kinds(
            problems,
            mutants_per_problem=mutants_per_problem,
            seed=seed,
            line_fraction=line_fraction,
        )
    ]


def verified_pairs(
    problems: Sequence[Problem],
    *,
    mutants_per_problem: int = 8,
    line_mutant_fraction: float = 0.25,
    max_pairs_per_problem: int = 16,
    unaligned_fraction: float = 0.0,
    workers: int = 2,
    time_limit_s: float = 5.0,
    seed: int = 0,
    progress: bool = True,
    timeout_retry_factor: float = 4.0,
) -> tuple[list[Pair], PairStats]:
    """Candidates -> sandbox labels -> within-problem pairs, with statistics."""
    codes = humaneval_candidates_with_kinds(
        problems,
        mutants_per_problem=mutants_per_problem,
        seed=seed,
        line_fraction=line_mutant_fraction,
    )
    cands = label_candidates(
        problems, codes, workers=workers, time_limit_s=time_limit_s, progress=progress,
        timeout_retry_factor=timeout_retry_factor,
    )
    return build_pairs(
        cands,
        max_pairs_per_problem=max_pairs_per_problem,
        unaligned_fraction=unaligned_fraction,
        seed=seed,
    )
