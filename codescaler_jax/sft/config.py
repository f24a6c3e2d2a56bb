"""The SFT run config (``configs/sft_tiny.yaml``): every key typed, with its default and meaning.

Loaded by ``python -m codescaler_jax.train_sft --config FILE [--set key.sub=value ...]``. The
policy section is GRPO's (``rl.config.PolicySection``), so the HF export under
``<run_dir>/hf`` is what ``policy.init_from`` of a GRPO config points at.
"""

from __future__ import annotations

import dataclasses

from codescaler_jax.config import check_at_least, check_fraction
from codescaler_jax.models.sharding import MeshConfig
from codescaler_jax.rl.config import PolicySection
from codescaler_jax.rm.config import OptimSection


@dataclasses.dataclass
class SFTDataSection:
    """The examples: one user turn (the problem text, chat template of the policy) and one
    assistant turn (``response`` = a passing solution in one ```python block, then EOS).

    Only the ``train`` problems of the fixed hash split (``data/splits.py``, fractions
    ``held_out_fraction`` / ``validation_fraction``, rm_tiny's by default) are used: their
    canonical solution and up to ``rewrites`` sandbox-checked rewrites (of
    ``rewrite_candidates`` tried), docstrings stripped when ``strip_docstring`` (the prompt
    holds it). Examples whose response exceeds ``max_response_tokens`` (EOS included) or
    whose prompt exceeds ``max_prompt_length`` are dropped; ``max_problems`` keeps the first
    that many problems with an example (input order)."""

    source: str = "humaneval"
    held_out_fraction: float = 0.2
    validation_fraction: float = 0.15
    rewrites: int = 3
    rewrite_candidates: int = 4
    strip_docstring: bool = True
    max_prompt_length: int = 512
    max_response_tokens: int = 96
    max_problems: int | None = None
    sandbox_workers: int = 2

    def __post_init__(self):
        check_fraction("data", self, "held_out_fraction", "validation_fraction")
        check_at_least("data", self, rewrites=0, rewrite_candidates=0, max_prompt_length=8,
                       max_response_tokens=8, max_problems=1, sandbox_workers=1)


@dataclasses.dataclass
class SFTOptimSection(OptimSection):
    """AdamW with warmup then cosine decay; a from-scratch tiny policy wants a large LR."""

    learning_rate: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0


@dataclasses.dataclass
class SFTTrainSection:
    """``steps`` optimizer steps of ``batch_size`` examples (an epoch-wise seeded shuffle);
    ``logprob_chunk``: response positions per log-prob chunk (bounds ``[B, chunk, vocab]``)."""

    steps: int = 200
    batch_size: int = 16
    seed: int = 0
    log_every: int = 10
    logprob_chunk: int | None = 32
    export_hf: bool = True

    def __post_init__(self):
        check_at_least("train", self, steps=1, batch_size=1, log_every=1, logprob_chunk=1)


@dataclasses.dataclass
class SFTConfig:
    """Top level of ``configs/sft_*.yaml``."""

    run_dir: str = "runs/sft"
    policy: PolicySection = dataclasses.field(default_factory=PolicySection)
    data: SFTDataSection = dataclasses.field(default_factory=SFTDataSection)
    optim: SFTOptimSection = dataclasses.field(default_factory=SFTOptimSection)
    train: SFTTrainSection = dataclasses.field(default_factory=SFTTrainSection)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
