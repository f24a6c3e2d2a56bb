"""Augmented verified pairs: rewrites, mutation kinds, the fixed problem split, no leakage of
held-out problems into training, determinism (sandbox-labelled, small problem subsets)."""

import random

import numpy as np
import pytest

from codescaler_jax.code.sandbox import Sandbox, SandboxConfig, tests_from_record
from codescaler_jax.data.augmented import AugmentOptions, build_split_pairs
from codescaler_jax.data.mutants import FINE_MUTANT_KINDS, make_mutants_by_kind
from codescaler_jax.data.problems import humaneval_problems
from codescaler_jax.data.rewrites import apply_transform, make_rewrites
from codescaler_jax.data.source_edits import body_range
from codescaler_jax.data.splits import find_leaks, split_problem_ids

OPTS = AugmentOptions(rewrites_per_problem=2, rewrite_candidates=3, mutants_per_positive=4,
                      max_pairs_per_problem=12)


@pytest.fixture(scope="module")
def problems():
    return humaneval_problems()[:24]


@pytest.fixture(scope="module")
def built(problems):
    return build_split_pairs(problems, held_out_fraction=0.25, validation_fraction=0.125,
                             options=OPTS, seed=0, progress=False)


def test_split_is_a_fixed_rule_of_the_ids():
    ids = [f"HumanEval/{i}" for i in range(164)]
    a = split_problem_ids(ids, held_out_fraction=0.2, validation_fraction=0.15)
    b = split_problem_ids(list(reversed(ids)), held_out_fraction=0.2, validation_fraction=0.15)
    assert a == b  # no seed, no order dependence
    counts = {s: sum(v == s for v in a.values()) for s in ("train", "validation", "held_out")}
    assert counts == {"train": 106, "validation": 25, "held_out": 33}
    # a problem keeps its held-out status when others are added
    more = split_problem_ids(ids + ["extra"], held_out_fraction=0.0, validation_fraction=0.0)
    assert set(more.values()) == {"train"}
    with pytest.raises(ValueError, match="validation_fraction"):
        split_problem_ids(ids, held_out_fraction=0.5, validation_fraction=0.6)


def test_no_held_out_problem_text_in_training_or_validation(problems, built):
    split, stats = built
    held_ids = set(stats["split_rule"]["held_out_ids"])
    val_ids = set(stats["split_rule"]["validation_ids"])
    assert len(held_ids) == 6 and len(val_ids) == 3
    assert {p.problem_id for p in split["held_out"]} == held_ids
    assert {p.problem_id for p in split["validation"]} <= val_ids
    held = [p for p in problems if p.problem_id in held_ids]
    held_texts = [t for p in split["held_out"] for t in (p.chosen, p.rejected)]
    records = [
        (f"{name} pair {i}", p.problem_id, (p.problem, p.chosen, p.rejected))
        for name in ("train", "validation")
        for i, p in enumerate(split[name])
    ]
    assert records and not find_leaks(held, records, held_out_texts=held_texts)
    # the check can fail: a training record carrying a held-out solution is caught
    bad = [("planted", "HumanEval/x", ("q", "x = 1\n" + held[0].solution))]
    assert f"planted: contains the solution of held-out {held[0].problem_id}" in find_leaks(
        held, bad)
    assert find_leaks(held, [("id", held[1].problem_id, ())])


def test_rewrites_pass_in_the_sandbox_and_differ_from_the_canonical_text(problems, built):
    split, stats = built
    by_id = {p.problem_id: p for p in problems}
    rewrites = {(p.problem_id, p.chosen) for s in split.values() for p in s
                if p.chosen_kind == "rewrite"}
    assert len(rewrites) >= 30 and stats["candidates"]["rewrite_kept"] == len(rewrites)
    for pid, code in rewrites:
        assert code.strip() != by_id[pid].solution.strip()
    canon = {p.chosen for s in split.values() for p in s if p.chosen_kind == "canonical"}
    assert canon <= {p.solution for p in problems}
    items = [(code, tests_from_record(by_id[pid].tests)) for pid, code in sorted(rewrites)]
    with Sandbox(SandboxConfig(time_limit_s=5.0, workers=2)) as sb:
        results = sb.run_many(items)
    assert all(r.passed for r in results)
    # negatives come from rewrites too, and every pair's rejected code failed
    assert any(p.chosen_kind == "rewrite" for p in split["train"])
    assert all(p.kind in FINE_MUTANT_KINDS for s in split.values() for p in s)


def test_build_is_deterministic(problems, built):
    again = build_split_pairs(problems, held_out_fraction=0.25, validation_fraction=0.125,
                              options=OPTS, seed=0, progress=False)
    rec = lambda s: {k: [p.to_record() for p in v] for k, v in s.items()}  # noqa: E731
    assert rec(again[0]) == rec(built[0])
    other = build_split_pairs(problems[:8], held_out_fraction=0.25, validation_fraction=0.125,
                              options=OPTS, seed=1, progress=False)
    same_subset = build_split_pairs(problems[:8], held_out_fraction=0.25,
                                    validation_fraction=0.125, options=OPTS, seed=0,
                                    progress=False)
    assert rec(other[0]) != rec(same_subset[0])


@pytest.mark.parametrize("name, code, expected", [
    ("aug_assign", "def f(x):\n    t = 0\n    t += x * 2\n    return t\n",
     "def f(x):\n    t = 0\n    t = t + x * 2\n    return t\n"),
    ("aug_assign", "def f(x):\n    t = 0\n    t = t + (x - 1)\n    return t\n",
     "def f(x):\n    t = 0\n    t += x - 1\n    return t\n"),
    ("comprehension", "def f(xs):\n    r = []\n    for x in xs:\n        if x > 1:\n"
     "            r.append(x * 2)\n    return r\n",
     "def f(xs):\n    r = [x * 2 for x in xs if x > 1]\n    return r\n"),
    ("comprehension", "def f(xs):\n    r = [x * 2 for x in xs]\n    return r\n",
     "def f(xs):\n    r = []\n    for x in xs:\n        r.append(x * 2)\n    return r\n"),
    ("ternary", "def f(x):\n    if x > 0:\n        return x\n    else:\n        return -x\n",
     "def f(x):\n    return x if x > 0 else -x\n"),
    ("early_return", "def f(x):\n    if x > 0:\n        return x\n    else:\n"
     "        y = -x\n        return y\n",
     "def f(x):\n    if x > 0:\n        return x\n    y = -x\n    return y\n"),
    ("compare_mirror", "def f(a, b):\n    return a < b\n", "def f(a, b):\n    return b > a\n"),
    ("strip_docstring", 'def f(a):\n    """Doc."""\n    return a\n', "def f(a):\n    return a\n"),
    ("range_zero", "def f(n):\n    return list(range(0, n))\n",
     "def f(n):\n    return list(range(n))\n"),
    ("quotes", "def f():\n    return 'ab'\n", None),
    ("bool_return", "def f(x):\n    if x > 2:\n        return True\n    return False\n",
     "def f(x):\n    return x > 2\n"),
])
def test_rewrite_transforms(name, code, expected):
    out = apply_transform(name, code, "f", random.Random(0))
    if expected is None:
        assert out is not None and out != code
    else:
        assert out == expected


def test_renaming_keeps_the_entry_point_and_module_names():
    code = ("import math\n\nLIMIT = 3\n\n\ndef helper(v):\n    return v + LIMIT\n\n\n"
            "def f(xs):\n    total = 0\n    for x in xs:\n        total += helper(x)\n"
            "    return math.floor(total)\n")
    for seed in range(5):
        out = apply_transform("rename_locals", code, "f", random.Random(seed))
        assert out is not None and out != code
        for name in ("def f(xs)", "helper(", "LIMIT", "math.floor", "def helper(v)"):
            assert name in out
    out = apply_transform("rename_params", code, "f", random.Random(0))
    assert out is not None and "def f(" in out and "def helper(" in out


def test_each_mutant_kind_edits_only_the_body():
    stub = 'def f(xs, k):\n    """Sum of the items below k, then 1 2."""\n'
    body = ("    total = 0\n    for i in range(len(xs)):\n        if xs[i] < k and i >= 0:\n"
            "            total += xs[i] - 1\n    return total\n")
    code = stub + body
    lo, hi = body_range(code, "f")
    assert code[lo:hi] == body
    muts = make_mutants_by_kind(code, n=40, seed=0, lo=lo, hi=hi)
    assert {k for _, k in muts} == set(FINE_MUTANT_KINDS)
    assert len({m for m, _ in muts}) == len(muts)
    for m, _ in muts:
        compile(m, "<m>", "exec")
        assert m.startswith(stub) and m != code
    assert make_mutants_by_kind(code, n=40, seed=0, lo=lo, hi=hi) == muts
    only = make_mutants_by_kind(code, n=5, kinds=["cut", "swap_operands"], seed=0, lo=lo, hi=hi)
    assert {k for _, k in only} == {"cut", "swap_operands"}
    with pytest.raises(ValueError, match="unknown mutant kind"):
        make_mutants_by_kind(code, n=1, kinds=["nope"])


def test_make_rewrites_deterministic_and_distinct(problems):
    for p in problems[:10]:
        a = make_rewrites(p.solution, p.tests["entry_point"], n=4, seed=3)
        assert a == make_rewrites(p.solution, p.tests["entry_point"], n=4, seed=3)
        texts = [c.strip() for c, _ in a]
        assert len(set(texts)) == len(texts) and p.solution.strip() not in texts


def test_grouped_batches_cover_each_epoch_once_with_less_padding():
    from codescaler_jax.data.pipeline import grouped_batches

    lengths = np.random.default_rng(0).integers(10, 500, size=203)
    batches = grouped_batches(lengths, 8, seed=3, num_epochs=2, window=4)
    assert len(batches) == 2 * (203 // 8) and all(len(b) == 8 for b in batches)
    for epoch in (batches[:25], batches[25:]):
        flat = np.concatenate(epoch)
        assert len(set(flat.tolist())) == len(flat) == 200
    assert [b.tolist() for b in batches] == [
        b.tolist() for b in grouped_batches(lengths, 8, seed=3, num_epochs=2, window=4)]
    padded = sum(lengths[b].max() for b in batches)
    rand = np.random.default_rng(1).permutation(200).reshape(-1, 8)
    assert padded < 0.8 * 2 * sum(lengths[b].max() for b in rand)


@pytest.mark.slow  # CI time: the faster tests of this file cover the same path
def test_augmented_run_validates_selects_and_repeats_exactly(tmp_path):
    """A tiny augmented run: validation every step, early stopping, held-out metrics by kind
    and by positive kind in summary.json; the same seed on the same pairs gives the same
    figures (the second run reuses the first one's pairs: the build itself is compared in
    test_build_is_deterministic)."""
    import shutil

    from codescaler_jax.config import load_config
    from codescaler_jax.rm.config import RMTrainConfig
    from codescaler_jax.rm.trainer import RMTrainer

    sets = [
        "model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=1",
        "model.num_attention_heads=2", "model.num_key_value_heads=1", "model.head_dim=16",
        "data.max_problems=16", "data.rewrites_per_problem=1", "data.rewrite_candidates=2",
        "data.mutants_per_positive=3", "data.max_length=256", "data.min_bucket=256",
        "train.global_batch_size=8", "train.eval_batch_size=16", "train.num_epochs=3",
        "train.eval_every=1", "train.early_stopping_patience=2", "train.save_every=100",
        "train.export_hf=false", "optim.warmup_steps=1",
    ]
    runs = []
    for name in ("a", "b"):
        run = tmp_path / name
        if name == "b":
            shutil.copytree(tmp_path / "a" / "data", run / "data")
        cfg = load_config(RMTrainConfig, "configs/rm_tiny.yaml", sets + [f"run_dir={run}"])
        # b holds only a's pair cache: --resume with no checkpoint starts from scratch on it
        runs.append(RMTrainer(cfg, progress=False, resume=name == "b").run())
    a, b = runs
    assert a["final_eval"] == b["final_eval"] and a["validation"] == b["validation"]
    d = a["data"]
    assert d["validation_problems"] == 2 and d["eval_problems"] == 3 and d["train_problems"] == 11
    assert a["best_validation"]["accuracy"] == max(v["accuracy"] for v in a["validation"])
    assert a["stopped_early"] == (a["steps"] < a["planned_steps"])
    fe = a["final_eval"]
    assert {"by_positive/rewrite/accuracy", "by_positive/canonical/accuracy"} <= set(fe)
    assert any(k.startswith("by_kind/") for k in fe)
    assert "identical_after_truncation" in d
