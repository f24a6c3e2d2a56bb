"""Outcome advantages for GRPO-style training: one scalar reward per response -> one advantage.

Responses come in groups of ``num_generations`` consecutive samples of the same prompt (the
sampler's layout). An estimator subtracts a per-group baseline (registered by name in
``ADVANTAGE_ESTIMATORS``); ``scale_rewards`` then divides by a standard deviation, the
orthogonal knob TRL users know:

- ``"group"``: the group's unbiased (ddof=1) std + eps. With ``estimator="grpo"`` this is the
  CodeScaler / verl ``compute_grpo_outcome_advantage`` (recipe section 5.2).
- ``"batch"``: the unbiased std of all rewards in the batch + eps (TRL ``scale_rewards="batch"``).
- ``"none"``: no division (Dr.GRPO; with ``estimator="rloo"`` the classic RLOO advantage).

A group whose rewards are all equal carries no learning signal and gets exactly 0 in every
mode (tested by exact equality, not via a float mean that may not round back to the value).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from codescaler_jax.registry import ADVANTAGE_ESTIMATORS

Baseline = Callable[[jax.Array], jax.Array]

SCALE_REWARDS = ("group", "batch", "none")


@ADVANTAGE_ESTIMATORS.register("grpo")
def grpo_centered(grouped: jax.Array) -> jax.Array:
    """R_i - mean_G(R). ``grouped``: [num_groups, G] -> [num_groups, G]."""
    return grouped - jnp.mean(grouped, axis=1, keepdims=True)


@ADVANTAGE_ESTIMATORS.register("rloo")
def rloo_centered(grouped: jax.Array) -> jax.Array:
    """R_i - mean of the other G-1 rewards (leave-one-out baseline).

    ``grouped``: [num_groups, G] -> [num_groups, G]; needs G >= 2.
    """
    g = grouped.shape[1]
    others_mean = (jnp.sum(grouped, axis=1, keepdims=True) - grouped) / (g - 1)
    return grouped - others_mean


def compute_advantages(
    rewards: jax.Array,
    *,
    num_generations: int,
    estimator: str = "grpo",
    scale_rewards: str = "group",
    eps: float = 1e-6,
) -> jax.Array:
    """Per-response advantages from per-response rewards.

    Args:
      rewards: [B] scalar reward per response, groups of ``num_generations`` consecutive rows.
      num_generations: group size G (>= 2); B must be a multiple of it.
      estimator: a name in ``ADVANTAGE_ESTIMATORS`` ("grpo", "rloo").
      scale_rewards: "group" | "batch" | "none" (see module docstring).
      eps: added to the std before dividing.

    Returns:
      [B] advantages, float32 (float64 if ``rewards`` is float64).

    All arguments but ``rewards`` are static under ``jax.jit``.
    """
    centered_fn = ADVANTAGE_ESTIMATORS.get(estimator)
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(
            f"scale_rewards: unknown value {scale_rewards!r}; allowed: {list(SCALE_REWARDS)}"
        )
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be [batch], got shape {rewards.shape}")
    if num_generations < 2:
        # ddof=1 std and the leave-one-out mean are undefined for a group of one.
        raise ValueError(f"num_generations must be >= 2, got {num_generations}")
    if rewards.shape[0] % num_generations:
        raise ValueError(
            f"batch size {rewards.shape[0]} is not a multiple of num_generations={num_generations}"
        )

    dtype = jnp.float64 if rewards.dtype == jnp.float64 else jnp.float32
    rewards = rewards.astype(dtype)
    grouped = rewards.reshape(-1, num_generations)
    adv = centered_fn(grouped)
    if scale_rewards == "group":
        adv = adv / (jnp.std(grouped, axis=1, ddof=1, keepdims=True) + eps)
    elif scale_rewards == "batch":
        adv = adv / (jnp.std(rewards, ddof=1) + eps)
    # Exact zero for constant groups: (R - mean) / (0 + eps) would blow up any rounding error
    # in the mean by 1e6.
    constant = jnp.max(grouped, axis=1, keepdims=True) == jnp.min(grouped, axis=1, keepdims=True)
    adv = jnp.where(constant, jnp.zeros_like(adv), adv)
    return adv.reshape(-1)


def token_advantages(advantages: jax.Array, mask: jax.Array) -> jax.Array:
    """Broadcast sequence advantages to response tokens.

    Args:
      advantages: [B] one advantage per response.
      mask: [B, T] 1 on response tokens that are trained on, 0 on padding / prompt.

    Returns:
      [B, T] the row's advantage on masked-in tokens, 0 elsewhere.
    """
    return advantages[:, None] * mask.astype(advantages.dtype)
