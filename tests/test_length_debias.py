"""Length-debiased training pairs (data/debias.py): the longer side becomes a fair coin, the
filler lies on both sides equally often, the programs are unchanged (same AST, same sandbox
verdict), validation and held-out pairs are untouched by the trainer, deterministic."""

import ast
import dataclasses

import numpy as np
import pytest

from codescaler_jax.config import load_config
from codescaler_jax.data.datasets import pairs_cache_key
from codescaler_jax.data.debias import length_debias_pairs, with_filler
from codescaler_jax.data.mutants import make_mutants_by_kind
from codescaler_jax.data.pairs import Pair
from codescaler_jax.data.problems import humaneval_problems
from codescaler_jax.data.source_edits import body_range
from codescaler_jax.data.tokenizer import encode_rm_inputs, load_tokenizer
from codescaler_jax.data.verified import label_candidates
from codescaler_jax.rm.config import RMTrainConfig
from codescaler_jax.rm.trainer import RMTrainer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("qwen3")


@pytest.fixture(scope="module")
def biased_pairs():
    """Canonical solution vs its cut / delete_line mutants: the positive is always longer."""
    out = []
    for p in humaneval_problems()[:30]:
        lo, hi = body_range(p.solution, p.tests["entry_point"])
        for m, kind in make_mutants_by_kind(p.solution, n=4, kinds=("cut", "delete_line"),
                                            seed=0, lo=lo, hi=hi):
            out.append(Pair(p.prompt, p.solution, m, p.problem_id, kind=kind,
                            chosen_kind="canonical"))
    return out


def _longer(tok, pairs, max_length=512):
    c = encode_rm_inputs(tok, [p.problem for p in pairs], [p.chosen for p in pairs], max_length)
    r = encode_rm_inputs(tok, [p.problem for p in pairs], [p.rejected for p in pairs], max_length)
    return np.array([1.0 if len(a) > len(b) else 0.5 if len(a) == len(b) else 0.0
                     for a, b in zip(c, r)])


def test_longer_side_is_a_fair_coin_and_filler_on_both_sides(tok, biased_pairs):
    assert _longer(tok, biased_pairs).mean() > 0.95  # the shortcut the option removes
    out, st = length_debias_pairs(biased_pairs, tok, 512, seed=0, margin=16)
    after = _longer(tok, out)
    assert len(out) == len(biased_pairs) and 0.4 < after.mean() < 0.6
    assert st["chosen_longer_after"] == pytest.approx(after.mean())
    assert st["out_of_reach"] == 0  # HumanEval inputs are far below 512 tokens here
    # the filler is on the positive as often as on the negative (no cue of its own)
    n = st["filler_on_chosen"] + st["filler_on_rejected"]
    assert n == len(out) and abs(st["filler_on_chosen"] / n - 0.5) < 0.1
    # the longer side leads by 1..16 tokens (a word more at most) when it was the shorter one
    for p, q in zip(biased_pairs, out):
        if q.rejected != p.rejected:
            lc, lr = (len(x[0]) for x in (encode_rm_inputs(tok, [q.problem], [c], 512)
                                          for c in (q.chosen, q.rejected)))
            assert 1 <= lr - lc <= 16 + 3
    # deterministic; another seed draws other coins
    again, _ = length_debias_pairs(biased_pairs, tok, 512, seed=0, margin=16)
    assert again == out
    other, _ = length_debias_pairs(biased_pairs, tok, 512, seed=1, margin=16)
    assert other != out
    # add: the originals first, then one copy each; none: unchanged
    added, st_add = length_debias_pairs(biased_pairs, tok, 512, seed=0, mode="add")
    assert added[: len(biased_pairs)] == biased_pairs and added[len(biased_pairs):] == out
    assert length_debias_pairs(biased_pairs, tok, 512, mode="none")[0] == biased_pairs
    with pytest.raises(ValueError, match="mode"):
        length_debias_pairs(biased_pairs, tok, 512, mode="both")


def test_filler_does_not_change_the_program(tok, biased_pairs):
    out, _ = length_debias_pairs(biased_pairs, tok, 512, seed=0)
    changed = 0
    for p, q in zip(biased_pairs, out):
        for a, b in ((p.chosen, q.chosen), (p.rejected, q.rejected)):
            if a == b:
                continue
            changed += 1
            assert b.startswith(a.rstrip("\n")) and all(
                line.startswith("# ") for line in b[len(a.rstrip("\n")):].strip().splitlines()
            )
            try:
                tree = ast.dump(ast.parse(a))
            except SyntaxError:  # a cut mutant need not parse: the filler keeps it so
                with pytest.raises(SyntaxError):
                    ast.parse(b)
                continue
            assert ast.dump(ast.parse(b)) == tree  # comments only: the same program
    assert changed == len(out)
    # and the sandbox says so: the canonical solutions pass with filler, a mutant still fails
    probs = humaneval_problems()[:3]
    cands = []
    for p in probs:
        lo, hi = body_range(p.solution, p.tests["entry_point"])
        m = next(m for m, _ in make_mutants_by_kind(p.solution, n=1, kinds=("wrong_return",),
                                                    seed=0, lo=lo, hi=hi))
        fill = "\n# note see the above\n# end of text"
        cands.append([(p.solution, "canonical"), (with_filler(p.solution, fill), "canonical"),
                      (m, "mutant"), (with_filler(m, fill), "mutant")])
    labels = label_candidates(probs, cands, workers=2, progress=False)
    verdicts = [r.passed for r in labels]
    assert verdicts == [True, True, False, False] * 3


def test_trainer_debiases_training_pairs_only(tmp_path, tok, biased_pairs):
    val = biased_pairs[:20]
    held = biased_pairs[20:40]
    train = biased_pairs[40:]
    assert len(train) >= 16
    tokenized = {}
    for mode in ("none", "replace"):
        cfg = load_config(RMTrainConfig, "configs/rm_tiny.yaml", [
            f"run_dir={tmp_path / mode}", f"data.train_length_debias={mode}",
            "train.global_batch_size=4"])
        tr = RMTrainer(cfg, progress=False)
        tr.load_pairs = lambda: (list(train), list(val), list(held), {})
        data = tr.prepare_data(tok)
        tokenized[mode] = data
    off, on = tokenized["none"], tokenized["replace"]
    for split in ("validation", "held_out"):
        a, b = getattr(off, split), getattr(on, split)
        assert a[0] == b[0]
        for x, y in zip(a[1].chosen + a[1].rejected, b[1].chosen + b[1].rejected):
            assert np.array_equal(x, y)
    assert "train_length_debias" in on.stats and "train_length_debias" not in off.stats
    assert 0.4 < on.stats["train_length_debias"]["chosen_longer_after"] < 0.6


def test_debias_keys_are_not_in_the_pairs_cache_key():
    a = load_config(RMTrainConfig, "configs/rm_tiny.yaml").data
    b = dataclasses.replace(a, train_length_debias="add", train_length_debias_margin=4)
    assert pairs_cache_key(a, 0)["sha256"] == pairs_cache_key(b, 0)["sha256"]


def test_duplicate_line_is_a_training_only_longer_negative():
    from codescaler_jax.data.augmented import AugmentOptions, build_split_pairs
    from codescaler_jax.data.mutants import FINE_MUTANT_KINDS, TRAIN_ONLY_MUTANT_KINDS

    p = humaneval_problems()[0]
    lo, hi = body_range(p.solution, p.tests["entry_point"])
    ms = make_mutants_by_kind(p.solution, n=3, kinds=("duplicate_line",), seed=0, lo=lo, hi=hi)
    assert ms and all(k == "duplicate_line" for _, k in ms)
    for m, _ in ms:  # one more line, a copy of the line above it
        a, b = p.solution.splitlines(), m.splitlines()
        assert len(b) == len(a) + 1
        i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        assert b[i] == b[i - 1] and b[:i] + b[i + 1:] == a
    # a training-only kind: the validation / held-out pairs are the same with it
    probs = humaneval_problems()[:16]
    opts = dict(rewrites_per_problem=1, rewrite_candidates=2, mutants_per_positive=4,
                max_pairs_per_problem=8)
    kw = dict(held_out_fraction=0.25, validation_fraction=0.125, seed=0, progress=False)
    base, _ = build_split_pairs(probs, options=AugmentOptions(**opts), **kw)
    more, st = build_split_pairs(probs, options=AugmentOptions(
        **opts, train_mutant_kinds=FINE_MUTANT_KINDS + TRAIN_ONLY_MUTANT_KINDS), **kw)
    assert base["validation"] == more["validation"] and base["held_out"] == more["held_out"]
    assert base["train"] != more["train"]
    assert "duplicate_line" not in st["pairs_by_kind"]["held_out"]
    assert st["mutants"]["train"].get("duplicate_line/failing", 0) > 0
    with pytest.raises(ValueError, match="unknown"):
        load_config(RMTrainConfig, "configs/rm_tiny.yaml", ["data.train_mutant_kinds=[nope]"])


def test_train_mutants_per_positive_moves_only_the_training_pairs():
    from codescaler_jax.data.augmented import AugmentOptions, build_split_pairs

    probs = humaneval_problems()[:16]
    opts = dict(rewrites_per_problem=1, rewrite_candidates=2, mutants_per_positive=3,
                max_pairs_per_problem=40)
    kw = dict(held_out_fraction=0.25, validation_fraction=0.125, seed=0, progress=False)
    base, _ = build_split_pairs(probs, options=AugmentOptions(**opts), **kw)
    more, _ = build_split_pairs(
        probs, options=AugmentOptions(**opts, train_mutants_per_positive=8), **kw)
    assert base["validation"] == more["validation"] and base["held_out"] == more["held_out"]
    assert len(more["train"]) > 1.5 * len(base["train"])
    # a superset: the first mutants of each positive are the same draws
    assert {(p.chosen, p.rejected) for p in base["train"]} <= {
        (p.chosen, p.rejected) for p in more["train"]}
    # None leaves the pairs cache key as it was before the option existed
    cfg = load_config(RMTrainConfig, "configs/rm_tiny.yaml")
    assert "train_mutants_per_positive" not in pairs_cache_key(cfg.data, 0)["data"]
    on = load_config(RMTrainConfig, "configs/rm_tiny.yaml", ["data.train_mutants_per_positive=9"])
    assert pairs_cache_key(on.data, 0)["sha256"] != pairs_cache_key(cfg.data, 0)["sha256"]
    with pytest.raises(ValueError, match="train_mutants_per_positive"):
        load_config(RMTrainConfig, "configs/rm_tiny.yaml", ["data.train_mutants_per_positive=0"])


def test_ema_update_and_config_range():
    import jax.numpy as jnp

    from codescaler_jax.rm.trainer import _ema_update

    ema = {"w": jnp.zeros(3), "b": {"c": jnp.ones(2)}}
    new = _ema_update(ema, {"w": jnp.ones(3), "b": {"c": jnp.zeros(2)}}, 0.75)
    np.testing.assert_allclose(new["w"], 0.25)
    np.testing.assert_allclose(new["b"]["c"], 0.75)
    assert load_config(RMTrainConfig, "configs/rm_tiny.yaml").train.ema_decay is None
    with pytest.raises(Exception, match="ema_decay"):
        load_config(RMTrainConfig, "configs/rm_tiny.yaml", ["train.ema_decay=1.5"])
