"""The Bradley-Terry preference loss for reward-model training.

Per pair: ``-log sigmoid(r_chosen - r_rejected - margin)``, plus optional reward centering
``coef * (r_chosen + r_rejected)^2`` (as TRL's ``center_rewards_coefficient``; off by default).
Losses are returned as per-pair terms so that a caller can divide by the *global* number of
pairs of a step: summing micro-batch gradients then equals the full-batch gradient exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def bt_pair_losses(
    chosen: jax.Array,
    rejected: jax.Array,
    *,
    margin: jax.Array | float | None = None,
    center_coef: float | None = None,
) -> jax.Array:
    """Per-pair loss ``[B]`` from chosen / rejected scores ``[B]`` (float32)."""
    chosen = chosen.astype(jnp.float32)
    rejected = rejected.astype(jnp.float32)
    diff = chosen - rejected
    if margin is not None:
        diff = diff - jnp.asarray(margin, jnp.float32)
    loss = -jax.nn.log_sigmoid(diff)
    if center_coef:
        loss = loss + center_coef * jnp.square(chosen + rejected)
    return loss


def bt_metrics(chosen: jax.Array, rejected: jax.Array, weight: jax.Array) -> dict[str, jax.Array]:
    """Weighted sums (not means) of pair statistics; divide by ``count`` after summing over shards.

    ``weight [B]`` is 1 for real pairs and 0 for padding pairs.
    """
    chosen = chosen.astype(jnp.float32)
    rejected = rejected.astype(jnp.float32)
    w = weight.astype(jnp.float32)
    return {
        "count": w.sum(),
        "correct": (w * (chosen > rejected)).sum(),
        "ties": (w * (chosen == rejected)).sum(),
        "margin_sum": (w * (chosen - rejected)).sum(),
        "chosen_sum": (w * chosen).sum(),
        "chosen_sq_sum": (w * chosen**2).sum(),
        "rejected_sum": (w * rejected).sum(),
        "rejected_sq_sum": (w * rejected**2).sum(),
    }


def finalize_metrics(sums: dict[str, jax.Array | float]) -> dict[str, float]:
    """Turn summed statistics from ``bt_metrics`` into accuracy, mean margin, mean and std.

    ``accuracy`` counts pairs with ``chosen > rejected``; ``tie_fraction`` the pairs scored
    exactly equal, which are neither right nor wrong and reported apart."""
    n = max(float(sums["count"]), 1.0)

    def std(s: str, sq: str) -> float:
        mean = float(sums[s]) / n
        return max(float(sums[sq]) / n - mean * mean, 0.0) ** 0.5

    out = {
        "accuracy": float(sums["correct"]) / n,
        "tie_fraction": float(sums.get("ties", 0.0)) / n,
        "margin": float(sums["margin_sum"]) / n,
        "chosen_mean": float(sums["chosen_sum"]) / n,
        "chosen_std": std("chosen_sum", "chosen_sq_sum"),
        "rejected_mean": float(sums["rejected_sum"]) / n,
        "rejected_std": std("rejected_sum", "rejected_sq_sum"),
    }
    if "loss_sum" in sums:
        out["loss"] = float(sums["loss_sum"]) / n
    return out
