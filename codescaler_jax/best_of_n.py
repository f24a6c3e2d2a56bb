"""Best-of-N selection with the reward model: ``python -m codescaler_jax.best_of_n``.

    python -m codescaler_jax.best_of_n --rm runs/rm --problems humaneval --candidates cands.jsonl
    python -m codescaler_jax.best_of_n --rm runs/rm --problems lcb.jsonl --policy runs/grpo/hf --n 8
    python -m codescaler_jax.best_of_n --rm runs/rm_tiny --problems humaneval --held-out-candidates

``--held-out-candidates`` (the step after ``train_rm`` in the README) builds the candidates
itself, on the held-out problems of the RM's fixed hash split (``data/splits.py``; fractions
``--held-out-fraction`` / ``--validation-fraction``, rm_tiny's by default): per problem N = 8
fenced programs, ``--passing`` of them passing (the canonical solution and sandbox-checked
rewrites of it) and the rest failing mutants of those, each with a known label
(``data/candidates.py``). The summary then also gives ``rm_minus_random`` (the bar: >= 0.15).

For each problem, N candidate responses (read from ``--candidates``, lines
``{"problem_id", "responses": [...]}``, or sampled from ``--policy`` with our sampler), the code of
each by the training extractor (exactly one fenced block that parses; recipe section 6), one RM
score per candidate with code (batched over all problems), and the argmax picked. Candidates
without code rank below every candidate with code (they would get reward 0 after shaping, below
every softplus reward); among themselves the first wins. Ties go to the earlier candidate.

When the problems have tests, every candidate is also run in the sandbox (evaluation extractor:
the last fenced block; 2 s per test) and the report gives, side by side:

- the pass rate of the RM's pick;
- a random pick (its exact expectation: the mean pass rate of the candidates);
- the oracle (some candidate passes);
- selection by running the tests: the first candidate that passes all of them, else the one that
  passes the most before its first failure. With the evaluation's own tests this selector equals
  the oracle; it is the upper bound of unit-test selection (the paper's baseline generates its
  tests with a model, which only adds latency), so the comparison that matters is time;
- wall times, measured in the same run: RM selection (extraction + tokenization + forward passes
  + argmax), once cold (including XLA compilation) and once warm, beside executing the tests of
  all N candidates on ``--workers`` sandbox workers (already started).

Writes ``<out-dir>/picks.jsonl`` (per problem: scores, validity, pass flags, both picks) and
``<out-dir>/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from codescaler_jax.cli import guarded, positive_float, positive_int
from codescaler_jax.eval.problem_formats import FORMATS, TEMPLATES

_F32 = jnp.finfo(jnp.float32)


@jax.jit
def select_best(scores: jax.Array, valid: jax.Array) -> jax.Array:
    """Index ``[P]`` int32 of the best candidate of each problem.

    Args:
        scores: ``[P, N]`` RM scores (anything for invalid candidates).
        valid: ``[P, N]`` bool, True where the candidate has code. Pad problems with fewer than
            N candidates with ``valid=False``.

    A valid candidate always beats an invalid one (NaN / -inf scores of valid candidates count as
    the lowest finite score, still above invalid); ties go to the lowest index; a problem with no
    valid candidate gets index 0.
    """
    s = jnp.nan_to_num(jnp.asarray(scores, jnp.float32), nan=_F32.min, posinf=_F32.max,
                       neginf=_F32.min)
    key = jnp.where(jnp.asarray(valid, bool), s, -jnp.inf)
    return jnp.argmax(key, axis=-1).astype(jnp.int32)


def select_by_tests(all_passed: np.ndarray, tests_passed: np.ndarray) -> np.ndarray:
    """Index ``[P]`` of the first candidate passing all tests, else of the first with the most
    passing tests. ``all_passed [P, N]`` bool, ``tests_passed [P, N]`` int (-1 for padding)."""
    key = np.where(all_passed, np.iinfo(np.int32).max, tests_passed.astype(np.int64))
    return np.argmax(key, axis=-1).astype(np.int32)


def selection_metrics(
    passed: np.ndarray, present: np.ndarray, rm_pick: np.ndarray, test_pick: np.ndarray
) -> dict[str, float]:
    """Pass rates over problems: RM pick, random pick (expected), oracle, test pick.

    ``passed``/``present``: ``[P, N]`` bool (``present`` marks real, non-padding candidates).
    """
    rows = np.arange(passed.shape[0])
    per_problem_random = (passed & present).sum(-1) / np.maximum(present.sum(-1), 1)
    return {
        "rm_pick": float(passed[rows, rm_pick].mean()),
        "random_pick": float(per_problem_random.mean()),
        "oracle": float((passed & present).any(-1).mean()),
        "test_pick": float(passed[rows, test_pick].mean()),
    }


def pad_candidates(responses: Sequence[Sequence[str]]) -> tuple[list[list[str]], np.ndarray]:
    """Responses padded to the largest N with "" and the ``present [P, N]`` mask."""
    n = max(len(r) for r in responses)
    present = np.zeros((len(responses), n), bool)
    out = []
    for i, rs in enumerate(responses):
        present[i, : len(rs)] = True
        out.append(list(rs) + [""] * (n - len(rs)))
    return out, present


def rm_select(
    scorer, problems: Sequence[str], responses: Sequence[Sequence[str]], present: np.ndarray
) -> dict[str, Any]:
    """RM best-of-N over padded ``responses [P][N]``: extraction, scoring, argmax, timed.

    Returns ``picks [P]``, ``scores [P, N]`` (0 where no code), ``valid [P, N]``, ``codes``,
    ``reasons``, ``tokens`` (RM input tokens scored) and ``seconds`` (wall time of the whole
    selection).
    """
    from codescaler_jax.code.extract import extract_code

    t0 = time.perf_counter()
    p, n = present.shape
    valid = np.zeros((p, n), bool)
    codes, reasons = [], []
    for i in range(p):
        row_c, row_r = [], []
        for j in range(n):
            ext = extract_code(responses[i][j], mode="train") if present[i, j] else None
            row_c.append(ext.code if ext else "")
            row_r.append(ext.reason if ext else "absent")
            valid[i, j] = bool(ext and ext.valid)
        codes.append(row_c)
        reasons.append(row_r)
    idx = np.argwhere(valid)
    scores = np.zeros((p, n), np.float32)
    tokens = 0
    if len(idx):
        seqs = scorer.encode([problems[i] for i, _ in idx], [codes[i][j] for i, j in idx])
        tokens = sum(len(s) for s in seqs)
        scores[idx[:, 0], idx[:, 1]] = scorer.score_ids(seqs)
    picks = np.asarray(jax.device_get(select_best(scores, valid)))
    return {
        "picks": picks,
        "scores": scores,
        "valid": valid,
        "codes": codes,
        "reasons": reasons,
        "tokens": tokens,
        "seconds": time.perf_counter() - t0,
    }


def execute_candidates(
    problems, responses: Sequence[Sequence[str]], present: np.ndarray, *,
    time_limit_s: float = 2.0, memory_mb: int = 1024, workers: int = 2,
) -> dict[str, Any]:
    """Run every candidate's code (evaluation extractor) against its problem's tests.

    The sandbox workers are started (one trivial program each) before the clock starts, so the
    time is the execution of the candidates only. Returns ``passed [P, N]``, ``tests_passed
    [P, N]`` (-1 for padding), ``statuses`` and ``seconds``.
    """
    from codescaler_jax.code.extract import extract_code
    from codescaler_jax.code.sandbox import Sandbox, SandboxConfig, tests_from_record

    p, n = present.shape
    specs = [tests_from_record(pr.tests) for pr in problems]
    passed = np.zeros((p, n), bool)
    tests_passed = np.full((p, n), -1, np.int64)
    statuses = [["absent"] * n for _ in range(p)]
    cfg = SandboxConfig(
        time_limit_s=time_limit_s, memory_mb=memory_mb, workers=workers,
        stop_on_first_failure=True,
    )
    with Sandbox(cfg) as sandbox:
        sandbox.run_many([("print(1)", tests_from_record({"inputs": [""], "outputs": ["1"]}))]
                         * workers)
        t0 = time.perf_counter()
        items, where = [], []
        for i in range(p):
            for j in range(n):
                if not present[i, j]:
                    continue
                code = extract_code(responses[i][j], mode="eval").code
                if code.strip():
                    items.append((code, specs[i]))
                    where.append((i, j))
                else:
                    tests_passed[i, j] = 0
                    statuses[i][j] = "no_code"
        results = sandbox.run_many(items) if items else []
        seconds = time.perf_counter() - t0
    for (i, j), res in zip(where, results, strict=True):
        passed[i, j] = res.passed
        tests_passed[i, j] = sum(t.status == "passed" for t in res.tests)
        statuses[i][j] = res.status
    return {"passed": passed, "tests_passed": tests_passed, "statuses": statuses,
            "seconds": seconds}


def best_of_n(
    scorer,
    problems,
    responses: Sequence[Sequence[str]],
    *,
    run_tests: bool = True,
    time_limit_s: float = 2.0,
    workers: int = 2,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The whole comparison; returns per-problem records and the summary."""
    padded, present = pad_candidates(responses)
    texts = [p.prompt for p in problems]
    cold = rm_select(scorer, texts, padded, present)
    warm = rm_select(scorer, texts, padded, present)
    if not np.array_equal(cold["picks"], warm["picks"]):
        raise RuntimeError("RM picks differ between two identical runs")
    n_valid = int(warm["valid"].sum())
    summary: dict[str, Any] = {
        "problems": len(problems),
        "candidates": int(present.sum()),
        "n": int(present.shape[1]),
        "candidates_with_code": n_valid,
        "rm_tokens": warm["tokens"],
        "rm_seconds_cold": cold["seconds"],
        "rm_seconds_warm": warm["seconds"],
    }
    records = [
        {
            "problem_id": p.problem_id,
            "rm_pick": int(warm["picks"][i]),
            "rm_scores": [float(x) for x in warm["scores"][i][present[i]]],
            "valid": [bool(x) for x in warm["valid"][i][present[i]]],
            "reasons": [r for r, ok in zip(warm["reasons"][i], present[i]) if ok],
        }
        for i, p in enumerate(problems)
    ]
    if run_tests:
        ex = execute_candidates(problems, padded, present, time_limit_s=time_limit_s,
                                workers=workers)
        test_pick = select_by_tests(ex["passed"], ex["tests_passed"])
        summary["pass_rate"] = selection_metrics(ex["passed"], present, warm["picks"], test_pick)
        summary["test_seconds"] = ex["seconds"]
        summary["sandbox_workers"] = workers
        summary["speedup_vs_tests_warm"] = ex["seconds"] / max(warm["seconds"], 1e-9)
        summary["speedup_vs_tests_cold"] = ex["seconds"] / max(cold["seconds"], 1e-9)
        for i, rec in enumerate(records):
            rec["passed"] = [bool(x) for x in ex["passed"][i][present[i]]]
            rec["statuses"] = [s for s, ok in zip(ex["statuses"][i], present[i]) if ok]
            rec["test_pick"] = int(test_pick[i])
    return records, summary


def add_known_labels(summary: dict[str, Any], records: list[dict[str, Any]], cands) -> None:
    """Attach the build-time labels of ``data.candidates.CandidateSet`` ``cands``: per record
    its candidate kinds, in the summary ``rm_minus_random`` and ``label_mismatches`` (candidates
    whose pass/fail in this run differs from the label they were built with: 0 unless a test
    is flaky or timed out under load)."""
    mismatches = 0
    for rec, kinds, known in zip(records, cands.kinds, cands.passed, strict=True):
        rec["kinds"] = kinds
        rec["known_passed"] = known
        if "passed" in rec:
            mismatches += sum(a != b for a, b in zip(rec["passed"], known, strict=True))
    summary["candidate_set"] = cands.stats
    summary["label_mismatches"] = mismatches
    pr = summary.get("pass_rate")
    if pr:
        summary["rm_minus_random"] = pr["rm_pick"] - pr["random_pick"]


def format_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"{summary['problems']} problems x N={summary['n']} "
        f"({summary['candidates']} candidates, {summary['candidates_with_code']} with code)",
        f"{'selector':<24} {'pass rate':>10} {'wall s':>9}",
    ]
    pr = summary.get("pass_rate", {})

    def row(name: str, key: str | None, secs: float | None) -> str:
        rate = f"{100 * pr[key]:>9.1f}%" if key and key in pr else f"{'-':>10}"
        t = f"{secs:>9.2f}" if secs is not None else f"{'-':>9}"
        return f"{name:<24} {rate} {t}"

    lines.append(row("RM (cold, with compile)", "rm_pick", summary["rm_seconds_cold"]))
    lines.append(row("RM (warm)", "rm_pick", summary["rm_seconds_warm"]))
    if pr:
        lines.append(row("run all tests", "test_pick", summary["test_seconds"]))
        lines.append(row("random pick (expected)", "random_pick", None))
        lines.append(row("oracle", "oracle", None))
        if "rm_minus_random" in summary:
            lines.append(f"RM pick - random pick: {100 * summary['rm_minus_random']:+.1f} points")
        lines.append(
            f"RM selection is {summary['speedup_vs_tests_warm']:.1f}x faster than running the "
            f"tests (warm; {summary['speedup_vs_tests_cold']:.1f}x cold)"
        )
    return "\n".join(lines)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m codescaler_jax.best_of_n",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--rm", required=True, help="HF RM directory or train_rm run directory")
    p.add_argument("--problems", required=True, help="'humaneval' or a problem file")
    p.add_argument("--format", default="auto", choices=FORMATS,
                   help="problem format (default: per record)")
    p.add_argument("--template", default="auto", choices=TEMPLATES,
                   help="prompt template: auto, raw or lcb")
    p.add_argument("--limit", type=positive_int, default=None, help="first N problems only")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--candidates", help="JSONL {problem_id, responses: [...]} per problem")
    src.add_argument("--policy", help="HF policy directory to sample N candidates from")
    src.add_argument("--held-out-candidates", action="store_true",
                     help="build N labelled candidates (rewrites + mutants) per held-out problem")
    p.add_argument("--held-out-fraction", type=float, default=0.2,
                   help="held-out fraction of the split rule (rm_tiny: 0.2)")
    p.add_argument("--validation-fraction", type=float, default=0.15,
                   help="validation fraction of the split rule (rm_tiny: 0.15)")
    p.add_argument("--passing", type=positive_int, default=2,
                   help="passing candidates among the N (with --held-out-candidates)")
    p.add_argument("--n", type=positive_int, default=8,
                   help="candidates per problem (with --policy)")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--max-new-tokens", type=positive_int, default=16384)
    p.add_argument("--max-prompt-len", type=positive_int, default=4096)
    p.add_argument("--sample-batch-size", type=positive_int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-length", type=positive_int, default=4096, help="RM input truncation")
    p.add_argument("--batch-size", type=positive_int, default=16, help="RM rows per forward pass")
    p.add_argument("--no-tests", action="store_true", help="RM selection only, no execution")
    p.add_argument("--time-limit", type=positive_float, default=2.0, help="seconds per test")
    p.add_argument("--workers", type=positive_int, default=2, help="sandbox workers")
    p.add_argument("--out-dir", default="best_of_n", help="picks.jsonl + summary.json")
    return p.parse_args(argv)


@guarded
def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    from codescaler_jax.eval.codegen import read_samples
    from codescaler_jax.eval.problem_formats import load_problems
    from codescaler_jax.rm.scorer import RewardScorer

    problems, _ = load_problems(args.problems, fmt=args.format, template=args.template,
                                limit=args.limit)
    labels = None
    if args.held_out_candidates:
        from codescaler_jax.data.candidates import best_of_n_candidates, problems_of_split

        held = problems_of_split(problems, "held_out", held_out_fraction=args.held_out_fraction,
                                 validation_fraction=args.validation_fraction)
        cands = best_of_n_candidates(held, n=args.n, passing=args.passing, seed=args.seed,
                                     workers=args.workers)
        problems, responses, labels = cands.problems, cands.responses, cands
    elif args.candidates:
        responses = read_samples(args.candidates, problems)
    else:
        from codescaler_jax.eval.sampling import SampleSettings, sample_responses

        settings = SampleSettings(
            n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
            max_new_tokens=args.max_new_tokens, max_prompt_len=args.max_prompt_len,
            batch_size=args.sample_batch_size, seed=args.seed,
        )
        responses = sample_responses(args.policy, [p.prompt for p in problems], settings)
    scorer = RewardScorer.from_pretrained(args.rm, max_length=args.max_length,
                                          batch_size=args.batch_size)
    run_tests = not args.no_tests and all(p.tests for p in problems)
    records, summary = best_of_n(scorer, problems, responses, run_tests=run_tests,
                                 time_limit_s=args.time_limit, workers=args.workers)
    for rec, rs in zip(records, responses):
        rec["picked_response"] = rs[rec["rm_pick"]]
    if labels is not None:
        add_known_labels(summary, records, labels)
    summary["rm"] = str(args.rm)
    summary["problems_spec"] = args.problems
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "picks.jsonl", "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(format_summary(summary))
    print(f"wrote {out / 'picks.jsonl'} and {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
