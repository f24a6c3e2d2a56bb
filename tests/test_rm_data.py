"""Bradley-Terry loss values, pair building / reading with bad records, mutants, Grain batches."""

import json
import math

import numpy as np
import pytest

from codescaler_jax.data.mutants import make_mutants
from codescaler_jax.data.pairs import (
    BadRecordError,
    Candidate,
    Pair,
    build_pairs,
    read_pairs,
    split_by_problem,
)
from codescaler_jax.data.pipeline import TokenizedPairs, eval_batches, make_buckets, pair_batches
from codescaler_jax.rm.loss import bt_metrics, bt_pair_losses, finalize_metrics


def test_bt_loss_hand_computed():
    c = np.array([2.0, 0.5], np.float32)
    r = np.array([1.0, 1.5], np.float32)
    # -log sigmoid(1) = log(1 + e^-1); -log sigmoid(-1) = log(1 + e^1)
    np.testing.assert_allclose(bt_pair_losses(c, r), [0.31326169, 1.31326169], atol=1e-6)
    # margin 0.5: log(1 + e^-0.5), log(1 + e^1.5)
    np.testing.assert_allclose(
        bt_pair_losses(c, r, margin=0.5), [0.47407698, 1.70141328], atol=1e-6
    )
    # centering 0.01 * (c + r)^2 = 0.09, 0.04 added
    np.testing.assert_allclose(
        bt_pair_losses(c, r, center_coef=0.01), [0.40326169, 1.35326169], atol=1e-6
    )
    m = finalize_metrics(bt_metrics(c, r, np.array([1.0, 1.0])))
    assert m["accuracy"] == 0.5
    assert math.isclose(m["margin"], 0.0, abs_tol=1e-7)
    assert math.isclose(m["chosen_mean"], 1.25) and math.isclose(m["chosen_std"], 0.75)
    # padding pairs (weight 0) do not count
    m = finalize_metrics(bt_metrics(c, r, np.array([1.0, 0.0])))
    assert m["accuracy"] == 1.0 and math.isclose(m["margin"], 1.0)


def test_build_pairs_within_problem_dedup_cap_seed():
    cands = [
        Candidate("p1", "P1", "a = 1", True),
        Candidate("p1", "P1", "a = 1 ", True),  # same after strip -> duplicate
        Candidate("p1", "P1", "a = 2", False),
        Candidate("p1", "P1", "a = 3", False),
        Candidate("p1", "P1", "a = 4", False),
        Candidate("p2", "P2", "b = 1", False),  # no passing -> skipped
        Candidate("p3", "P3", "c = 1", True),
        Candidate("p3", "P3", "c = 1", False),  # flaky -> dropped
        Candidate("p3", "P3", "c = 2", False),
        Candidate("p3", "P3", "c = 3", True),
    ]
    pairs, stats = build_pairs(cands, max_pairs_per_problem=2, seed=0)
    assert stats.candidates == 10 and stats.problems == 3
    assert stats.skipped["duplicate_code"] == 1
    assert stats.skipped["no_passing"] == 1
    assert stats.skipped["flaky_code"] == 1
    assert stats.skipped["over_cap"] == 1  # p1 has 1 x 3 combos, cap 2
    assert len(pairs) == 3 == stats.pairs
    for p in pairs:
        assert p.problem_id in ("p1", "p3") and p.problem == {"p1": "P1", "p3": "P3"}[p.problem_id]
        assert p.chosen != p.rejected
    assert [p.to_record() for p in pairs] == [
        p.to_record() for p in build_pairs(cands, max_pairs_per_problem=2, seed=0)[0]
    ]
    pairs_u, stats_u = build_pairs(cands, max_pairs_per_problem=2, seed=0, unaligned_fraction=1.0)
    unaligned = [p for p in pairs_u if p.unaligned]
    assert stats_u.unaligned_pairs == len(unaligned) == 3  # one per aligned pair
    for p in unaligned:  # rejected comes from another problem
        own = {c.code.strip() for c in cands if c.problem_id == p.problem_id}
        assert p.rejected not in own


def test_split_by_problem_is_disjoint():
    pairs = [Pair(f"P{i}", "x", "y", f"p{i}") for i in range(10) for _ in range(3)]
    train, held = split_by_problem(pairs, eval_fraction=0.2, seed=1)
    assert {p.problem_id for p in train}.isdisjoint({p.problem_id for p in held})
    assert len({p.problem_id for p in held}) == 2 and len(train) + len(held) == 30


def _write_jsonl(path, lines):
    with open(path, "wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else json.dumps(line).encode())
            f.write(b"\n")


GOOD = {"question_content": "q", "code_pos": "a = 1", "code_neg": "a = 2"}


@pytest.mark.parametrize(
    "bad, msg",
    [
        ({"question_content": "q", "code_pos": "a"}, "missing field 'code_neg'"),
        ({**GOOD, "code_neg": "   "}, "field 'code_neg' is empty"),
        ({**GOOD, "code_pos": 3}, "field 'code_pos' must be a string, got int"),
        (b'{"question_content": "\xff\xfe"}', "not valid UTF-8"),
        (b"{not json", "not valid JSON"),
        ({**GOOD, "code_pos": "x" * (10 << 20)}, "exceeds max_record_bytes"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_read_pairs_bad_records(tmp_path, bad, msg):
    path = tmp_path / "pairs.jsonl"
    _write_jsonl(path, [GOOD, GOOD, bad, GOOD])
    with pytest.raises(BadRecordError, match=f"pairs.jsonl:3: .*{msg[:20]}"):
        read_pairs(path)
    pairs, counts = read_pairs(path, skip_bad=True)
    assert len(pairs) == 3 and counts["read"] == 3 and counts["skipped"] == 1


def test_read_pairs_parquet_and_datasets_dir(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([GOOD, {**GOOD, "code_neg": "a = 3"}])
    ds.to_parquet(str(tmp_path / "p.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    for src in (tmp_path / "p.parquet", tmp_path / "saved"):
        pairs, counts = read_pairs(src)
        assert [p.rejected for p in pairs] == ["a = 2", "a = 3"] and counts["read"] == 2
    bad = datasets.Dataset.from_list([GOOD, {**GOOD, "code_pos": ""}])
    bad.to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(BadRecordError, match="bad.parquet row 1: field 'code_pos' is empty"):
        read_pairs(tmp_path / "bad.parquet")


def test_mutants_are_valid_distinct_and_only_touch_the_body():
    stub = 'def f(xs, k):\n    """Return items < k, 1 2 3."""\n'
    body = "    out = [x + 1 for x in xs if x < k]\n    return out\n"
    code = stub + body
    ms = make_mutants(code, n=20, seed=0, lo=len(stub))
    assert len(ms) >= 4 and len(set(ms)) == len(ms)
    for m in ms:
        compile(m, "<m>", "exec")
        assert m.startswith(stub) and m != code
    assert make_mutants(code, n=20, seed=0, lo=len(stub)) == ms


def _toy_tokenized(lengths):
    ch = [np.arange(1, n + 1, dtype=np.int32) for n in lengths]
    rj = [np.arange(1, max(n - 1, 1) + 1, dtype=np.int32) + 100 for n in lengths]
    return TokenizedPairs(ch, rj)


def test_pair_batches_bucket_shuffle_state_and_process_shards():
    data = _toy_tokenized([5, 9, 17, 3, 40, 7, 8, 12])
    buckets = make_buckets(64, smallest=8)
    assert buckets == (8, 16, 32, 64)
    ds = pair_batches(data, global_batch_size=4, buckets=buckets, pad_id=0, seed=3, num_epochs=2)
    assert len(ds) == 4
    seen = []
    for b in ds:
        L = b["chosen_ids"].shape[1]
        longest = max(len(data.chosen[i]) for i in b["index"])
        assert L in buckets and L >= longest and (L == 8 or L // 2 < longest)
        np.testing.assert_array_equal(
            b["chosen_mask"].sum(1), [len(data.chosen[i]) for i in b["index"]]
        )
        seen.extend(b["index"].tolist())
    assert sorted(seen[:8]) == list(range(8)) and sorted(seen[8:]) == list(range(8))
    assert seen[:8] != seen[8:]  # reshuffled each epoch
    # iterator state round trip: resuming after 2 batches gives the remaining batches
    it = iter(ds.to_iter_dataset())
    next(it), next(it)
    state = it.get_state()
    rest = [b["index"].tolist() for b in it]
    it2 = iter(ds.to_iter_dataset())
    it2.set_state(state)
    assert [b["index"].tolist() for b in it2] == rest
    # two processes: disjoint halves of every global batch, same padded length
    parts = [
        pair_batches(
            data,
            global_batch_size=4,
            buckets=buckets,
            pad_id=0,
            seed=3,
            process_index=p,
            process_count=2,
        )
        for p in range(2)
    ]
    for b0, b1, full in zip(
        parts[0],
        parts[1],
        pair_batches(data, global_batch_size=4, buckets=buckets, pad_id=0, seed=3),
    ):
        assert b0["chosen_ids"].shape == b1["chosen_ids"].shape == (2, full["chosen_ids"].shape[1])
        assert b0["index"].tolist() + b1["index"].tolist() == full["index"].tolist()


def test_eval_batches_pad_with_zero_weight():
    data = _toy_tokenized([5, 9, 17])
    batches = list(eval_batches(data, batch_size=2, buckets=(8, 32), pad_id=0))
    assert [b["weight"].tolist() for b in batches] == [[1.0, 1.0], [1.0, 0.0]]
    assert batches[1]["chosen_ids"].shape == (2, 32)


def test_a_timed_out_candidate_is_run_again_with_a_longer_limit():
    """A correct but slow program (about 0.7 s of CPU against a 0.4 s limit) times out once;
    the retry at 8x the limit labels it passing, so its label does not depend on the load.
    A program that never ends still fails, and without retries the slow one fails."""
    from codescaler_jax.data.problems import humaneval_problems
    from codescaler_jax.data.verified import label_candidates

    p = humaneval_problems()[0]
    entry = p.tests["entry_point"]
    slow = p.solution.replace(
        f"def {entry}(", "import time as _t\n\n"
        f"def _busy():\n    t = _t.process_time()\n    while _t.process_time() - t < 0.1:\n"
        f"        pass\n\n\ndef {entry}(", 1)
    slow = slow.replace("    for idx", "    _busy()\n    for idx", 1)
    assert slow != p.solution and "_busy()\n    for idx" in slow
    never = p.solution.replace("    for idx", "    while True:\n        pass\n    for idx", 1)
    cands = [[(p.solution, "canonical"), (slow, "slow"), (never, "never")]]
    got = [c.passed for c in label_candidates([p], cands, workers=2, progress=False,
                                               time_limit_s=0.4, timeout_retry_factor=8.0)]
    assert got == [True, True, False]
    once = [c.passed for c in label_candidates([p], cands, workers=2, progress=False,
                                                time_limit_s=0.4, timeout_retry_factor=1.0)]
    assert once == [True, False, False]
