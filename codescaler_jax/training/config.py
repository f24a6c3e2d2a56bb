"""Run-config sections both trainers share; nothing here imports jax.

``OptimSection`` is the optimizer section of the RM config (``optim``) and, with the
recipe's GRPO defaults, of the GRPO config; ``training.optim`` builds the optax optimizer
and schedule from it.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from codescaler_jax.config import check_at_least, check_fraction


@dataclasses.dataclass
class OptimSection:
    """AdamW with linear warmup then ``schedule`` (constant, cosine or linear decay)."""

    learning_rate: float = 1e-4
    warmup_steps: int = 10
    schedule: Literal["constant", "cosine", "linear"] = "cosine"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    freeze: list[str] = dataclasses.field(default_factory=list)  # param path prefixes to freeze

    def __post_init__(self):
        check_at_least(
            "optim", self, learning_rate=0.0, warmup_steps=0, weight_decay=0.0,
            max_grad_norm=0.0,
        )
        check_fraction("optim", self, "min_lr_ratio", "b1", "b2")
        if self.eps <= 0:
            raise ValueError(f"optim.eps must be > 0, got {self.eps}")
