"""RM-Bench accuracies and pairwise accuracy against hand-computed values."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tiny_rm import save_tiny_rm

from codescaler_jax.eval import rm_bench

# A hand-built RM-Bench result file: RM-Bench's fields plus the reference's score fields.
# Style order in each list: concise, detailed plain, detailed markdown.
HAND_ITEMS = [
    {"id": "a", "domain": "code", "prompt": "p", "chosen": ["c0", "c1", "c2"],
     "rejected": ["r0", "r1", "r2"], "score_chosen": [3, 2, 1], "score_rejected": [2.5, 1.5, 0.5]},
    {"id": "b", "domain": "code", "prompt": "p", "chosen": ["c0", "c1", "c2"],
     "rejected": ["r0", "r1", "r2"], "score_chosen": [0, 0, 5], "score_rejected": [1, 0, -1]},
    {"id": "c", "domain": "chat", "prompt": "p", "chosen": ["c0", "c1", "c2"],
     "rejected": ["r0", "r1", "r2"], "score_chosen": [1, 1, 1], "score_rejected": [0, 0, 2]},
    {"id": "d", "domain": "safety-refuse", "prompt": "p", "chosen": ["c0", "c1", "c2"],
     "rejected": ["r0", "r1", "r2"], "score_chosen": [-1, -2, -3], "score_rejected": [0, 0, 0]},
    {"id": "e", "domain": "safety-response", "prompt": "p", "chosen": ["c0", "c1", "c2"],
     "rejected": ["r0", "r1", "r2"], "score_chosen": [[1], [1], [1]],
     "score_rejected": [[0], [0], [0]]},
    {"id": "f", "domain": "poetry", "prompt": "p", "chosen": ["c0", "c1", "c2"],
     "rejected": ["r0", "r1", "r2"], "score_chosen": [1, 1, 1], "score_rejected": [0, 0, 0]},
]


def _hand_expected():
    # Worked out on paper (rows: chosen style, columns: rejected style; ties are wrong).
    # item a: [[1,1,1],[0,1,1],[0,0,1]]; item b: [[0,0,1],[0,0,1],[1,1,1]]
    code_m = [[0.5, 0.5, 1.0], [0.0, 0.5, 1.0], [0.5, 0.5, 1.0]]
    code = {"hard": 5 / 6, "normal": 2 / 3, "easy": 1 / 3}
    # item c: every row [1,1,0]
    chat_m = [[1.0, 1.0, 0.0]] * 3
    chat = {"hard": 1 / 3, "normal": 2 / 3, "easy": 1.0}
    # items d (all 0) and e (all 1)
    safety_m = [[0.5] * 3] * 3
    safety = {"hard": 0.5, "normal": 0.5, "easy": 0.5}
    return code_m, code, chat_m, chat, safety_m, safety


def _check_hand(result):
    code_m, code, chat_m, chat, safety_m, safety = _hand_expected()
    assert list(result["domains"]) == ["chat", "code", "safety"]
    np.testing.assert_allclose(result["domains"]["code"]["matrix"], code_m)
    np.testing.assert_allclose(result["domains"]["chat"]["matrix"], chat_m)
    np.testing.assert_allclose(result["domains"]["safety"]["matrix"], safety_m)
    for name, exp in (("code", code), ("chat", chat), ("safety", safety)):
        for level, v in exp.items():
            assert result["domains"][name][level] == pytest.approx(v), (name, level)
    assert result["domains"]["code"]["accuracy"] == pytest.approx(11 / 18)
    assert result["domains"]["chat"]["accuracy"] == pytest.approx(2 / 3)
    assert result["domains"]["safety"]["accuracy"] == pytest.approx(1 / 2)
    assert result["domains"]["safety"]["n"] == 2
    assert result["hard"] == pytest.approx(5 / 9)
    assert result["normal"] == pytest.approx(11 / 18)
    assert result["easy"] == pytest.approx(11 / 18)
    assert result["avg"] == pytest.approx(16 / 27)
    # "poetry" is no RM-Bench domain: reported, kept out of the totals
    assert list(result["other_domains"]) == ["poetry"]
    assert result["other_domains"]["poetry"]["accuracy"] == 1.0


def test_rm_bench_hand_values_cli(tmp_path, capsys):
    data = tmp_path / "rmb.json"
    data.write_text(json.dumps(HAND_ITEMS))
    out = tmp_path / "res.json"
    assert rm_bench.main(["--data", str(data), "--from-scores", "--out", str(out)]) == 0
    result = json.loads(out.read_text())["rm_bench"]
    _check_hand(result)
    table = capsys.readouterr().out
    assert "code" in table and "61.1" in table  # code accuracy 11/18 in percent


def test_rm_bench_jsonl_and_errors(tmp_path):
    p = tmp_path / "rmb.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in HAND_ITEMS) + "\n")
    items = rm_bench.read_rm_bench(p)
    assert [it.item_id for it in items] == list("abcdef")
    assert items[4].score_chosen == (1.0, 1.0, 1.0)

    bad = dict(HAND_ITEMS[0], chosen=["only", "two"])
    p.write_text(json.dumps([HAND_ITEMS[0], bad]))
    with pytest.raises(rm_bench.RMBenchFormatError, match=r"item 1: field 'chosen'"):
        rm_bench.read_rm_bench(p)
    p.write_text("[{")
    with pytest.raises(rm_bench.RMBenchFormatError, match="not valid JSON"):
        rm_bench.read_rm_bench(p)


def test_no_domain_field_is_one_group():
    c = np.array([[1.0, 0.0, 0.0]])
    r = np.array([[0.5, 0.5, 0.5]])
    res = rm_bench.rm_bench_metrics(c, r, [""])
    assert list(res["domains"]) == ["all"]
    # row 0 all right, rows 1-2 all wrong: hard = (1+1+0)/3, normal = 1/3, easy = 0
    assert res["hard"] == pytest.approx(2 / 3)
    assert res["normal"] == pytest.approx(1 / 3)
    assert res["easy"] == 0.0


def test_pairwise_accuracy_hand():
    res = rm_bench.pairwise_accuracy(np.array([1.0, 2.0, 0.0, 3.0]), np.array([0.0, 2.0, 1.0, 1.0]))
    assert res == {"n": 4, "accuracy": 0.5, "ties": 1, "mean_margin": pytest.approx(0.5)}


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    return save_tiny_rm(tmp_path_factory.mktemp("rm") / "tiny_rm")


def test_rm_bench_with_rm_matches_offline_scores(rm_dir, tmp_path):
    """Wiring check: scoring the file through the RM gives the matrix computed by hand from
    each response's own offline score (one scorer call per response)."""
    from codescaler_jax.rm.scorer import RewardScorer

    items = [
        {"id": str(k), "domain": "code", "prompt": f"Write f{k}.",
         "chosen": [f"def f{k}(): return {k}", f"def f{k}():\n    return {k}\n",
                    f"```python\ndef f{k}():\n    return {k}\n```"],
         "rejected": [f"def f{k}(): return {k + 1}", f"def f{k}():\n    return -{k}\n",
                      f"```python\ndef f{k}():\n    return None\n```"]}
        for k in range(4)
    ]
    data = tmp_path / "rmb.json"
    data.write_text(json.dumps(items))
    out = tmp_path / "res.json"
    rm_bench.main(["--rm", str(rm_dir), "--data", str(data), "--max-length", "128",
                   "--batch-size", "8", "--out", str(out)])
    result = json.loads(out.read_text())["rm_bench"]

    scorer = RewardScorer.from_pretrained(rm_dir, max_length=128, batch_size=8)

    def one(prompt, resp):
        return float(scorer.score([prompt], [resp])[0])

    counts = [[0] * 3 for _ in range(3)]
    for it in items:
        c = [one(it["prompt"], x) for x in it["chosen"]]
        r = [one(it["prompt"], x) for x in it["rejected"]]
        assert min(abs(a - b) for a in c for b in r) > 1e-4  # no near-ties: the test is decisive
        for i in range(3):
            for j in range(3):
                counts[i][j] += c[i] > r[j]
    expected = [[v / len(items) for v in row] for row in counts]
    np.testing.assert_allclose(result["domains"]["code"]["matrix"], expected)
    assert 0.0 < np.mean(expected) < 1.0  # a random RM: the test covers both outcomes


def test_pairwise_file_with_rm(rm_dir, tmp_path):
    from codescaler_jax.rm.scorer import RewardScorer

    recs = [{"question_content": f"q{k}", "code_pos": f"x = {k}", "code_neg": f"y = {k} * 2"}
            for k in range(6)]
    pf = tmp_path / "pairs.jsonl"
    pf.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    out = tmp_path / "res.json"
    rm_bench.main(["--rm", str(rm_dir), "--pairs", str(pf), "--max-length", "64",
                   "--batch-size", "8", "--out", str(out)])
    res = json.loads(out.read_text())["pairwise"]
    scorer = RewardScorer.from_pretrained(rm_dir, max_length=64, batch_size=8)
    wins = sum(
        float(scorer.score([r["question_content"]], [r["code_pos"]])[0])
        > float(scorer.score([r["question_content"]], [r["code_neg"]])[0])
        for r in recs
    )
    assert res["n"] == 6 and res["accuracy"] == pytest.approx(wins / 6)
