"""SFT examples: fenced, chat-formatted passing solutions of the training problems only.

Each example is ``(prompt_ids, response_ids)``: the problem text as the single user turn of
the policy's chat template (generation prompt added, as the sampler renders it) and the
response (the code in one python fence) followed by the EOS token. The code is the
canonical solution or a sandbox-checked rewrite of it (``data/candidates.py``), so the policy
sees several wordings of each solution. Problems are split by the fixed rule of
``data/splits.py`` over all problems of the source before anything is built, and only the
``train`` split is used: no held-out or validation problem reaches the policy.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path
from typing import Any

from codescaler_jax.data.candidates import fence, passing_positives, problems_of_split
from codescaler_jax.data.problems import Problem, humaneval_problems, read_problems_jsonl
from codescaler_jax.eval.sampling import render_prompts
from codescaler_jax.sft.config import SFTDataSection


@dataclasses.dataclass(frozen=True)
class SFTExample:
    """One training example; ``kind``: ``canonical`` or ``rewrite``."""

    problem_id: str
    prompt: str
    response: str
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    kind: str


def source_problems(source: str) -> list[Problem]:
    """``humaneval`` (the bundled set) or a problems JSONL file."""
    return humaneval_problems() if source == "humaneval" else read_problems_jsonl(source)


def build_examples(
    section: SFTDataSection, tokenizer, *, seed: int = 0, progress: bool = False
) -> tuple[list[SFTExample], list[Problem], dict[str, Any]]:
    """``(examples, problems with an example, statistics)``."""
    train = problems_of_split(source_problems(section.source), "train",
                              held_out_fraction=section.held_out_fraction,
                              validation_fraction=section.validation_fraction)
    positives = passing_positives(
        train, rewrites=section.rewrites, rewrite_candidates=section.rewrite_candidates,
        seed=seed, strip_docstring=section.strip_docstring, workers=section.sandbox_workers,
        progress=progress,
    )
    prompts = render_prompts(tokenizer, [p.prompt for p in train])
    eos = int(tokenizer.eos_token_id)
    dropped: Counter[str] = Counter()
    examples: list[SFTExample] = []
    used: list[Problem] = []
    for p, ids, kept in zip(train, prompts, positives, strict=True):
        if section.max_problems is not None and len(used) >= section.max_problems:
            break
        if len(ids) > section.max_prompt_length:
            dropped["prompt_too_long"] += len(kept)
            continue
        mine = []
        for pos in kept:
            text = fence(pos.code)
            r_ids = [int(t) for t in tokenizer.encode(text, add_special_tokens=False)] + [eos]
            if len(r_ids) > section.max_response_tokens:
                dropped["response_too_long"] += 1
                continue
            mine.append(SFTExample(p.problem_id, p.prompt, text, tuple(ids), tuple(r_ids),
                                   pos.kind))
        if mine:
            used.append(p)
            examples.extend(mine)
        elif not kept:
            dropped["no_passing_solution"] += 1
    stats = {
        "train_problems": len(train),
        "problems_used": len(used),
        "examples": len(examples),
        "examples_by_kind": dict(sorted(Counter(e.kind for e in examples).items())),
        "dropped": dict(dropped),
        "max_prompt_tokens": max((len(e.prompt_ids) for e in examples), default=0),
        "max_response_tokens": max((len(e.response_ids) for e in examples), default=0),
    }
    return examples, used, stats


def write_problems(problems: list[Problem], path: str | Path) -> None:
    """The problems as JSONL that ``data.problems.read_problems_jsonl`` reads back (GRPO's
    ``data.source``: GRPO then trains on the prompts the warm start saw)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for p in problems:
            f.write(json.dumps({"problem_id": p.problem_id, "prompt": p.prompt,
                                "tests": p.tests, "solution": p.solution}) + "\n")


def write_examples(examples: list[SFTExample], path: str | Path) -> None:
    """The examples as JSONL (problem id, kind, prompt and response text), for inspection and
    the leakage test."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for e in examples:
            f.write(json.dumps({"problem_id": e.problem_id, "kind": e.kind, "prompt": e.prompt,
                                "response": e.response}) + "\n")
