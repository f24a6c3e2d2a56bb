"""The reward-model training config: every key typed, with its default and meaning.

Loaded by ``python -m codescaler_jax.train_rm --config FILE [--set key.sub=value ...]``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from codescaler_jax.config import check_at_least, check_fraction, check_input_path
from codescaler_jax.distributed import DistributedConfig
from codescaler_jax.models.config import (  # noqa: F401  (re-exported: their old home)
    COMPUTE_KEYS,
    MeshConfig,
    ModelSection,
    check_attention_blocks,
    compute_overrides,
)
from codescaler_jax.training.config import OptimSection  # noqa: F401  (re-exported)


@dataclasses.dataclass
class DataSection:
    """Where pairs come from and how they become tokens.

    ``source``: ``humaneval`` (verified pairs built from the bundled HumanEval problems: the
    canonical solution vs mutants the sandbox shows to fail), or a pair file/dataset in the
    CodeScaler schema (``question_content``, ``code_pos``, ``code_neg``: .jsonl, .parquet, a
    ``datasets`` name or a saved dataset directory).

    ``pairs_recipe`` (``humaneval`` only): ``canonical_mutants`` (the canonical solution vs its
    mutants, ``mutants_per_problem`` / ``line_mutant_fraction``, split after building) or
    ``augmented`` (``data/augmented.py``: problems split first by the fixed hash rule, passing
    rewrites as further positives, ``mutants_per_positive`` mutants of every positive over
    ``train_mutant_kinds``; validation and held-out problems always get every kind).
    ``eval_fraction`` of the problems are held out; ``validation_fraction`` (of all problems)
    are carved from the rest for validation (early stopping, model selection); the held-out
    problems are evaluated only untrained and at the end.
    """

    source: str = "humaneval"
    eval_source: str | None = None
    eval_fraction: float = 0.2
    tokenizer: str = "qwen3"
    max_length: int = 512
    min_bucket: int = 64
    buckets_per_octave: int = 1  # 2: also 1.5x bucket lengths (192, 384, ...): less padding
    group_by_length: bool = False  # training batches of similar length (less padding)
    mutants_per_problem: int = 8
    line_mutant_fraction: float = 0.25
    max_pairs_per_problem: int = 16
    unaligned_fraction: float = 0.0
    pairs_recipe: Literal["canonical_mutants", "augmented"] = "canonical_mutants"
    validation_fraction: float = 0.0
    rewrites_per_problem: int = 3
    rewrite_candidates: int = 6
    rewrite_transforms: list[str] | None = None  # None: every transform of data/rewrites.py
    mutants_per_positive: int = 9
    # training problems only: mutants per positive there (None: mutants_per_positive); the
    # validation and held-out problems keep mutants_per_positive, so their pairs do not move
    train_mutants_per_positive: int | None = None
    train_mutant_kinds: list[str] | None = None  # None: every kind of FINE_MUTANT_KINDS
    cross_pairs_per_problem: int = 0
    # Training pairs only, applied after the cached splits are read (data/debias.py): comment
    # filler on one side so that "the longer input wins" is a fair coin in training.
    train_length_debias: Literal["none", "replace", "add"] = "none"
    train_length_debias_margin: int = 16  # the longer side leads by 1..margin tokens
    # Training pairs only (data/corpus.py): unverified "naturalness" pairs, functions of the
    # interpreter's standard library vs mutants of them, added to the training pairs. 0: none.
    corpus_functions: int = 0
    corpus_mutants_per_function: int = 2
    corpus_mutant_kinds: list[str] | None = None  # None: every kind of FINE_MUTANT_KINDS
    max_problems: int | None = None  # humaneval: only the first N problems (tests, quick runs)
    skip_bad: bool = False
    max_record_bytes: int = 1 << 20
    max_pairs: int | None = None
    sandbox_workers: int = 2
    sandbox_time_limit_s: float = 5.0
    # a candidate that timed out runs once more at this many times the limit (1: never), so
    # that a slow but correct program's label does not depend on the machine's load
    sandbox_timeout_retry_factor: float = 4.0

    def __post_init__(self):
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        check_at_least(
            "data", self, max_length=8, min_bucket=1, mutants_per_problem=1,
            max_pairs_per_problem=1, max_record_bytes=1, max_pairs=1, sandbox_workers=1,
            rewrites_per_problem=0, rewrite_candidates=1, mutants_per_positive=1,
            train_mutants_per_positive=1,
            cross_pairs_per_problem=0, max_problems=1, buckets_per_octave=1,
            train_length_debias_margin=1,
            corpus_functions=0, corpus_mutants_per_function=1,
        )
        check_fraction("data", self, "line_mutant_fraction", "unaligned_fraction")
        if self.sandbox_time_limit_s <= 0:
            raise ValueError(
                f"data.sandbox_time_limit_s must be > 0, got {self.sandbox_time_limit_s}"
            )
        if self.sandbox_timeout_retry_factor < 1:
            raise ValueError("data.sandbox_timeout_retry_factor must be >= 1, got "
                             f"{self.sandbox_timeout_retry_factor}")
        if not 0.0 <= self.validation_fraction < 1.0 - self.eval_fraction:
            raise ValueError(
                f"data.validation_fraction must be in [0, 1 - data.eval_fraction), "
                f"got {self.validation_fraction}"
            )
        from codescaler_jax.data.mutants import FINE_MUTANT_KINDS, TRAIN_ONLY_MUTANT_KINDS
        from codescaler_jax.data.rewrites import TRANSFORMS

        for key, given, known in (
            ("train_mutant_kinds", self.train_mutant_kinds,
             FINE_MUTANT_KINDS + TRAIN_ONLY_MUTANT_KINDS),
            ("corpus_mutant_kinds", self.corpus_mutant_kinds,
             FINE_MUTANT_KINDS + TRAIN_ONLY_MUTANT_KINDS),
            ("rewrite_transforms", self.rewrite_transforms, tuple(TRANSFORMS)),
        ):
            bad = [k for k in given or () if k not in known]
            if bad:
                raise ValueError(f"data.{key}: unknown {bad}; known: {list(known)}")


@dataclasses.dataclass
class TrainSection:
    """Steps, batches, loss options, evaluation and checkpoint cadence."""

    global_batch_size: int = 16
    grad_accum_steps: int = 1
    num_epochs: int = 1
    max_steps: int | None = None
    margin: float = 0.0
    center_rewards_coefficient: float | None = None
    eval_every: int = 50  # validation (or, without one, held-out) evaluation cadence
    eval_batch_size: int = 16
    early_stopping_patience: int | None = None  # stop after this many validation evaluations
    # without a better validation accuracy (needs data.validation_fraction > 0)
    select_best: bool = True  # with a validation split: keep the best-validation parameters
    # An exponential moving average of the parameters (decay per step), evaluated and kept in
    # place of the raw ones (validation, best selection, held-out, the exported model); None:
    # off. Not checkpointed: a resumed run restarts it from the resumed parameters.
    ema_decay: float | None = None
    save_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 1
    seed: int = 0
    export_hf: bool = True

    def __post_init__(self):
        # Ranges first: a zero or negative count fails here, naming its key, instead of as a
        # ZeroDivisionError below or a Grain error after the data is built.
        check_at_least(
            "train", self, global_batch_size=1, grad_accum_steps=1, num_epochs=1, max_steps=1,
            eval_every=0, eval_batch_size=1, save_every=0, keep_checkpoints=1, log_every=1,
            early_stopping_patience=1,
        )
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"train.ema_decay must be in [0, 1) or null, got {self.ema_decay}")
        if self.global_batch_size % self.grad_accum_steps:
            raise ValueError(
                f"train.global_batch_size={self.global_batch_size} is not divisible by "
                f"train.grad_accum_steps={self.grad_accum_steps}"
            )


@dataclasses.dataclass
class RMTrainConfig:
    """Top level of ``configs/rm_*.yaml``."""

    run_dir: str = "runs/rm"
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)

    def check_paths(self) -> None:
        """Raise ``ConfigError`` naming the key of an input path that does not exist.

        Called before any data work (not at load: a finished run's config stays loadable after
        its data files are gone)."""
        check_input_path("data.source", self.data.source)
        check_input_path("data.eval_source", self.data.eval_source)
        check_input_path("data.tokenizer", self.data.tokenizer, need="dir")
        check_input_path("model.init_from", self.model.init_from, need="dir")
