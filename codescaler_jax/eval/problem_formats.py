"""Read evaluation problem files (LiveCodeBench, DeepCoder, HumanEval, Gen-Verse) into `Problem`s.

``load_problems(spec)``: ``spec`` is ``humaneval`` (the 164 bundled problems) or a ``.jsonl``,
``.json`` (a list) or ``.parquet`` file. The format of each record is recognised from its fields
(or forced with ``fmt``):

- ``humaneval``: ``task_id, prompt, entry_point, test[, canonical_solution]``; the policy sees
  our HumanEval instruction and the stub in a fenced block (as `humaneval_problems`);
- ``livecodebench`` (``livecodebench/code_generation_lite``): ``question_content,
  starter_code, public_test_cases, private_test_cases, metadata``; tests = public + private
  cases (private ones may be base64(zlib(pickle(json))), decoded with an unpickler that loads no
  classes); prompt = the LiveCodeBench template;
- ``deepcoder`` (``agentica-org/DeepCoder-Preview-Dataset``): ``problem, tests[, metadata]``;
  ``tests`` is an LCB case list (``metadata.func_name`` attached to each case for functional
  tests, as the reference's data preparation does) or a TACO ``inputs/outputs[/fn_name]`` dict;
  prompt = the problem as is (``template="lcb"`` wraps it as the reference does for lcbv5);
- ``genverse`` (CURE's ``Gen-Verse/*`` test sets): ``question, test_input, test_output`` (stdio);
  prompt = the LiveCodeBench stdin template, as the reference prepares them;
- ``generic``: what `codescaler_jax.data.problems.read_problems_jsonl` reads (``prompt`` /
  ``question_content`` and a sandbox ``tests`` record).

``Problem.prompt`` is the whole user turn the policy sees, and the RM's problem text too (the
reference scores with the same text the policy saw). ``Problem.tests`` is whatever
`codescaler_jax.code.sandbox.tests_from_record` parses (an LCB case list stays a list). Each
problem also gets a source name for per-source tables: the record's ``data_source`` when present,
else the file's stem.
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from codescaler_jax.data.problems import HUMANEVAL_INSTRUCTION, Problem, humaneval_problems
from codescaler_jax.errors import InputError

FORMATS = ("auto", "humaneval", "livecodebench", "deepcoder", "genverse", "generic")
TEMPLATES = ("auto", "raw", "lcb")
ID_KEYS = ("problem_id", "task_id", "question_id", "id")

# The LiveCodeBench prompt strings (lcb_runner/prompts/code_generation.py), as the reference's
# data preparation uses them (fetch_live_code_bench_system_prompt).
LCB_SYSTEM_MESSAGE_GENERIC = (
    "You are an expert Python programmer. You will be given a question (problem specification) "
    "and will generate a correct Python program that matches the specification and passes all "
    "tests."
)
LCB_FORMATTING_WITH_STARTER_CODE = (
    "You will use the following starter code to write the solution to the problem and enclose "
    "your code within delimiters."
)
LCB_FORMATTING_WITHOUT_STARTER_CODE = (
    "Read the inputs from stdin solve the problem and write the answer to stdout (do not directly "
    "test on the sample inputs). Enclose your code within delimiters as follows. Ensure that when "
    "the python program runs, it reads the inputs, runs the algorithm and writes output to STDOUT."
)


class ProblemFormatError(InputError):
    """A problem record that cannot be read; the message names the file, record and field."""


def lcb_prompt(question: str, starter_code: str = "") -> str:
    """The reference's LiveCodeBench user prompt around ``question``."""
    prompt = LCB_SYSTEM_MESSAGE_GENERIC + "\n\n" + question
    if starter_code:
        prompt += f"### Format: {LCB_FORMATTING_WITH_STARTER_CODE}\n"
        prompt += f"```python\n{starter_code}\n```\n\n"
    else:
        prompt += f"### Format: {LCB_FORMATTING_WITHOUT_STARTER_CODE}\n"
        prompt += "```python\n# YOUR CODE HERE\n```\n\n"
    prompt += "### Answer: (use the provided format with backticks)\n\n"
    return prompt


class _NoClassUnpickler(pickle.Unpickler):
    """LiveCodeBench pickles plain strings; anything that needs a class is refused (a pickle
    that loads classes can run code)."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a test file")


def decode_lcb_cases(value: Any) -> list[dict[str, Any]]:
    """LiveCodeBench test cases: a list, JSON text, or base64(zlib(pickle(JSON text)))."""
    if isinstance(value, list):
        return value
    if not isinstance(value, str):
        raise ValueError(f"test cases must be a list or a string, got {type(value).__name__}")
    if not value.strip():
        return []
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        pass
    raw = zlib.decompress(base64.b64decode(value.encode("utf-8")))
    inner = _NoClassUnpickler(io.BytesIO(raw)).load()
    if not isinstance(inner, str | bytes):
        raise ValueError(f"decoded test cases are {type(inner).__name__}, expected JSON text")
    return json.loads(inner)


def _json_field(rec: dict[str, Any], key: str, where: str) -> Any:
    v = rec.get(key)
    if isinstance(v, str):
        try:
            return json.loads(v) if v.strip() else {}
        except json.JSONDecodeError as e:
            raise ProblemFormatError(f"{where}: field {key!r} is not valid JSON ({e.msg})") from e
    return v


def detect_format(rec: dict[str, Any]) -> str:
    if "entry_point" in rec and "test" in rec and "prompt" in rec:
        return "humaneval"
    if "question_content" in rec and ("public_test_cases" in rec or "private_test_cases" in rec):
        return "livecodebench"
    if "problem" in rec and "tests" in rec:
        return "deepcoder"
    if "question" in rec and "test_input" in rec and "test_output" in rec:
        return "genverse"
    return "generic"


def _str(rec: dict[str, Any], key: str, where: str) -> str:
    v = rec.get(key)
    if not isinstance(v, str) or not v:
        raise ProblemFormatError(f"{where}: missing or empty string field {key!r}")
    return v


def problem_from_record(
    rec: dict[str, Any], where: str, *, fmt: str = "auto", template: str = "auto"
) -> Problem:
    """One `Problem` from one record (see the module docstring for the formats)."""
    if not isinstance(rec, dict):
        raise ProblemFormatError(f"{where}: expected a JSON object")
    kind = detect_format(rec) if fmt == "auto" else fmt
    pid = next((rec[k] for k in ID_KEYS if rec.get(k) is not None), where)
    pid = str(pid)
    if kind == "humaneval":
        stub = _str(rec, "prompt", where)
        prompt = HUMANEVAL_INSTRUCTION + "```python\n" + stub.strip("\n") + "\n```"
        sol = rec.get("canonical_solution")
        # The stub goes with the tests as trusted helper code: the judge then uses its own copy
        # of helpers such as HumanEval/38's encode_cyclic, never the program's.
        tests = {"test": _str(rec, "test", where), "entry_point": _str(rec, "entry_point", where),
                 "prompt": stub}
        return Problem(pid, prompt, tests, stub + sol if isinstance(sol, str) else None, stub)
    if kind == "livecodebench":
        question = _str(rec, "question_content", where)
        starter = rec.get("starter_code") or ""
        meta = _json_field(rec, "metadata", where) or {}
        try:
            cases = decode_lcb_cases(rec.get("public_test_cases", [])) + decode_lcb_cases(
                rec.get("private_test_cases", [])
            )
        except (ValueError, zlib.error, pickle.UnpicklingError) as e:
            raise ProblemFormatError(f"{where}: test cases cannot be decoded ({e})") from e
        if not cases:
            raise ProblemFormatError(f"{where}: no test cases")
        if meta:
            cases = [dict(c, metadata=meta) for c in cases]
        prompt = question if template == "raw" else lcb_prompt(question, starter)
        return Problem(pid, prompt, cases)
    if kind == "deepcoder":
        question = _str(rec, "problem", where)
        tests = _json_field(rec, "tests", where)
        meta = _json_field(rec, "metadata", where) or {}
        if isinstance(tests, list) and isinstance(meta, dict) and meta.get("func_name"):
            tests = [dict(c, metadata=meta) for c in tests]
        if not isinstance(tests, list | dict):
            raise ProblemFormatError(f"{where}: field 'tests' must be a list or an object")
        starter = rec.get("starter_code") or ""
        prompt = lcb_prompt(question, starter) if template == "lcb" else question
        return Problem(pid, prompt, tests)
    if kind == "genverse":
        question = _str(rec, "question", where)
        ins, outs = rec.get("test_input"), rec.get("test_output")
        if not isinstance(ins, list) or not isinstance(outs, list) or len(ins) != len(outs):
            raise ProblemFormatError(f"{where}: 'test_input'/'test_output' must be equal lists")
        prompt = question if template == "raw" else lcb_prompt(question)
        return Problem(pid, prompt, {"inputs": ins, "outputs": outs})
    if kind == "generic":
        prompt = rec.get("prompt", rec.get("question_content"))
        if not isinstance(prompt, str) or not prompt:
            raise ProblemFormatError(f"{where}: missing or empty field 'prompt'")
        tests = _json_field(rec, "tests", where)
        if not tests:
            raise ProblemFormatError(f"{where}: missing field 'tests'")
        if template == "lcb":
            prompt = lcb_prompt(prompt, rec.get("starter_code") or "")
        return Problem(pid, prompt, tests, rec.get("solution"))
    raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")


def _records(path: Path) -> Iterator[tuple[str, Any]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path} row {i}", row
        return
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ProblemFormatError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from e
        for i, rec in enumerate(data):
            yield f"{path} item {i}", rec
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                raise ProblemFormatError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e


def load_problems(
    spec: str, *, fmt: str = "auto", template: str = "auto", limit: int | None = None
) -> tuple[list[Problem], list[str]]:
    """Problems of ``spec`` (``humaneval`` or a file) and each one's source name.

    The source is the record's ``data_source`` when present, else the file's stem.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
    if spec == "humaneval":
        problems = humaneval_problems()[:limit]
        return problems, ["humaneval"] * len(problems)
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"problem file not found: {spec!r} (or use 'humaneval')")
    problems, sources = [], []
    for where, rec in _records(path):
        if limit is not None and len(problems) >= limit:
            break
        problems.append(problem_from_record(rec, where, fmt=fmt, template=template))
        src = rec.get("data_source") if isinstance(rec, dict) else None
        sources.append(str(src) if src else path.stem)
    ids = [p.problem_id for p in problems]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ProblemFormatError(f"{path}: duplicate problem id {dup!r}")
    return problems, sources
