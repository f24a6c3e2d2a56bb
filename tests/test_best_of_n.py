"""Best-of-N: the RM's pick where its preference is known, no-code last, the execution baseline."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from tiny_rm import save_tiny_rm

from codescaler_jax import best_of_n as bon
from codescaler_jax.data.mutants import make_mutants
from codescaler_jax.data.problems import humaneval_problems


def test_select_best_hand():
    nan, inf = float("nan"), float("inf")
    scores = np.array([
        [1.0, 5.0, 3.0],      # the invalid 5.0 must lose to the valid 3.0
        [nan, -inf, 2.0],     # valid NaN / -inf: lowest valid, tie -> first; 2.0 is invalid
        [9.0, 9.0, 1.0],      # nothing valid -> 0
        [0.5, 0.5, 0.2],      # tie between valid -> first
        [-1e30, 100.0, 0.0],  # a very negative valid score still beats invalid ones
    ], np.float32)
    valid = np.array([
        [True, False, True],
        [True, True, False],
        [False, False, False],
        [True, True, True],
        [True, False, False],
    ])
    np.testing.assert_array_equal(np.asarray(bon.select_best(scores, valid)), [2, 0, 0, 0, 0])


def test_select_by_tests_and_metrics_hand():
    all_passed = np.array([[False, True, True], [False, False, False], [False, False, False]])
    tests_passed = np.array([[3, 5, 5], [1, 2, 2], [0, 0, -1]])
    pick = bon.select_by_tests(all_passed, tests_passed)
    np.testing.assert_array_equal(pick, [1, 1, 0])
    present = np.array([[True, True, True], [True, True, True], [True, True, False]])
    m = bon.selection_metrics(all_passed, present, np.array([0, 2, 1]), pick)
    assert m == {"rm_pick": 0.0, "random_pick": pytest.approx((2 / 3) / 3), "oracle": 1 / 3,
                 "test_pick": 1 / 3}


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    from codescaler_jax.rm.scorer import RewardScorer

    rm_dir = save_tiny_rm(tmp_path_factory.mktemp("rm") / "tiny_rm")
    return RewardScorer.from_pretrained(rm_dir, max_length=512, batch_size=8)


def _fenced(code: str) -> str:
    return f"Solution:\n```python\n{code}\n```"


def _cpython_passes(problem, code: str) -> bool:
    prog = code + "\n\n" + problem.tests["test"] + f"\n\ncheck({problem.tests['entry_point']})\n"
    try:
        r = subprocess.run([sys.executable, "-c", prog], capture_output=True, timeout=10)
    except subprocess.TimeoutExpired:
        return False
    return r.returncode == 0


def _constructed_set(scorer):
    """Per problem: a decoy without valid code at index 0 that holds the best code twice (two
    blocks: "no code" for the training extractor), a response without any block, then the
    canonical solution and mutants. The expected pick comes from each code's own offline score
    (one scorer call per code), argmax taken by hand."""
    problems = humaneval_problems()[:5]
    responses, expected = [], []
    for i, p in enumerate(problems):
        codes = [p.solution.strip()] + [m.strip() for m in
                                        make_mutants(p.solution, n=4, seed=i, lo=len(p.stub))]
        own = [float(scorer.score([p.prompt], [c])[0]) for c in codes]
        gaps = sorted(own)[-1] - sorted(own)[-2]
        assert gaps > 1e-4  # a clear best: the test is decisive
        best = int(np.argmax(own))
        decoy = _fenced(codes[best]) + "\nor equivalently\n" + _fenced(codes[best])
        responses.append([decoy, "I would loop over the list."] + [_fenced(c) for c in codes])
        expected.append(best + 2)
    # a problem whose candidates all lack code
    problems.append(humaneval_problems()[5])
    responses.append(["no idea", _fenced("def broken(:\n    pass")])
    expected.append(0)
    return problems, responses, expected


def test_rm_picks_the_known_best_and_never_no_code(scorer):
    problems, responses, expected = _constructed_set(scorer)
    padded, present = bon.pad_candidates(responses)
    res = bon.rm_select(scorer, [p.prompt for p in problems], padded, present)
    assert res["picks"].tolist() == expected
    for i, pick in enumerate(res["picks"][:-1]):
        assert res["valid"][i, pick]  # never a no-code candidate while a valid one exists
    assert res["reasons"][0][:2] == ["multiple_blocks", "no_block"]
    assert res["reasons"][-1][:2] == ["no_block", "syntax_error"]
    assert not res["valid"][-1].any()


def test_with_tests_matches_cpython_and_times_both(scorer, tmp_path):
    problems, responses, _ = _constructed_set(scorer)
    problems, responses = problems[:-1], responses[:-1]
    records, summary = bon.best_of_n(scorer, problems, responses, run_tests=True, workers=2)
    # independent pass flags: the last fenced block of each response, run by plain CPython
    from codescaler_jax.code.extract import find_blocks

    flags = []
    for p, rs in zip(problems, responses):
        row = []
        for r in rs:
            blocks = find_blocks(r)
            row.append(bool(blocks) and _cpython_passes(p, blocks[-1][1].strip()))
        flags.append(row)
    assert [r["passed"] for r in records] == flags
    rm_rate = np.mean([row[r["rm_pick"]] for row, r in zip(flags, records)])
    pr = summary["pass_rate"]
    assert pr["rm_pick"] == pytest.approx(rm_rate)
    assert pr["random_pick"] == pytest.approx(np.mean([np.mean(row) for row in flags]))
    assert pr["oracle"] == pytest.approx(np.mean([any(row) for row in flags]))
    # the decoy at index 0 holds a passing canonical solution for some problems: the test
    # selector runs it (evaluation extractor) and may pick it; it always finds a passing one
    assert pr["test_pick"] == pr["oracle"] == 1.0
    assert summary["rm_seconds_warm"] > 0 and summary["test_seconds"] > 0
    assert summary["speedup_vs_tests_warm"] == pytest.approx(
        summary["test_seconds"] / summary["rm_seconds_warm"])


def test_cli_with_candidates_file(scorer, tmp_path):
    problems = humaneval_problems()[:3]
    cands = tmp_path / "c.jsonl"
    with open(cands, "w") as f:
        for p in problems:
            f.write(json.dumps({"problem_id": p.problem_id,
                                "responses": ["none", _fenced(p.solution)]}) + "\n")
    rm_dir = tmp_path / "rm"
    save_tiny_rm(rm_dir)
    out = tmp_path / "out"
    bon.main(["--rm", str(rm_dir), "--problems", "humaneval", "--limit", "3", "--candidates",
              str(cands), "--max-length", "512", "--batch-size", "8", "--out-dir", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    picks = [json.loads(line) for line in (out / "picks.jsonl").read_text().splitlines()]
    # the only candidate with code is picked, and it passes
    assert [r["rm_pick"] for r in picks] == [1, 1, 1]
    assert summary["pass_rate"]["rm_pick"] == 1.0
    assert summary["pass_rate"]["random_pick"] == 0.5
