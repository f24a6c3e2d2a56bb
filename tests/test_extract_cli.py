"""The extract CLI: end to end on a small JSONL (extraction and execution), bad-record errors
naming the file and line, --skip-bad, and an existing output left intact on error."""

import json
import subprocess
import sys

import pytest

from codescaler_jax.extract import main

ADD = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
RECORDS = [
    {"id": "stdio-pass", "problem": "add", "response": "Easy.\n" + ADD,
     "tests": {"inputs": ["1 2\n", "3 4\n"], "outputs": ["3\n", "7\n"]}},
    {"id": "stdio-fail", "problem": "add", "response": ADD,
     "tests": json.dumps({"inputs": ["1 2\n"], "outputs": ["4\n"]})},
    {"id": "call", "problem": "square", "response": "```python\ndef sq(x):\n    return x * x\n```",
     "tests": {"fn_name": "sq", "inputs": [[3]], "outputs": [9]}},
    {"id": "humaneval", "problem": "inc",
     "response": "```python\ndef inc(x):\n    return x + 1\n```",
     "tests": {"test": "def check(c):\n    assert c(1) == 2\n", "entry_point": "inc"}},
    {"id": "two-blocks", "problem": "p", "response": ADD + "\n" + ADD,
     "tests": {"inputs": ["1 2"], "outputs": ["3"]}},
    {"id": "no-tests", "problem": "p", "response": "no code here"},
    {"id": "cpp", "problem": "p", "response": "```cpp\nint main() { return 0; }\n```"},
]


def _write(path, lines):
    path.write_text("".join(x if isinstance(x, str) else json.dumps(x) + "\n" for x in lines))


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_end_to_end_subprocess(tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out" / "out.jsonl"
    _write(src, RECORDS[:4] + ["\n"] + RECORDS[4:])
    proc = subprocess.run(
        [sys.executable, "-m", "codescaler_jax.extract", "--input", str(src), "--output",
         str(dst), "--run-tests", "--workers", "2", "--no-progress"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = {r["id"]: r for r in _read(dst)}
    assert list(out) == [r["id"] for r in RECORDS]
    assert out["stdio-pass"]["line"] == 1 and out["two-blocks"]["line"] == 6  # blank line 5
    assert out["stdio-pass"]["code"].startswith("a, b = map") and out["stdio-pass"]["valid"]
    assert out["stdio-pass"]["execution"]["passed"]
    assert [t["status"] for t in out["stdio-pass"]["execution"]["tests"]] == ["passed"] * 2
    assert out["stdio-fail"]["execution"]["status"] == "failed"
    assert out["call"]["execution"]["passed"] and out["humaneval"]["execution"]["passed"]
    assert out["two-blocks"]["reason"] == "multiple_blocks"
    assert out["two-blocks"]["execution"]["status"] == "no_code"
    assert "execution" not in out["no-tests"] and out["no-tests"]["reason"] == "no_block"
    assert out["cpp"]["reason"] == "syntax_error" and out["cpp"]["code"] == ""
    summary = json.loads(proc.stderr.strip().splitlines()[-1])
    assert summary["records"] == 7 and summary["executed"] == 5 and summary["passed"] == 3


def test_eval_mode_and_auto_language(tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(src, RECORDS)
    assert main(["--input", str(src), "--output", str(dst), "--mode", "eval", "--language",
                 "auto", "--no-progress"]) == 0
    out = {r["id"]: r for r in _read(dst)}
    assert out["cpp"]["language"] == "cpp" and out["cpp"]["valid"]
    assert out["two-blocks"]["valid"] and out["two-blocks"]["code"].startswith("a, b")
    assert all("execution" not in r for r in out.values())


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"problem": "p", "response": "r"\n', "in.jsonl:3: not valid JSON"),
        ('["a list"]\n', "in.jsonl:3: record must be a JSON object, got list"),
        ('{"problem": "p"}\n', "in.jsonl:3: missing field 'response'"),
        ('{"problem": "p", "response": 7}\n', "in.jsonl:3: field 'response' must be a string"),
        ('{"problem": "p", "response": "r", "tests": {"inputs": ["1"], "outputs": []}}\n',
         "in.jsonl:3: field 'tests': 1 inputs but 0 outputs"),
        (b'{"problem": "p", "response": "\xff"}\n', "in.jsonl:3: not valid UTF-8"),
    ],
)
def test_bad_record_is_an_error_naming_file_and_line(tmp_path, capsys, bad_line, message):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    good = [json.dumps(RECORDS[5]).encode() + b"\n"] * 2
    src.write_bytes(b"".join(good) + (bad_line if isinstance(bad_line, bytes)
                                      else bad_line.encode()) + good[0])
    dst.write_text("previous results\n")
    code = main(["--input", str(src), "--output", str(dst), "--run-tests", "--no-progress"])
    assert code == 2
    assert message in capsys.readouterr().err
    assert dst.read_text() == "previous results\n"  # nothing already written is lost
    assert [p.name for p in tmp_path.iterdir()] != [] and not [
        p for p in tmp_path.iterdir() if p.name.startswith(".extract-")]
    # With --skip-bad the line is skipped and counted.
    assert main(["--input", str(src), "--output", str(dst), "--run-tests", "--skip-bad",
                 "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert summary["skipped_bad"] == 1 and summary["records"] == 3
    assert message in summary["skipped_messages"][0]
    assert [r["line"] for r in _read(dst)] == [1, 2, 4]


def test_missing_input_and_bad_arguments(tmp_path, capsys):
    assert main(["--input", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "o")]) == 2
    assert "cannot read" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--input", "a", "--output", "b", "--mode", "test"])
    assert main(["--input", "a", "--output", "b", "--fallback-language", "cobol"]) == 2
