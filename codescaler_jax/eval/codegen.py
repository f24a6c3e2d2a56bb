"""Avg@k code-generation evaluation: ``python -m codescaler_jax.eval.codegen``.

    python -m codescaler_jax.eval.codegen --problems lcb_v5.jsonl --policy runs/grpo/hf --k 8
    python -m codescaler_jax.eval.codegen --problems humaneval --samples responses.jsonl

For each problem, k responses (sampled from ``--policy`` with our JAX sampler at temperature 0.6,
top-p 0.95, no top-k by default, or read from ``--samples``), the code of each by the evaluation
extractor (the last fenced block, no syntax check: recipe 7.4), run in the sandbox against all of
the problem's tests with a 2 s per-test limit; a sample passes when every test passes. Avg@k is
the mean pass rate over all samples (the reference's ``cal_metrics``: the mean of
``verified_score`` per data source), which is the pass@1 estimate from k samples.

Writes ``<out-dir>/results.jsonl`` (one line per problem: its samples' codes, statuses and
pass flags) and ``<out-dir>/summary.json``, and prints a table per source. Problem files: see
`codescaler_jax.eval.problem_formats`. A samples file has lines ``{"problem_id", "response"}``
or ``{"problem_id", "responses": [...]}``; every problem needs at least one response.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from codescaler_jax.cli import guarded, positive_float, positive_int
from codescaler_jax.data.problems import Problem
from codescaler_jax.errors import InputError
from codescaler_jax.eval.problem_formats import FORMATS, TEMPLATES

NO_CODE = "no_code"


def extract_eval_codes(responses: Sequence[Sequence[str]]) -> list[list[str]]:
    """Per problem, the evaluation-mode extraction of each response ("" when there is no block)."""
    from codescaler_jax.code.extract import extract_code

    return [[extract_code(r, mode="eval").code for r in rs] for rs in responses]


def run_codes(
    problems: Sequence[Problem],
    codes: Sequence[Sequence[str]],
    *,
    time_limit_s: float = 2.0,
    memory_mb: int = 1024,
    workers: int = 2,
) -> tuple[list[list[bool]], list[list[str]], float]:
    """Run every code against its problem's tests (empty code is not run: it fails).

    Returns ``(passed [P][k], statuses [P][k], wall seconds of the sandbox run)``.
    """
    from codescaler_jax.code.sandbox import Sandbox, SandboxConfig, tests_from_record

    specs = [tests_from_record(p.tests) for p in problems]
    items, where = [], []
    for i, (spec, cs) in enumerate(zip(specs, codes, strict=True)):
        for j, c in enumerate(cs):
            if c.strip():
                items.append((c, spec))
                where.append((i, j))
    passed = [[False] * len(cs) for cs in codes]
    statuses = [[NO_CODE] * len(cs) for cs in codes]
    cfg = SandboxConfig(
        time_limit_s=time_limit_s, memory_mb=memory_mb, workers=workers,
        stop_on_first_failure=True,
    )
    t0 = time.perf_counter()
    with Sandbox(cfg) as sandbox:
        results = sandbox.run_many(items) if items else []
    wall = time.perf_counter() - t0
    for (i, j), res in zip(where, results, strict=True):
        passed[i][j] = bool(res.passed)
        statuses[i][j] = res.status
    return passed, statuses, wall


def avg_at_k(passed: Sequence[Sequence[bool]]) -> float:
    """Mean pass flag over all samples of all problems (the reference's Avg@k)."""
    flat = [float(x) for row in passed for x in row]
    return float(np.mean(flat)) if flat else float("nan")


def summarize(
    sources: Sequence[str], passed: Sequence[Sequence[bool]], statuses: Sequence[Sequence[str]]
) -> dict[str, Any]:
    """Avg@k, problems, samples, the share of samples without code and the share of problems
    with at least one passing sample, per source and overall."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(sources):
        groups[s].append(i)

    def stats(idx: list[int]) -> dict[str, Any]:
        rows = [passed[i] for i in idx]
        st = [x for i in idx for x in statuses[i]]
        return {
            "problems": len(idx),
            "samples": sum(len(r) for r in rows),
            "avg_at_k": avg_at_k(rows),
            "any_pass": float(np.mean([any(r) for r in rows])) if rows else float("nan"),
            "no_code": float(np.mean([s == NO_CODE for s in st])) if st else float("nan"),
        }

    return {
        "per_source": {s: stats(idx) for s, idx in groups.items()},
        "overall": stats(list(range(len(sources)))),
    }


def format_table(summary: dict[str, Any], k: int | str) -> str:
    lines = [f"{'source':<20} {'problems':>8} {'samples':>8} {f'Avg@{k}':>8} {'any':>6} "
             f"{'no code':>8}"]
    rows = list(summary["per_source"].items())
    if len(rows) > 1:
        rows.append(("all", summary["overall"]))
    for name, v in rows:
        lines.append(
            f"{name:<20} {v['problems']:>8} {v['samples']:>8} {100 * v['avg_at_k']:>7.2f}% "
            f"{100 * v['any_pass']:>5.1f}% {100 * v['no_code']:>7.1f}%"
        )
    return "\n".join(lines)


def read_samples(path: str | Path, problems: Sequence[Problem]) -> list[list[str]]:
    """Responses per problem, in problem order, from a samples JSONL file."""
    path = Path(path)
    by_id: dict[str, list[str]] = defaultdict(list)
    known = {p.problem_id for p in problems}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{where}: not valid JSON ({e.msg})") from e
            if not isinstance(rec, dict) or "problem_id" not in rec:
                raise InputError(f"{where}: expected an object with 'problem_id'")
            pid = str(rec["problem_id"])
            if pid not in known:
                raise InputError(f"{where}: unknown problem_id {pid!r}")
            if "responses" in rec:
                rs = rec["responses"]
                if not isinstance(rs, list) or not all(isinstance(r, str) for r in rs):
                    raise InputError(f"{where}: 'responses' must be a list of strings")
                by_id[pid].extend(rs)
            elif isinstance(rec.get("response"), str):
                by_id[pid].append(rec["response"])
            else:
                raise InputError(f"{where}: needs 'response' (string) or 'responses' (list)")
    missing = [p.problem_id for p in problems if not by_id.get(p.problem_id)]
    if missing:
        raise InputError(f"{path}: no responses for {len(missing)} problems, e.g. {missing[:3]}")
    return [by_id[p.problem_id] for p in problems]


def evaluate(
    problems: Sequence[Problem],
    sources: Sequence[str],
    responses: Sequence[Sequence[str]],
    *,
    time_limit_s: float = 2.0,
    memory_mb: int = 1024,
    workers: int = 2,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-problem records and the summary for ``responses[i]`` of ``problems[i]``."""
    codes = extract_eval_codes(responses)
    passed, statuses, wall = run_codes(
        problems, codes, time_limit_s=time_limit_s, memory_mb=memory_mb, workers=workers
    )
    records = [
        {
            "problem_id": p.problem_id,
            "source": src,
            "k": len(rs),
            "avg": float(np.mean(ok)) if ok else float("nan"),
            "passed": ok,
            "statuses": st,
            "codes": cs,
            "responses": list(rs),
        }
        for p, src, rs, cs, ok, st in zip(problems, sources, responses, codes, passed, statuses)
    ]
    summary = summarize(sources, passed, statuses)
    summary["sandbox_wall_s"] = wall
    return records, summary


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m codescaler_jax.eval.codegen",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--problems", required=True, help="'humaneval' or a problem file")
    p.add_argument("--format", default="auto", choices=FORMATS,
                   help="problem format (default: per record)")
    p.add_argument("--template", default="auto", choices=TEMPLATES,
                   help="prompt template: auto, raw or lcb")
    p.add_argument("--limit", type=positive_int, default=None, help="first N problems only")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--policy", help="HF policy directory to sample from")
    src.add_argument("--samples", help="JSONL of responses per problem")
    p.add_argument("--k", type=positive_int, default=8, help="samples per problem (with --policy)")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0, help="0 = off (the reference's eval)")
    p.add_argument("--max-new-tokens", type=positive_int, default=16384)
    p.add_argument("--max-prompt-len", type=positive_int, default=4096)
    p.add_argument("--batch-size", type=positive_int, default=8,
                   help="sampler rows per decode loop")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None, help="policy tokenizer dir (default: policy's)")
    p.add_argument("--time-limit", type=positive_float, default=2.0, help="seconds per test")
    p.add_argument("--memory-mb", type=positive_int, default=1024, help="address space per test")
    p.add_argument("--workers", type=positive_int, default=2, help="sandbox workers")
    p.add_argument("--out-dir", default="eval_codegen", help="results.jsonl + summary.json")
    return p.parse_args(argv)


@guarded
def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    from codescaler_jax.eval.problem_formats import load_problems

    problems, sources = load_problems(
        args.problems, fmt=args.format, template=args.template, limit=args.limit
    )
    t0 = time.perf_counter()
    if args.samples:
        responses = read_samples(args.samples, problems)
        k: int | str = len(responses[0]) if len({len(r) for r in responses}) == 1 else "k"
    else:
        from codescaler_jax.eval.sampling import SampleSettings, sample_responses

        settings = SampleSettings(
            n=args.k, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
            max_new_tokens=args.max_new_tokens, max_prompt_len=args.max_prompt_len,
            batch_size=args.batch_size, seed=args.seed,
        )
        responses = sample_responses(
            args.policy, [p.prompt for p in problems], settings, tokenizer=args.tokenizer
        )
        k = args.k
    sample_s = time.perf_counter() - t0
    records, summary = evaluate(
        problems, sources, responses, time_limit_s=args.time_limit, memory_mb=args.memory_mb,
        workers=args.workers,
    )
    summary["sampling_s"] = sample_s
    summary["settings"] = {
        k_: v for k_, v in vars(args).items() if k_ not in ("problems", "samples", "policy")
    }
    summary["problems_spec"] = args.problems
    summary["source"] = args.policy or args.samples
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.jsonl", "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(format_table(summary, k))
    print(f"wrote {out / 'results.jsonl'} and {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
