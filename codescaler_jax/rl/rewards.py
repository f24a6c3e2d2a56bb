"""GRPO rewards, registered by name: one scalar per response.

A reward is built once by its registered factory, ``REWARDS.get(name)(section, mesh)``, and
then called on every rollout: ``reward_fn(batch: RolloutBatch) -> RewardResult``. A new reward
(say, a blend with a format bonus) is a new registered factory; the trainer only knows the
interface.

- ``codescaler`` (the reference's training reward, recipe 2.3 and 4.1): extract the code of each
  response with the training extractor (exactly one fenced block, stripped, parseable), render
  (problem, code) with the RM tokenizer's own chat template, score with the RM co-located on
  the policy's mesh (``RewardScorer``, its parameters sharded by the policy's rules), then shape
  on device: softplus(score) for valid code, 0 otherwise. The scores never come to the host
  on the way: ``RewardResult.device_rewards`` feeds the trainer's jitted advantages, and the
  host gets copies of the scores and rewards for logging.
  Invalid responses are not sent to the RM when the shaping ignores their score (every mode
  but ``raw_unguarded``): their reward is fixed whatever the RM would say.
- ``execution``: the binary baseline (recipe 5.6): 1 if the extracted code passes all of the
  problem's tests in the sandbox, else 0 (no code is 0 without running anything).
- ``mix``: ``sum_k w_k * reward_k`` over other registered rewards (``kwargs.weights``).
- ``token_fraction``: the fraction of response tokens equal to ``kwargs.token_id``; synthetic,
  for checking that the loop learns without an RM or a sandbox.

Every result carries the extraction (code, validity, reason) and, where the sandbox ran, the
pass/fail of each response, so the trainer can log the valid-code fraction and pass rate.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from codescaler_jax.code.extract import Extraction, extract_batch
from codescaler_jax.config import ConfigError
from codescaler_jax.data.problems import Problem
from codescaler_jax.registry import REWARDS, SHAPERS

if TYPE_CHECKING:
    from jax.sharding import Mesh

    from codescaler_jax.rl.config import RewardSection
    from codescaler_jax.rm.scorer import RewardScorer

log = logging.getLogger("codescaler_jax")


@dataclasses.dataclass
class RolloutBatch:
    """The responses of one rollout step, one entry per response.

    Attributes:
        problems: the problem each response answers.
        responses: decoded response text (EOS removed).
        response_ids: the response token ids (EOS included), for token-level rewards.
    """

    problems: Sequence[Problem]
    responses: Sequence[str]
    response_ids: Sequence[Sequence[int]]

    def __post_init__(self):
        if not len(self.problems) == len(self.responses) == len(self.response_ids):
            raise ValueError(
                f"RolloutBatch: {len(self.problems)} problems, {len(self.responses)} responses, "
                f"{len(self.response_ids)} token lists"
            )

    def __len__(self) -> int:
        return len(self.responses)


@dataclasses.dataclass
class RewardResult:
    """Rewards of one batch and what they were computed from.

    Attributes:
        rewards: ``[B]`` float32.
        extractions: the training-mode extraction of each response.
        passed: pass/fail of the responses whose problem has tests (all of them for
            ``execution``) when the sandbox ran, else None; its mean is the pass rate.
        scores: ``[B]`` float32 raw RM scores (NaN where not scored), else None.
        metrics: scalars for TensorBoard (the trainer adds the reward statistics).
        device_rewards: the same rewards as a ``[B]`` array on the mesh when they were
            computed there (the co-located RM: scores and shaping never leave the device;
            ``rewards`` is the host copy for logging), else None. The trainer's advantages
            take this one when it is there.
    """

    rewards: np.ndarray
    extractions: list[Extraction]
    passed: np.ndarray | None = None
    scores: np.ndarray | None = None
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    device_rewards: Any = None

    @property
    def valid(self) -> np.ndarray:
        """``[B]`` bool: the response has exactly one parseable code block."""
        return np.array([e.valid for e in self.extractions], bool)


RewardFn = Callable[[RolloutBatch], RewardResult]
RewardFactory = Callable[..., RewardFn]


def build_reward(section: RewardSection, mesh: Mesh) -> RewardFn:
    """The reward named ``section.name``, built for ``mesh``."""
    return REWARDS.get(section.name)(section, mesh)


def close_reward(fn: RewardFn) -> None:
    """Release what a reward holds (a sandbox), if it holds anything."""
    close = getattr(fn, "close", None)
    if close is not None:
        close()


def extraction_metrics(extractions: Sequence[Extraction]) -> dict[str, float]:
    """Valid-code fraction and the fraction of each failure reason."""
    n = max(len(extractions), 1)
    counts = Counter(e.reason for e in extractions)
    out = {"valid_code_fraction": sum(e.valid for e in extractions) / n}
    for reason in ("no_block", "multiple_blocks", "syntax_error", "empty"):
        out[f"extract/{reason}"] = counts.get(reason, 0) / n
    return out


class ExecutionChecker:
    """Runs extracted code against problem tests in one sandbox kept open across steps (its
    runner servers start once). ``close`` stops it."""

    def __init__(self, *, time_limit_s: float = 2.0, workers: int = 2):
        self.time_limit_s = time_limit_s
        self.workers = workers
        self._sandbox = None

    def passed(self, problems: Sequence[Problem], codes: Sequence[str]) -> np.ndarray:
        """``[B]`` bool: ``codes[i]`` passes all tests of ``problems[i]``.

        Empty code fails without running. Every problem must carry tests.
        """
        from codescaler_jax.code.sandbox import Sandbox, SandboxConfig, tests_from_record

        passed = np.zeros(len(codes), bool)
        jobs, where = [], []
        for i, (prob, code) in enumerate(zip(problems, codes, strict=True)):
            if not prob.tests:
                raise ValueError(f"problem {prob.problem_id!r} has no tests to execute")
            if code:
                jobs.append((code, tests_from_record(prob.tests)))
                where.append(i)
        if jobs:
            if self._sandbox is None:
                self._sandbox = Sandbox(SandboxConfig(
                    time_limit_s=self.time_limit_s, workers=self.workers,
                    stop_on_first_failure=True))
            for i, res in zip(where, self._sandbox.run_many(jobs), strict=True):
                passed[i] = bool(res.passed)
        return passed

    def close(self) -> None:
        if self._sandbox is not None:
            self._sandbox.close()
            self._sandbox = None


class CodeScalerReward:
    """Shaped RM reward (see the module docstring).

    Args:
        scorer: the RM and its tokenizer.
        shaping: a ``rm.shaping`` mode (``softplus`` is the reference).
        pass_rate: also run valid code in the sandbox for the pass-rate metric (problems
            without tests are skipped).
    """

    def __init__(
        self,
        scorer: RewardScorer,
        *,
        shaping: str = "softplus",
        pass_rate: bool = False,
        time_limit_s: float = 2.0,
        workers: int = 2,
    ):
        if shaping not in SHAPERS:
            raise ValueError(f"reward.shaping: unknown mode {shaping!r}; allowed {sorted(SHAPERS)}")
        self.scorer = scorer
        self.shaping = shaping
        self.tests = (ExecutionChecker(time_limit_s=time_limit_s, workers=workers)
                      if pass_rate else None)

    def __call__(self, batch: RolloutBatch) -> RewardResult:
        import jax

        ex = extract_batch(batch.responses, mode="train")
        valid = np.array([e.valid for e in ex], bool)
        # Only the score of a valid response can change its reward, except when unguarded.
        todo = np.arange(len(ex)) if self.shaping == "raw_unguarded" else np.flatnonzero(valid)
        scorer = self.scorer
        problems = [batch.problems[i].prompt for i in todo]
        codes = [ex[i].code for i in todo]
        scores = np.full(len(ex), np.nan, np.float32)
        if hasattr(scorer, "score_ids_on_device") and jax.process_count() == 1:
            # Co-located: the RM's scores stay on the mesh (0 where not scored) and are shaped
            # there with the host's validity mask; only copies come to the host, for logging.
            seqs = scorer.encode(problems, codes) if len(todo) else []
            raw = scorer.score_ids_on_device(seqs, todo, len(ex))
            scores[todo] = _host_copy(raw)[todo]
        else:
            # A scorer off the mesh (host scores, e.g. a remote RM), or multi-host: every
            # process joins the scorer's collective passes with its own rows (or none).
            if len(todo) or jax.process_count() > 1:
                scores[todo] = scorer.score(problems, codes)
            raw = np.nan_to_num(scores, nan=0.0)
        with jax.set_mesh(scorer.mesh):
            rewards_dev = _shape_on_device()(raw, valid, mode=self.shaping)
        rewards = _host_copy(rewards_dev)
        if jax.process_count() > 1:
            rewards_dev = None  # this process's rows only: the trainer globalises host rewards
        metrics = extraction_metrics(ex)
        if valid.any():
            metrics["rm_score_valid_mean"] = float(np.mean(scores[valid]))
        passed = None
        tested = [i for i, p in enumerate(batch.problems) if p.tests]
        if self.tests is not None and tested:
            # The pass rate is measured over responses whose problem has tests.
            passed = self.tests.passed([batch.problems[i] for i in tested],
                                       [ex[i].code for i in tested])
        return RewardResult(rewards, ex, passed, scores, metrics, device_rewards=rewards_dev)

    def close(self) -> None:
        if self.tests is not None:
            self.tests.close()


def _shape(scores, valid, *, mode: str):
    """``rm.shaping.shape_rewards`` of the scores with NaN (not scored) as 0."""
    import jax.numpy as jnp

    from codescaler_jax.rm.shaping import shape_rewards

    return shape_rewards(jnp.nan_to_num(jnp.asarray(scores, jnp.float32), nan=0.0), valid,
                         mode=mode)


@functools.cache
def _shape_on_device():
    """The jitted `_shape` (built on first use: importing this module imports no jax)."""
    import jax

    return jax.jit(_shape, static_argnames=("mode",))


def _host_copy(x) -> np.ndarray:
    """The host's copy of a ``[B]`` device array (for logging; replicated: this process's)."""
    import jax

    if x.sharding.is_fully_replicated:
        return np.asarray(x.addressable_shards[0].data, np.float32)
    return np.asarray(jax.device_get(x), np.float32)


def load_scorer(section: RewardSection, mesh: Mesh) -> RewardScorer:
    """The RM named by ``reward.rm_path`` on ``mesh``, with a clear error when it is missing."""
    from codescaler_jax.rm.scorer import RewardScorer, resolve_rm_path

    if not section.rm_path:
        raise ConfigError("reward.rm_path is not set: the codescaler reward needs a reward model")
    try:
        path, _ = resolve_rm_path(section.rm_path)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"reward.rm_path={section.rm_path!r}: no reward model there (no config.json, no "
            "train_rm hf/ export or checkpoints). Train one first: python -m "
            "codescaler_jax.train_rm --config configs/rm_tiny.yaml (writes runs/rm_tiny), or "
            "point reward.rm_path at a Hugging Face RM directory such as a CodeScaler checkpoint."
        ) from None
    return RewardScorer.from_pretrained(
        path, tokenizer=section.rm_tokenizer, mesh=mesh, dtype=section.rm_dtype,
        max_length=section.rm_max_length, batch_size=section.rm_batch_size,
    )


@REWARDS.register("codescaler")
def _codescaler(section: RewardSection, mesh: Mesh) -> RewardFn:
    return CodeScalerReward(
        load_scorer(section, mesh), shaping=section.shaping, pass_rate=section.pass_rate,
        time_limit_s=section.sandbox_time_limit_s, workers=section.sandbox_workers,
    )


class ExecutionReward:
    """1.0 if the extracted code passes all tests in the sandbox, else 0.0."""

    def __init__(self, *, time_limit_s: float = 2.0, workers: int = 2):
        self.tests = ExecutionChecker(time_limit_s=time_limit_s, workers=workers)

    def __call__(self, batch: RolloutBatch) -> RewardResult:
        ex = extract_batch(batch.responses, mode="train")
        passed = self.tests.passed(batch.problems, [e.code for e in ex])
        return RewardResult(passed.astype(np.float32), ex, passed, None, extraction_metrics(ex))

    def close(self) -> None:
        self.tests.close()


@REWARDS.register("execution")
def _execution(section: RewardSection, mesh: Mesh) -> RewardFn:
    return ExecutionReward(
        time_limit_s=section.sandbox_time_limit_s, workers=section.sandbox_workers
    )


class MixReward:
    """``sum_k weights[k] * reward_k``; metrics of each part are prefixed by its name."""

    def __init__(self, parts: dict[str, tuple[float, RewardFn]]):
        if not parts:
            raise ValueError("mix reward: no parts")
        self.parts = parts

    def __call__(self, batch: RolloutBatch) -> RewardResult:
        total = np.zeros(len(batch), np.float32)
        metrics: dict[str, float] = {}
        first: RewardResult | None = None
        passed = None
        results = []
        for name, (weight, fn) in self.parts.items():
            res = fn(batch)
            results.append(res)
            total += np.float32(weight) * res.rewards
            metrics.update({f"{name}/{k}": v for k, v in res.metrics.items()})
            metrics[f"{name}/reward_mean"] = float(res.rewards.mean())
            first = first or res
            passed = res.passed if passed is None else passed
        metrics.update(extraction_metrics(first.extractions))
        # On device too when every part is (e.g. a mix of co-located RMs).
        device = None
        if all(r.device_rewards is not None for r in results):
            device = sum(np.float32(w) * r.device_rewards
                         for (w, _), r in zip(self.parts.values(), results, strict=True))
        return RewardResult(total, first.extractions, passed, first.scores, metrics,
                            device_rewards=device)

    def close(self) -> None:
        for _, fn in self.parts.values():
            close_reward(fn)


@REWARDS.register("mix")
def _mix(section: RewardSection, mesh: Mesh) -> RewardFn:
    weights: dict[str, Any] = section.kwargs.get("weights") or {}
    if not weights or "mix" in weights:
        raise ValueError(
            "reward.kwargs.weights must map other reward names to weights, e.g. "
            "{codescaler: 1.0, execution: 0.5}"
        )
    parts = {}
    for name, w in weights.items():
        inner = dataclasses.replace(section, name=name, pass_rate=False if name != "codescaler"
                                    else section.pass_rate)
        parts[name] = (float(w), REWARDS.get(name)(inner, mesh))
    return MixReward(parts)


class TokenFractionReward:
    """Fraction of response tokens equal to ``token_id`` (synthetic; no code involved)."""

    def __init__(self, token_id: int):
        self.token_id = int(token_id)

    def __call__(self, batch: RolloutBatch) -> RewardResult:
        rewards = np.array(
            [np.mean(np.asarray(ids) == self.token_id) if len(ids) else 0.0
             for ids in batch.response_ids],
            np.float32,
        )
        ex = extract_batch(batch.responses, mode="train")
        return RewardResult(rewards, ex, None, None, extraction_metrics(ex))


@REWARDS.register("token_fraction")
def _token_fraction(section: RewardSection, mesh: Mesh) -> RewardFn:
    if "token_id" not in section.kwargs:
        raise ValueError("reward.kwargs.token_id is required by the token_fraction reward")
    return TokenFractionReward(section.kwargs["token_id"])
