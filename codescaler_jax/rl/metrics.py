"""Pass-rate probes of a GRPO run: sampled code executed in the sandbox, a metric, never a reward.

Every ``every`` steps (and at step 0, before the first update, and after the last step) the
probe samples ``num_samples`` responses for a *fixed* set of prompts with the run's sampler
settings and a *fixed* RNG key, extracts the code (training extractor: exactly one fenced
block that parses), runs it against the problem's tests and reports, per prompt set:

- ``<set>/pass_rate``: the fraction of responses whose code passes all tests;
- ``<set>/valid_code_fraction``: the fraction with a valid code block;

for ``train`` (the first ``train_prompts`` of the run's own prompts) and ``held_out`` (the
first ``held_out_prompts`` held-out problems of the fixed hash split of ``held_out_source``,
``data/splits.py``; never trained on). The same key at every probe makes step-0 and step-s
figures differ only by the policy, so "the pass rate rose by x points" compares like with
like. The probe's sandbox is its own; the reward's is untouched.

Multi-host: each process samples, extracts and runs its own equal share of a set's rows (the
last row repeated to fill the share, and dropped from the figures), then the pass/valid flags
are gathered, so every process reports the whole set's figures.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from codescaler_jax.data.problems import Problem
from codescaler_jax.distributed import gather_rows
from codescaler_jax.rl.config import PassRateEvalSection


def held_out_problems(section: PassRateEvalSection) -> list[Problem]:
    """The held-out problems of ``section.held_out_source`` (first ``held_out_prompts``)."""
    if not section.held_out_source or not section.held_out_prompts:
        return []
    from codescaler_jax.data.candidates import problems_of_split
    from codescaler_jax.data.problems import humaneval_problems, read_problems_jsonl

    src = section.held_out_source
    every = humaneval_problems() if src == "humaneval" else read_problems_jsonl(src)
    held = problems_of_split(every, "held_out",
                             held_out_fraction=section.held_out_fraction,
                             validation_fraction=section.validation_fraction)
    return held[: section.held_out_prompts]


class PassRateProbe:
    """Samples fixed prompt sets with the run's sampler and runs the code in a sandbox.

    Args:
        section: the probe settings.
        sets: ``{name: (problems, rendered prompt ids)}``.
        decode: ``SampleOutput -> list[str]`` (the trainer's response decoding).
        max_prompt_length: prompts longer than this are dropped (the sampler's limit).
    """

    def __init__(self, section: PassRateEvalSection,
                 sets: dict[str, tuple[Sequence[Problem], Sequence[Sequence[int]]]],
                 decode, *, max_prompt_length: int):
        from codescaler_jax.rl.rewards import ExecutionChecker

        self.section = section
        self.sets = {}
        for name, (probs, ids) in sets.items():
            keep = [i for i, x in enumerate(ids) if len(x) <= max_prompt_length]
            if keep:
                self.sets[name] = ([probs[i] for i in keep], [list(ids[i]) for i in keep])
        self.decode = decode
        self.key = jax.random.key(section.seed)
        self.checker = ExecutionChecker(time_limit_s=section.time_limit_s,
                                        workers=section.sandbox_workers)
        self.history: list[dict[str, float]] = []

    def due(self, step: int, last_step: int) -> bool:
        """Probe after ``step`` steps (0 = before any update)?"""
        e = self.section.every
        return bool(e) and (step == 0 or step % e == 0 or step == last_step)

    def __call__(self, sampler, params: Any, step: int) -> dict[str, float]:
        """Probe the policy ``params`` (``step`` updates done); returns ``{set/metric: x}``."""
        from codescaler_jax.code.extract import extract_batch

        t0 = time.perf_counter()
        k = self.section.num_samples
        sampler.load_params(params)
        out: dict[str, float] = {}
        for si, (name, (probs, ids)) in enumerate(self.sets.items()):
            rows = [p for p in ids for _ in range(k)]
            row_probs = [p for p in probs for _ in range(k)]
            lo, hi = _my_share(len(rows))
            mine = [rows[min(i, len(rows) - 1)] for i in range(lo, hi)]
            texts = self.decode(sampler.generate(mine, jax.random.fold_in(self.key, si)))
            ex = extract_batch(texts, mode="train")
            codes = [e.code if e.valid else "" for e in ex]
            passed = self.checker.passed(
                [row_probs[min(i, len(rows) - 1)] for i in range(lo, hi)], codes)
            valid = np.array([e.valid for e in ex], bool)
            if jax.process_count() > 1:  # every process's share, the filler rows dropped
                passed = gather_rows(passed)[: len(rows)]
                valid = gather_rows(valid)[: len(rows)]
            out[f"{name}/pass_rate"] = float(np.mean(passed))
            out[f"{name}/valid_code_fraction"] = float(np.mean(valid))
            out[f"{name}/problems_solved"] = float(
                np.mean(passed.reshape(len(probs), k).any(-1)))
        out["time_s"] = time.perf_counter() - t0
        self.history.append({"step": step, **out})
        return out

    def close(self) -> None:
        self.checker.close()


def _my_share(n: int) -> tuple[int, int]:
    """``[lo, hi)``: this process's equal share of ``n`` rows (indices past ``n`` are filler
    rows); one process: all of them."""
    procs = jax.process_count()
    per = -(-n // procs)
    return jax.process_index() * per, (jax.process_index() + 1) * per


def build_probe(section: PassRateEvalSection, problems: Sequence[Problem],
                prompts: Sequence[Sequence[int]], tokenizer, decode, *,
                max_prompt_length: int) -> PassRateProbe | None:
    """The probe of a run whose prompts are ``problems`` (rendered: ``prompts``), or None when
    ``section.every`` is 0. Held-out problems that are also among the run's prompts are an
    error (the run would train on what it reports as held out)."""
    if not section.every:
        return None
    from codescaler_jax.eval.sampling import render_prompts

    n = section.train_prompts
    sets = {"train": (list(problems[:n]), list(prompts[:n]))} if n else {}
    held = held_out_problems(section)
    overlap = {p.problem_id for p in held} & {p.problem_id for p in problems}
    if overlap:
        raise ValueError(f"pass_rate_eval: held-out problems {sorted(overlap)[:5]} are among "
                         "the training prompts (data.source)")
    if held:
        sets["held_out"] = (held, render_prompts(tokenizer, [p.prompt for p in held]))
    return PassRateProbe(section, sets, decode, max_prompt_length=max_prompt_length)
