"""Benchmark: best-of-N selection by the RM versus by executing the tests, on HumanEval.

    python -m codescaler_jax.bench.best_of_n                        # random tiny RM, 164 problems
    python -m codescaler_jax.bench.best_of_n --rm runs/rm_tiny \\
        --heldout-pairs runs/rm_tiny/data/eval_pairs.jsonl           # a trained RM, unseen problems

N = 8 candidates per problem: the canonical solution and 7 mutants of it (single-token edits of
the body, `codescaler_jax.data.mutants`), in a seeded random order, each as a fenced response.
Both selectors run in this process on the same candidates (`codescaler_jax.best_of_n.best_of_n`):
the RM (extraction, tokenization, batched forward passes, argmax; cold = first call with XLA
compilation, warm = second call) and test execution (every candidate in the sandbox, 2 s per
test, ``--workers`` workers already started). Pass rates of the RM pick, a random pick, the
oracle and the test pick come from the same execution results. The two selectors alternate for
``--rounds`` rounds (RM, tests, RM, tests, ...) and the speed-up is the median of the per-round
ratios (``codescaler_jax.bench.common``).

The paper's claim ("comparable to unit tests at 10x lower latency") is about an 8B RM on GPUs
against generated unit tests; what this measures is this machine, this RM and the ground-truth
tests. A random RM (the default without ``--rm``) gives meaningful times but pass rates at chance
level; ``--size`` sets the random RM's architecture (a named Qwen3 size or ``tiny``).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from typing import Any

import jax
import numpy as np

from codescaler_jax.bench.common import (
    LoadMonitor,
    add_harness_args,
    median_of_pair_ratios,
    write_json,
)

SIZES = ("tiny", "qwen3_0_6b", "qwen3_1_7b", "qwen3_4b", "qwen3_8b")


def random_rm_config(size: str, tokenizer, max_length: int):
    """The `Qwen3Config` of a random RM: a named Qwen3 size, or ``tiny`` (configs/rm_tiny.yaml)."""
    from codescaler_jax.models.qwen3 import Qwen3Config

    if size == "tiny":
        return Qwen3Config.tiny(
            vocab_size=151936, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            max_position_embeddings=max(4096, max_length),
        )
    return getattr(Qwen3Config, size)()


def random_scorer(size: str, *, max_length: int, batch_size: int, seed: int = 0):
    """A `RewardScorer` over a randomly initialised RM of ``size`` with the Qwen3 tokenizer."""
    from flax import nnx

    from codescaler_jax.data.tokenizer import load_tokenizer
    from codescaler_jax.models.qwen3 import Qwen3RewardModel
    from codescaler_jax.models.sharding import create_sharded, make_mesh
    from codescaler_jax.rm.scorer import RewardScorer

    tok = load_tokenizer("qwen3")
    cfg = random_rm_config(size, tok, max_length)
    mesh = make_mesh()
    model = create_sharded(lambda: Qwen3RewardModel(cfg, rngs=nnx.Rngs(seed)), mesh)
    return RewardScorer(model, tok, mesh=mesh, max_length=max_length, batch_size=batch_size), cfg


def humaneval_candidate_set(n: int, *, limit: int | None, ids: set[str] | None, seed: int):
    """HumanEval problems and, per problem, up to ``n`` fenced responses (canonical + mutants,
    shuffled), plus which of them is the canonical solution."""
    from codescaler_jax.data.problems import humaneval_problems
    from codescaler_jax.data.verified import humaneval_candidates

    problems = humaneval_problems()
    if ids is not None:
        problems = [p for p in problems if p.problem_id in ids]
    problems = problems[:limit]
    codes = humaneval_candidates(problems, mutants_per_problem=n - 1, seed=seed)
    responses, canonical = [], []
    for i, cs in enumerate(codes):
        order = list(range(len(cs)))
        random.Random(seed + i).shuffle(order)
        responses.append([f"```python\n{cs[k].strip()}\n```" for k in order])
        canonical.append(order.index(0))
    return problems, responses, canonical


def _count_params(scorer) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(scorer.params)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m codescaler_jax.bench.best_of_n",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rm", default=None, help="RM directory (default: a random RM of --size)")
    p.add_argument("--size", default="tiny", choices=SIZES, help="random RM architecture")
    p.add_argument("--n", type=int, default=8, help="candidates per problem")
    p.add_argument("--limit", type=int, default=None, help="first N problems only")
    p.add_argument("--heldout-pairs", default=None,
                   help="pair file whose problem ids restrict the problems (a train_rm run's "
                        "data/eval_pairs.jsonl: problems the RM never saw)")
    p.add_argument("--workers", type=int, default=2, help="sandbox workers")
    p.add_argument("--time-limit", type=float, default=2.0, help="seconds per test")
    p.add_argument("--max-length", type=int, default=1024, help="RM input truncation")
    p.add_argument("--batch-size", type=int, default=32, help="RM rows per forward pass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path (default bench_results/best_of_n.json)")
    add_harness_args(p, rounds=2)
    args = p.parse_args(argv)

    from codescaler_jax.best_of_n import (
        best_of_n,
        execute_candidates,
        format_summary,
        pad_candidates,
        rm_select,
    )

    monitor = LoadMonitor()

    ids = None
    if args.heldout_pairs:
        with open(args.heldout_pairs, encoding="utf-8") as f:
            ids = {json.loads(line)["problem_id"] for line in f if line.strip()}
    problems, responses, canonical = humaneval_candidate_set(
        args.n, limit=args.limit, ids=ids, seed=args.seed
    )
    if args.rm:
        from codescaler_jax.rm.scorer import RewardScorer

        scorer = RewardScorer.from_pretrained(args.rm, max_length=args.max_length,
                                              batch_size=args.batch_size)
        rm_desc: dict[str, Any] = {"path": str(args.rm)}
    else:
        scorer, cfg = random_scorer(args.size, max_length=args.max_length,
                                    batch_size=args.batch_size, seed=args.seed)
        rm_desc = {"random_init": args.size, "hidden_size": cfg.hidden_size,
                   "num_hidden_layers": cfg.num_hidden_layers}
    rm_desc["params"] = _count_params(scorer)

    records, summary = best_of_n(scorer, problems, responses, run_tests=True,
                                 time_limit_s=args.time_limit, workers=args.workers)
    # That run was round 1 (RM warm, then the tests); further rounds alternate the two again,
    # and the reported speed-up is the median of the per-round ratios.
    rm_s, test_s = [summary["rm_seconds_warm"]], [summary["test_seconds"]]
    padded, present = pad_candidates(responses)
    for _ in range(args.rounds - 1):
        rm_s.append(rm_select(scorer, [q.prompt for q in problems], padded, present)["seconds"])
        test_s.append(execute_candidates(problems, padded, present, time_limit_s=args.time_limit,
                                         workers=args.workers)["seconds"])
    summary["rm_seconds_warm_rounds"] = rm_s
    summary["test_seconds_rounds"] = test_s
    summary["speedup_vs_tests_warm_median_of_pairs"] = median_of_pair_ratios(rm_s, test_s)
    summary["rm_tokens_per_s_warm"] = summary["rm_tokens"] / summary["rm_seconds_warm"]
    summary["canonical_pick_rate"] = float(
        np.mean([r["rm_pick"] == c for r, c in zip(records, canonical)])
    )
    print(format_summary(summary))
    print(f"RM: {rm_desc}; {summary['rm_tokens']} tokens scored, "
          f"{summary['rm_tokens_per_s_warm']:.0f} tokens/s warm; "
          f"tests: {args.workers} sandbox workers, {args.time_limit} s per test")
    payload = {
        "rm": rm_desc,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "summary": summary,
        "target": "RM selection >= 10x faster than executing the tests",
        "target_met_warm": summary["speedup_vs_tests_warm_median_of_pairs"] >= 10.0,
    }
    path = write_json("best_of_n", payload, args.out, monitor=monitor, force=args.force)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
