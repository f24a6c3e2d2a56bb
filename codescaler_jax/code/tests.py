"""Test specifications for the sandbox, and their parsing from dataset records.

Three forms: stdin/stdout cases (``StdioTests``), call-based cases (``CallTests``: function name
+ arguments + expected value, LiveCodeBench / TACO / DeepCoder style, LeetCode ``class
Solution`` included) and HumanEval-style ``check(candidate)`` programs (``CheckTest``).
``tests_from_record`` reads any of the dataset spellings into one of them; ``code.sandbox``
runs them.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union


@dataclass(frozen=True)
class StdioTests:
    """stdin/stdout cases: ``inputs[i]`` on stdin, stdout compared with ``outputs[i]``."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    def __post_init__(self) -> None:
        _check_lengths(self.inputs, self.outputs)


@dataclass(frozen=True)
class CallTests:
    """Call-based cases: ``fn_name(*inputs[i]) == outputs[i]`` (``Solution().fn_name`` if the
    program defines ``class Solution``)."""

    fn_name: str
    inputs: tuple[tuple[Any, ...], ...]
    outputs: tuple[Any, ...]

    def __post_init__(self) -> None:
        _check_lengths(self.inputs, self.outputs)
        if not self.fn_name:
            raise ValueError("fn_name must be a non-empty string")


@dataclass(frozen=True)
class CheckTest:
    """HumanEval style: ``test`` defines ``check(candidate)``, called on ``entry_point``.

    ``prompt`` (optional, trusted Python: HumanEval's function stub with its helpers) is run in
    the judge, so helpers the test uses (``poly``, ``encode_cyclic``) are the prompt's own and
    not ones the program may have redefined.
    """

    test: str
    entry_point: str
    prompt: str = ""


Tests = Union[StdioTests, CallTests, CheckTest]  # noqa: UP007 - also used at run time


def num_tests(tests: Tests) -> int:
    """Number of test cases in a spec (a check program is one)."""
    return 1 if isinstance(tests, CheckTest) else len(tests.inputs)


def _text(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "\n".join(value)
    raise ValueError(f"{where} must be a string (or a list of lines), got {type(value).__name__}")


def _json_lines(value: Any, where: str) -> tuple[Any, ...]:
    if not isinstance(value, str):
        raise ValueError(f"{where} must be a string of JSON lines, got {type(value).__name__}")
    try:
        return tuple(json.loads(line) for line in value.strip("\n").split("\n"))
    except ValueError as e:
        raise ValueError(f"{where}: not one JSON value per line ({e})") from None


def _check_lengths(inputs: Sequence, outputs: Sequence) -> None:
    if len(inputs) != len(outputs):
        raise ValueError(f"{len(inputs)} inputs but {len(outputs)} outputs")
    if not inputs:
        raise ValueError("no test cases")


def _from_lcb_list(cases: list) -> Tests:
    """LiveCodeBench / DeepCoder-lcb: [{"input", "output", "testtype", "metadata"}, ...]."""
    if not cases or not all(isinstance(c, dict) for c in cases):
        raise ValueError("a test list must hold {'input', 'output', ...} objects")
    for i, c in enumerate(cases):
        if "input" not in c or "output" not in c:
            raise ValueError(f"test {i} lacks 'input' or 'output'")
    if cases[0].get("testtype") == "functional":
        meta = cases[0].get("metadata") or {}
        if isinstance(meta, str):
            meta = json.loads(meta)
        fn = meta.get("func_name") or meta.get("fn_name") or cases[0].get("fn_name")
        if not isinstance(fn, str) or not fn:
            raise ValueError("functional tests need metadata.func_name")
        args = tuple(_json_lines(c["input"], f"test {i} input") for i, c in enumerate(cases))
        outs = []
        for i, c in enumerate(cases):
            try:
                out = c["output"]
                outs.append(json.loads(out) if isinstance(out, str) else out)
            except ValueError as e:
                raise ValueError(f"test {i} output is not JSON ({e})") from None
        return CallTests(fn, args, tuple(outs))
    return StdioTests(
        tuple(_text(c["input"], f"test {i} input") for i, c in enumerate(cases)),
        tuple(_text(c["output"], f"test {i} output") for i, c in enumerate(cases)),
    )


def _python_or_empty(text: Any) -> str:
    """``text`` if it is Python source (a HumanEval stub), else "" (e.g. a natural-language
    prompt, which some records carry under the same key)."""
    if not isinstance(text, str) or not text.strip():
        return ""
    try:
        ast.parse(text)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return ""
    return text


def tests_from_record(obj: Mapping[str, Any] | Sequence[Any] | str) -> Tests:
    """Parse the common JSON test forms into a test spec. Raises ValueError on anything else.

    - ``{"inputs": [str], "outputs": [str]}`` (TACO / APPS / DeepCoder): stdio; a list of lines
      is joined with newlines;
    - the same with ``"fn_name"``: call-based, each input a list of arguments (a non-list input
      is one argument), outputs as given;
    - ``{"input_output": "<json of the above>"}`` (APPS / TACO raw);
    - ``[{"input", "output", "testtype": "stdin"|"functional", "metadata": {"func_name"}}]``
      (LiveCodeBench / DeepCoder lcb): functional inputs are one JSON value per line per
      argument, outputs JSON text;
    - ``{"test": "<code defining check(candidate)>", "entry_point": str}`` (HumanEval), with
      ``"prompt"`` kept as trusted helper code when it is Python (HumanEval's stub);
    - a JSON string of any of these.
    """
    if isinstance(obj, str | bytes):
        try:
            obj = json.loads(obj)
        except ValueError as e:
            raise ValueError(f"tests are not valid JSON ({e})") from None
    if isinstance(obj, list):
        return _from_lcb_list(obj)
    if not isinstance(obj, Mapping):
        raise ValueError(f"tests must be an object, a list or JSON text, got {type(obj).__name__}")
    if "test" in obj and "entry_point" in obj:
        test, entry = obj["test"], obj["entry_point"]
        if not isinstance(test, str) or not isinstance(entry, str) or not entry:
            raise ValueError("'test' and 'entry_point' must be non-empty strings")
        return CheckTest(test, entry, _python_or_empty(obj.get("prompt")))
    if "input_output" in obj:
        return tests_from_record(obj["input_output"])
    if "inputs" in obj and "outputs" in obj:
        inputs, outputs = obj["inputs"], obj["outputs"]
        if not isinstance(inputs, list) or not isinstance(outputs, list):
            raise ValueError("'inputs' and 'outputs' must be lists")
        _check_lengths(inputs, outputs)
        fn = obj.get("fn_name")
        if fn:
            if not isinstance(fn, str):
                raise ValueError("'fn_name' must be a string")
            args = tuple(tuple(x) if isinstance(x, list) else (x,) for x in inputs)
            return CallTests(fn, args, tuple(outputs))
        return StdioTests(
            tuple(_text(x, f"input {i}") for i, x in enumerate(inputs)),
            tuple(_text(y, f"output {i}") for i, y in enumerate(outputs)),
        )
    raise ValueError(
        "unrecognised tests: expected inputs/outputs[/fn_name], input_output, "
        "test/entry_point, or a list of input/output cases"
    )


tests_from_record.__test__ = False  # its name starts with "test"; keep pytest from collecting it
