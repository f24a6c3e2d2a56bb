"""Avg@k evaluation: canonical solutions score 100%, mutants score what CPython says they score."""

from __future__ import annotations

import base64
import json
import pickle
import subprocess
import sys
import zlib

import pytest

from codescaler_jax.data.mutants import make_mutants
from codescaler_jax.data.problems import humaneval_problems
from codescaler_jax.eval import codegen
from codescaler_jax.eval.problem_formats import (
    ProblemFormatError,
    decode_lcb_cases,
    lcb_prompt,
    load_problems,
)

N_PROBLEMS = 8


def _fenced(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}\n```\nDone."


def _write_samples(path, problems, responses):
    with open(path, "w") as f:
        for p, rs in zip(problems, responses):
            f.write(json.dumps({"problem_id": p.problem_id, "responses": rs}) + "\n")


def test_canonical_solutions_score_100(tmp_path):
    problems = humaneval_problems()[:N_PROBLEMS]
    # k = 3: the canonical solution three times, once behind an earlier (wrong) block: the
    # evaluation extractor takes the last block
    responses = [
        [_fenced(p.solution)] * 2 + ["Draft:\n```python\nreturn None\n```\n" + _fenced(p.solution)]
        for p in problems
    ]
    samples = tmp_path / "samples.jsonl"
    _write_samples(samples, problems, responses)
    out = tmp_path / "out"
    codegen.main(["--problems", "humaneval", "--limit", str(N_PROBLEMS), "--samples",
                  str(samples), "--out-dir", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["overall"]["avg_at_k"] == 1.0
    assert summary["overall"]["samples"] == 3 * N_PROBLEMS
    recs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["problem_id"] for r in recs] == [p.problem_id for p in problems]
    assert all(r["passed"] == [True] * 3 and r["k"] == 3 for r in recs)


def _cpython_passes(problem, code: str) -> bool:
    """Independent reference: the HumanEval check run by a plain CPython subprocess."""
    prog = code + "\n\n" + problem.tests["test"] + f"\n\ncheck({problem.tests['entry_point']})\n"
    try:
        r = subprocess.run([sys.executable, "-c", prog], capture_output=True, timeout=10)
    except subprocess.TimeoutExpired:
        return False
    return r.returncode == 0


def test_mutants_score_their_failing_share(tmp_path):
    problems = humaneval_problems()[:N_PROBLEMS]
    responses, expected = [], []
    for i, p in enumerate(problems):
        lo = len(p.stub)
        cands = [p.solution] + make_mutants(p.solution, n=3, seed=i, lo=lo)
        responses.append([_fenced(c) for c in cands] + ["I don't know."])
        expected.append([_cpython_passes(p, c) for c in cands] + [False])
    flat = [x for row in expected for x in row]
    share = sum(flat) / len(flat)
    assert 0.2 < share < 0.8  # the set mixes passing and failing samples
    records, summary = codegen.evaluate(problems, ["humaneval"] * len(problems), responses)
    assert [r["passed"] for r in records] == expected
    assert summary["overall"]["avg_at_k"] == pytest.approx(share)
    assert summary["overall"]["no_code"] == pytest.approx(len(problems) / len(flat))
    assert all(r["statuses"][-1] == codegen.NO_CODE for r in records)


def _lcb_private(cases) -> str:
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(cases)))).decode()


def test_problem_formats_end_to_end(tmp_path):
    recs = [
        {   # LiveCodeBench, stdin, private cases compressed
            "question_id": "lcb-stdin", "question_content": "Print the sum of two integers.",
            "starter_code": "", "metadata": "{}",
            "public_test_cases": json.dumps([{"input": "1 2\n", "output": "3\n",
                                              "testtype": "stdin"}]),
            "private_test_cases": _lcb_private([{"input": "5 7\n", "output": "12\n",
                                                 "testtype": "stdin"}]),
        },
        {   # LiveCodeBench, functional (LeetCode style)
            "question_id": "lcb-fn", "question_content": "Return a + b.",
            "starter_code": "class Solution:\n    def add(self, a: int, b: int) -> int:\n        ",
            "metadata": json.dumps({"func_name": "add"}),
            "public_test_cases": json.dumps([{"input": "1\n2", "output": "3",
                                              "testtype": "functional"}]),
            "private_test_cases": "[]",
        },
        {   # DeepCoder / TACO call-based
            "problem_id": "taco-fn", "problem": "Write mul(a, b).",
            "tests": json.dumps({"fn_name": "mul", "inputs": [[2, 3], [4, 5]],
                                 "outputs": [6, 20]}),
        },
        {   # Gen-Verse stdio
            "id": "gv", "question": "Echo the line.", "test_input": ["abc\n"],
            "test_output": ["abc\n"],
        },
    ]
    f = tmp_path / "mixed.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    problems, sources = load_problems(str(f))
    assert [p.problem_id for p in problems] == ["lcb-stdin", "lcb-fn", "taco-fn", "gv"]
    assert sources == ["mixed"] * 4
    assert problems[0].prompt == lcb_prompt("Print the sum of two integers.")
    assert "```python\nclass Solution:" in problems[1].prompt
    assert problems[2].prompt == "Write mul(a, b)."  # DeepCoder prompts are used as they are
    assert len(problems[0].tests) == 2  # public + decoded private
    good = [
        "a, b = map(int, input().split())\nprint(a + b)",
        "class Solution:\n    def add(self, a, b):\n        return a + b",
        "def mul(a, b):\n    return a * b",
        "print(input())",
    ]
    bad = [
        "a, b = map(int, input().split())\nprint(a + b if a < 5 else 0)",  # fails private only
        "class Solution:\n    def add(self, a, b):\n        return a - b",
        "def mul(a, b):\n    return a * b if a < 3 else 0",
        "print(input()[::-1])",
    ]
    responses = [[_fenced(g), _fenced(b)] for g, b in zip(good, bad)]
    records, summary = codegen.evaluate(problems, sources, responses)
    assert [r["passed"] for r in records] == [[True, False]] * 4
    assert summary["overall"]["avg_at_k"] == 0.5


def test_lcb_decoder_refuses_classes_and_bad_records(tmp_path):
    evil = base64.b64encode(zlib.compress(pickle.dumps(ProblemFormatError("x")))).decode()
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        decode_lcb_cases(evil)
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"question_content": "q", "public_test_cases": "[]",
                             "private_test_cases": evil}) + "\n")
    with pytest.raises(ProblemFormatError, match=r"bad.jsonl:1: test cases cannot be decoded"):
        load_problems(str(f))
    f.write_text(json.dumps({"problem": "", "tests": "[]"}) + "\n")
    with pytest.raises(ProblemFormatError, match="'problem'"):
        load_problems(str(f))


def test_samples_file_errors(tmp_path):
    problems = humaneval_problems()[:2]
    f = tmp_path / "s.jsonl"
    f.write_text(json.dumps({"problem_id": problems[0].problem_id, "response": "x"}) + "\n")
    with pytest.raises(ValueError, match="no responses for 1 problems"):
        codegen.read_samples(f, problems)
    f.write_text(json.dumps({"problem_id": "nope", "response": "x"}) + "\n")
    with pytest.raises(ValueError, match="s.jsonl:1: unknown problem_id"):
        codegen.read_samples(f, problems)


@pytest.mark.slow
def test_policy_sampling_path(tmp_path):
    """Plumbing of --policy: a tiny random policy, k samples per problem, evaluated."""
    from flax import nnx
    from tiny_rm import tiny_rm_config

    from codescaler_jax.data.tokenizer import qwen3_tokenizer_dir
    from codescaler_jax.models.hf_io import save_hf_model
    from codescaler_jax.models.qwen3 import Qwen3ForCausalLM

    policy = tmp_path / "policy"
    save_hf_model(Qwen3ForCausalLM(tiny_rm_config(), rngs=nnx.Rngs(1)), policy,
                  tokenizer_dir=qwen3_tokenizer_dir())
    out = tmp_path / "out"
    codegen.main(["--problems", "humaneval", "--limit", "2", "--policy", str(policy), "--k", "4",
                  "--max-new-tokens", "8", "--max-prompt-len", "512", "--out-dir", str(out)])
    recs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["k"] for r in recs] == [4, 4]
    assert all(len(r["responses"]) == 4 for r in recs)
    # 4 samples of one prompt are different draws
    assert len(set(recs[0]["responses"])) > 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["temperature"] == 0.6 and summary["settings"]["top_p"] == 0.95
