"""The GRPO run config: every key typed, with its default and meaning.

Loaded by ``python -m codescaler_jax.train_grpo --config FILE [--set key.sub=value ...]``.
Defaults of the algorithm, rollout and optimizer sections are the CodeScaler recipe (recipe
section 5.4); knob names are the ones TRL / verl users know.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

from codescaler_jax.config import check_at_least, check_fraction, check_input_path
from codescaler_jax.distributed import DistributedConfig
from codescaler_jax.models.config import MeshConfig, ModelSection
from codescaler_jax.registry import (
    ADVANTAGE_ESTIMATORS,
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    REWARDS,
    SAMPLERS,
    SHAPERS,
)
from codescaler_jax.training.config import OptimSection


@dataclasses.dataclass
class PolicySection(ModelSection):
    """The policy: a ``models.config.ModelSection`` (``init_from`` a Hugging Face
    ``Qwen3ForCausalLM`` directory such as Qwen3-8B-Base, or ``None`` for random init of
    ``size``; the attention and ``scan_layers`` knobs are used by training, the log-prob passes
    and the sampler's prefill and decode alike), plus its tokenizer."""

    key: ClassVar[str] = "policy"

    tokenizer: str = "qwen3"


@dataclasses.dataclass
class DataSection:
    """Prompts. ``source``: ``humaneval`` (the 164 bundled problems) or a problems JSONL file
    (``prompt``/``question_content``, ``tests``, ``problem_id``). Each problem's text is the
    single user turn of the policy's chat template (generation prompt added); problems whose
    rendered prompt exceeds ``max_prompt_length`` tokens are dropped (the reference filters
    overlong prompts)."""

    source: str = "humaneval"
    max_prompt_length: int = 4096
    min_prompt_bucket: int = 64
    max_problems: int | None = None

    def __post_init__(self):
        if self.max_prompt_length < 1:
            raise ValueError(f"data.max_prompt_length must be >= 1, got {self.max_prompt_length}")
        check_at_least("data", self, min_prompt_bucket=1, max_problems=1)


@dataclasses.dataclass
class RolloutSection:
    """Sampling. ``num_prompts`` x ``num_generations`` responses per step (reference 128 x 8,
    temperature 0.6, top_p 0.95, top_k 20, 16,384 new tokens). ``engine``: a name registered in
    ``generate.sampler.SAMPLERS`` (``jax``: the in-process decode loop). ``batch_size``: rows per
    decode loop on device. ``stop_strings``: extra stops besides EOS, matched as token
    sequences. ``prefill_chunk``: prefill prompts this many tokens at a time (bounds the
    prefill's attention and activation memory for long prompts); None: in one pass.
    ``engine_kwargs``: extra keyword arguments of the engine's constructor, e.g. for
    ``continuous`` ``{min_free: 4, refill_batch: 4}`` (prompts prefilled four at a time)."""

    engine: str = "jax"
    num_prompts: int = 128
    num_generations: int = 8
    max_new_tokens: int = 16384
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 20
    stop_strings: list[str] = dataclasses.field(default_factory=list)
    batch_size: int = 128
    min_response_bucket: int = 64
    prefill_chunk: int | None = None
    engine_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        SAMPLERS.check(self.engine)
        if self.engine_kwargs:
            import inspect

            accepted = inspect.signature(SAMPLERS.get(self.engine)).parameters
            unknown = sorted(set(self.engine_kwargs) - set(accepted))
            if unknown:
                raise ValueError(f"rollout.engine_kwargs: {unknown} are not arguments of "
                                 f"rollout.engine={self.engine}")
        if self.num_generations < 2:
            raise ValueError(f"rollout.num_generations must be >= 2, got {self.num_generations}")
        if self.num_prompts < 1:
            raise ValueError(f"rollout.num_prompts must be >= 1, got {self.num_prompts}")
        if self.min_response_bucket < 1:
            raise ValueError("rollout.min_response_bucket must be >= 1")
        check_at_least("rollout", self, max_new_tokens=1, temperature=0.0, top_k=0, batch_size=1)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"rollout.top_p must be in (0, 1], got {self.top_p}")
        if self.prefill_chunk is not None and self.prefill_chunk < 1:
            raise ValueError(f"rollout.prefill_chunk must be >= 1, got {self.prefill_chunk}")


@dataclasses.dataclass
class RewardSection:
    """The reward, a name registered in ``codescaler_jax.rl.rewards.REWARDS``:
    ``codescaler`` (the shaped RM score), ``execution`` (1 if all tests pass), ``mix``
    (weighted sum: ``kwargs.weights = {name: weight}``), ``token_fraction`` (synthetic).

    ``rm_path``: an HF RM directory or a ``train_rm`` run directory (its ``hf/`` export).
    ``shaping``: a ``rm.shaping`` mode (``softplus`` = the reference). ``pass_rate``: also run
    the extracted code in the sandbox to log the pass rate (a metric; never the codescaler
    reward). ``kwargs``: extra arguments of the registered reward."""

    name: str = "codescaler"
    rm_path: str | None = None
    rm_tokenizer: str | None = None
    rm_max_length: int = 4096
    rm_batch_size: int = 16
    rm_dtype: Literal["float32", "bfloat16"] | None = None
    shaping: str = "softplus"
    pass_rate: bool = True
    sandbox_time_limit_s: float = 2.0
    sandbox_workers: int = 2
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        REWARDS.check(self.name)
        if self.shaping not in SHAPERS:
            raise ValueError(f"shaping: unknown mode {self.shaping!r}; allowed {sorted(SHAPERS)}")
        check_at_least("reward", self, rm_max_length=8, rm_batch_size=1, sandbox_workers=1)
        if self.sandbox_time_limit_s <= 0:
            raise ValueError(
                f"reward.sandbox_time_limit_s must be > 0, got {self.sandbox_time_limit_s}"
            )


@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
    """Knobs of the GRPO policy loss; defaults are the CodeScaler recipe (section 5.1)."""

    epsilon: float = 0.2
    """Lower clip range: the ratio is clipped below at ``1 - epsilon`` (verl clip_ratio_low)."""

    epsilon_high: float | None = 0.28
    """Upper clip range: clipped above at ``1 + epsilon_high`` (DAPO clip-higher); None means
    the same as ``epsilon`` (symmetric PPO)."""

    dual_clip: float | None = 3.0
    """verl dual-clip constant c > 1: for A < 0 the per-token loss is capped at ``-c * A`` so a
    huge ratio on a bad token cannot dominate; None disables the cap."""

    loss_agg_mode: str = "token-mean"
    """How per-token losses become one scalar: one of ``LOSS_AGGREGATIONS`` ("token-mean",
    "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")."""

    loss_agg_constant: float | None = None
    """The constant C of "seq-mean-token-sum-norm" (Dr.GRPO: the max response length); None
    uses the padded response length T of the mask."""

    beta: float = 0.0
    """Weight of the per-token KL-to-reference term; 0 means no reference model is needed."""

    kl_estimator: str = "k3"
    """KL estimator for the ``beta`` term: one of ``KL_ESTIMATORS`` ("k1", "k2", "k3")."""

    kl_clamp: float | None = 10.0
    """The KL estimate per token is clamped to [-kl_clamp, kl_clamp] (verl); None disables."""

    log_ratio_clamp: float = 20.0
    """``logp - old_logp`` is clamped to +-this before ``exp`` so the ratio cannot overflow."""

    def __post_init__(self):
        LOSS_AGGREGATIONS.check(self.loss_agg_mode)
        KL_ESTIMATORS.check(self.kl_estimator)
        if not 0.0 < self.epsilon < 1.0:
            raise ValueError(f"epsilon must be in (0, 1), got {self.epsilon}")
        if self.epsilon_high is not None and self.epsilon_high <= 0.0:
            raise ValueError(f"epsilon_high must be > 0 or None, got {self.epsilon_high}")
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1 or None, got {self.dual_clip}")
        if self.loss_agg_constant is not None and self.loss_agg_constant <= 0.0:
            raise ValueError(f"loss_agg_constant must be > 0 or None, got {self.loss_agg_constant}")
        if self.beta < 0.0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.kl_clamp is not None and self.kl_clamp <= 0.0:
            raise ValueError(f"kl_clamp must be > 0 or None, got {self.kl_clamp}")
        if self.log_ratio_clamp <= 0.0:
            raise ValueError(f"log_ratio_clamp must be > 0, got {self.log_ratio_clamp}")

    @property
    def clip_high(self) -> float:
        """The effective upper clip range (``epsilon_high``, or ``epsilon`` when None)."""
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


@dataclasses.dataclass
class AlgorithmSection:
    """GRPO. ``estimator`` / ``scale_rewards`` / ``eps``: ``rl.advantages``; ``epsilon``,
    ``epsilon_high``, ``dual_clip``, ``loss_agg_mode``, ``beta``, ``kl_estimator``,
    ``kl_clamp``: ``rl.losses.PolicyLossConfig`` (a reference model is built only when
    ``beta > 0``). ``num_minibatches``: optimizer updates per step (reference 2);
    ``micro_batches``: gradient accumulation per mini-batch (memory only). ``logprob_chunk``:
    response positions per log-prob chunk (bounds the ``[rows, chunk, vocab]`` logits).
    ``ppo_max_token_len_per_device``: pack the update's sequences into micro-batches of this
    many tokens per device (verl ``ppo_max_token_len_per_gpu``; ``rl.packing``, exact for
    every ``loss_agg_mode``); None: padded rows (the default). ``old_logprobs``: where the
    update's old log-probs come from: ``recompute`` (the actor's forward pass over the rollout,
    the reference's way; the sampler's own log-probs are then logged against it as
    ``rollout/sampler_learner_kl``) or ``sampler`` (the sampler's log-probs as they are, no
    recompute pass; only with ``num_minibatches: 1``, where the one update starts from the
    sampling parameters)."""

    estimator: str = "grpo"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    eps: float = 1e-6
    epsilon: float = 0.2
    epsilon_high: float | None = 0.28
    dual_clip: float | None = 3.0
    loss_agg_mode: str = "token-mean"
    beta: float = 0.0
    kl_estimator: str = "k3"
    kl_clamp: float | None = 10.0
    num_minibatches: int = 2
    micro_batches: int = 1
    logprob_chunk: int | None = 1024
    ppo_max_token_len_per_device: int | None = None
    old_logprobs: Literal["recompute", "sampler"] = "recompute"

    def __post_init__(self):
        ADVANTAGE_ESTIMATORS.check(self.estimator)
        self.loss_config()  # validates the loss knobs now, naming the bad one
        if self.num_minibatches < 1 or self.micro_batches < 1:
            raise ValueError("algorithm.num_minibatches and micro_batches must be >= 1")
        if self.old_logprobs == "sampler" and self.num_minibatches != 1:
            raise ValueError(
                "algorithm.old_logprobs=sampler needs algorithm.num_minibatches=1 (got "
                f"{self.num_minibatches}): with one update per step the update starts from "
                "the parameters that sampled, so their log-probs can stand in for the "
                "recomputed ones; with several, use algorithm.old_logprobs=recompute")
        check_at_least("algorithm", self, logprob_chunk=1, eps=0.0,
                       ppo_max_token_len_per_device=1)

    def loss_config(self) -> PolicyLossConfig:
        """The policy-loss knobs of this section."""
        return PolicyLossConfig(
            epsilon=self.epsilon, epsilon_high=self.epsilon_high, dual_clip=self.dual_clip,
            loss_agg_mode=self.loss_agg_mode, beta=self.beta, kl_estimator=self.kl_estimator,
            kl_clamp=self.kl_clamp,
        )


@dataclasses.dataclass
class GRPOOptimSection(OptimSection):
    """AdamW, lr 1e-6, betas (0.9, 0.999), weight decay 0.01, grad clip 1.0, 10 warmup steps
    then constant (the reference). Steps here are train steps (the LR is the same for all
    mini-batch updates of one step)."""

    learning_rate: float = 1e-6
    warmup_steps: int = 10
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    min_lr_ratio: float = 1.0


@dataclasses.dataclass
class TrainSection:
    """Steps, seeds, logging and checkpoint cadence."""

    steps: int = 250
    seed: int = 0
    log_every: int = 1
    samples_every: int = 1
    num_text_samples: int = 2
    save_every: int = 50
    keep_checkpoints: int = 2
    export_hf: bool = True

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"train.steps must be >= 1, got {self.steps}")
        check_at_least(
            "train", self, log_every=1, samples_every=0, num_text_samples=0, save_every=0,
            keep_checkpoints=1,
        )


@dataclasses.dataclass
class PassRateEvalSection:
    """``pass_rate_eval`` of a GRPO config. ``every``: probe cadence in steps (0: off).
    ``held_out_source``: ``humaneval``, a problems JSONL file, or ``None`` (no held-out probe);
    its held-out split is taken with ``held_out_fraction`` / ``validation_fraction`` (the
    rule of ``configs/rm_tiny.yaml`` by default). ``seed``: the probe's fixed sampling key."""

    every: int = 0
    train_prompts: int = 16
    held_out_source: str | None = "humaneval"
    held_out_fraction: float = 0.2
    validation_fraction: float = 0.15
    held_out_prompts: int = 16
    num_samples: int = 2
    seed: int = 1234
    time_limit_s: float = 2.0
    sandbox_workers: int = 2

    def __post_init__(self):
        check_at_least("pass_rate_eval", self, every=0, train_prompts=0, held_out_prompts=0,
                       num_samples=1, sandbox_workers=1)
        check_fraction("pass_rate_eval", self, "held_out_fraction", "validation_fraction")


@dataclasses.dataclass
class GRPOConfig:
    """Top level of ``configs/grpo_*.yaml``."""

    run_dir: str = "runs/grpo"
    policy: PolicySection = dataclasses.field(default_factory=PolicySection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    rollout: RolloutSection = dataclasses.field(default_factory=RolloutSection)
    reward: RewardSection = dataclasses.field(default_factory=RewardSection)
    algorithm: AlgorithmSection = dataclasses.field(default_factory=AlgorithmSection)
    optim: GRPOOptimSection = dataclasses.field(default_factory=GRPOOptimSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    pass_rate_eval: PassRateEvalSection = dataclasses.field(default_factory=PassRateEvalSection)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)

    def check_paths(self) -> None:
        """Raise ``ConfigError`` naming the key of an input path that does not exist (called
        before any data or model work, not at load)."""
        check_input_path("data.source", self.data.source, need="file")
        check_input_path("policy.init_from", self.policy.init_from, need="dir")
        check_input_path("policy.tokenizer", self.policy.tokenizer, need="dir")
        check_input_path(
            "reward.rm_path", self.reward.rm_path, need="dir",
            hint="train one first: python -m codescaler_jax.train_rm --config "
            "configs/rm_tiny.yaml writes runs/rm_tiny; or point it at a Hugging Face RM",
        )
        check_input_path("reward.rm_tokenizer", self.reward.rm_tokenizer, need="dir")

    def __post_init__(self):
        rows = self.rollout.num_prompts * self.rollout.num_generations
        a = self.algorithm
        if rows % a.num_minibatches:
            raise ValueError(
                f"rollout.num_prompts x rollout.num_generations = {rows} responses are not "
                f"divisible by algorithm.num_minibatches={a.num_minibatches}"
            )
        if (rows // a.num_minibatches) % a.micro_batches:
            raise ValueError(
                f"a mini-batch of {rows // a.num_minibatches} responses is not divisible by "
                f"algorithm.micro_batches={a.micro_batches}"
            )
