"""GRPO policy loss: PPO clip with DAPO clip-higher and verl dual-clip, exact loss aggregation
under micro-batching and sharding, KL-to-reference estimators, and an entropy metric.

Per token (recipe section 5.3), with r = exp(clip(logp - old_logp, -20, 20)):

    A >= 0:  max(-A r, -A clip(r, 1 - epsilon, 1 + epsilon_high))
    A <  0:  min(max(-A r, -A clip(r, 1 - epsilon, 1 + epsilon_high)), -dual_clip A)

plus ``beta * KL`` per token when ``beta > 0``.

Exactness. Every aggregation mode is a ratio numerator / denominator where the numerator is a
sum over rows and the denominator depends only on the whole mini-batch's mask (a token count or
a sequence count). A micro-batch (or a shard) computes its own numerator and divides by the
*global* denominator (``loss_denominator`` of the full mini-batch mask), so summing micro-batch
losses and gradients gives exactly the full mini-batch loss and gradient. Dividing each
micro-batch by its own token count and rescaling by micro-batch size (verl's dynamic-batch
behaviour, recipe 5.3) is only approximately the same when token counts differ. Metrics are
returned as ``WeightedMean`` (total, weight) pairs, which also add exactly across micro-batches.

Names follow verl/TRL: ``epsilon``/``epsilon_high`` (verl ``clip_ratio_low``/``clip_ratio_high``),
``dual_clip`` (verl ``clip_ratio_c``), ``loss_agg_mode``, ``beta``, ``kl_estimator`` (k1, k2 =
verl ``mse``, k3 = verl ``low_var_kl``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from codescaler_jax.registry import KL_ESTIMATORS, LOSS_AGGREGATIONS
from codescaler_jax.rl.config import PolicyLossConfig  # noqa: F401  (re-exported)

# verl clamps the log-ratio inside the k3 estimator to this before exponentiating.
_K3_LOG_RATIO_CLAMP = 20.0

Aggregation = Callable[[jax.Array, jax.Array, float], tuple[jax.Array, jax.Array]]
KLEstimator = Callable[[jax.Array, jax.Array], jax.Array]



def _float(x: jax.Array) -> jax.Array:
    """Upcast to float32 (keep float64): losses on bf16 log-probs lose too much."""
    return x.astype(jnp.float64 if x.dtype == jnp.float64 else jnp.float32)


# The loss knobs, ``PolicyLossConfig``, live in ``rl.config`` (validated without jax).


# --------------------------------------------------------------------------------------------
# Metrics that add exactly across micro-batches and shards


class WeightedMean(NamedTuple):
    """A mean kept as (total, weight): add two with ``jax.tree.map(jnp.add, a, b)``."""

    total: jax.Array
    weight: jax.Array

    @property
    def value(self) -> jax.Array:
        """total / weight, 0 when the weight is 0."""
        nonzero = self.weight > 0
        return jnp.where(nonzero, self.total / jnp.where(nonzero, self.weight, 1), 0)


def finalize_metrics(metrics: dict[str, WeightedMean]) -> dict[str, jax.Array]:
    """{name: WeightedMean} (summed over micro-batches) -> {name: scalar mean}."""
    return {name: m.value for name, m in metrics.items()}


# --------------------------------------------------------------------------------------------
# Aggregation: (numerator, denominator) per mode


def _masked(values: jax.Array, mask: jax.Array) -> jax.Array:
    # where, not multiply: a non-finite value at a padded position must not leak into the sum.
    return jnp.where(mask > 0, values, jnp.zeros_like(values))


def _num_seqs(mask: jax.Array, dtype) -> jax.Array:
    # Rows with no valid token (padding rows that fill a static batch) do not count.
    return jnp.sum(jnp.any(mask > 0, axis=-1)).astype(dtype)


@LOSS_AGGREGATIONS.register("token-mean")
def _token_mean(values: jax.Array, mask: jax.Array, norm_constant: float):
    """Sum over all valid tokens / number of valid tokens."""
    return jnp.sum(_masked(values, mask)), jnp.sum(mask > 0).astype(values.dtype)


@LOSS_AGGREGATIONS.register("seq-mean-token-sum")
def _seq_mean_token_sum(values: jax.Array, mask: jax.Array, norm_constant: float):
    """Mean over sequences of the per-sequence token sum."""
    return jnp.sum(_masked(values, mask)), _num_seqs(mask, values.dtype)


@LOSS_AGGREGATIONS.register("seq-mean-token-mean")
def _seq_mean_token_mean(values: jax.Array, mask: jax.Array, norm_constant: float):
    """Mean over sequences of the per-sequence token mean."""
    seq_sum = jnp.sum(_masked(values, mask), axis=-1)
    seq_len = jnp.sum(mask > 0, axis=-1).astype(values.dtype)
    seq_mean = seq_sum / jnp.maximum(seq_len, 1)
    return jnp.sum(seq_mean), _num_seqs(mask, values.dtype)


@LOSS_AGGREGATIONS.register("seq-mean-token-sum-norm")
def _seq_mean_token_sum_norm(values: jax.Array, mask: jax.Array, norm_constant: float):
    """Dr.GRPO: mean over sequences of the per-sequence token sum / C."""
    return jnp.sum(_masked(values, mask)) / norm_constant, _num_seqs(mask, values.dtype)


def _norm_constant(mask: jax.Array, constant: float | None) -> float:
    return float(mask.shape[-1]) if constant is None else float(constant)


def aggregate(
    values: jax.Array,
    mask: jax.Array,
    loss_agg_mode: str = "token-mean",
    *,
    norm_constant: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(numerator, denominator) of ``loss_agg_mode`` over ``values``.

    Args:
      values: [b, T] per-token values.
      mask: [b, T] 1 (or True) on valid tokens.
      loss_agg_mode: a name in ``LOSS_AGGREGATIONS``.
      norm_constant: C for "seq-mean-token-sum-norm"; None = T.

    Returns:
      Two scalars; numerators add across micro-batches, and so do denominators.
    """
    fn = LOSS_AGGREGATIONS.get(loss_agg_mode)
    return fn(_float(values), mask, _norm_constant(mask, norm_constant))


def loss_denominator(
    mask: jax.Array, loss_agg_mode: str = "token-mean", *, norm_constant: float | None = None
) -> jax.Array:
    """The denominator of ``loss_agg_mode`` for a whole mini-batch.

    Args:
      mask: [B, T] mask of the full mini-batch (all micro-batches, all shards).

    Returns:
      A float32 scalar: the valid-token count for "token-mean", the number of sequences with
      at least one valid token for the seq-mean modes. Pass it as ``global_denominator`` to
      every micro-batch's ``policy_loss``.
    """
    return aggregate(jnp.zeros(mask.shape, jnp.float32), mask, loss_agg_mode,
                     norm_constant=norm_constant)[1]


def aggregation_weights(
    mask: jax.Array, loss_agg_mode: str = "token-mean", *, norm_constant: float | None = None
) -> tuple[jax.Array, jax.Array]:
    """Per-token weights that reproduce ``aggregate`` in any layout (packed rows).

    Every mode's numerator is linear in the values and its denominator adds over rows, so
    ``aggregate(values, mask, mode) == (sum(values * w), sum(dw))`` with ``w`` the numerator's
    gradient (1, or 1 / row length, or 1 / C) and ``dw`` each row's own denominator spread
    over its valid tokens. Both depend only on ``mask [B, T]`` and are counted here, before
    the rows are moved anywhere.

    Returns:
        ``(w [B, T], dw [B, T])`` float32, 0 on invalid tokens.
    """
    zeros = jnp.zeros(mask.shape, jnp.float32)
    w = jax.grad(lambda v: aggregate(v, mask, loss_agg_mode, norm_constant=norm_constant)[0])(
        zeros)
    c = _norm_constant(mask, norm_constant)
    fn = LOSS_AGGREGATIONS.get(loss_agg_mode)
    row_den = jax.vmap(lambda m: fn(jnp.zeros((1, m.shape[0]), jnp.float32), m[None], c)[1])(mask)
    valid = mask > 0
    n_valid = jnp.maximum(jnp.sum(valid, axis=-1, keepdims=True), 1).astype(jnp.float32)
    dw = jnp.where(valid, row_den[:, None] / n_valid, 0.0)
    return jnp.where(valid, w, 0.0), dw


def aggregate_loss(
    values: jax.Array,
    mask: jax.Array,
    loss_agg_mode: str = "token-mean",
    *,
    global_denominator: jax.Array | float | None = None,
    norm_constant: float | None = None,
) -> jax.Array:
    """Scalar aggregate of ``values`` [b, T] over ``mask`` [b, T].

    With ``global_denominator`` (from ``loss_denominator`` of the full mini-batch), the result
    is this micro-batch's exact share: shares sum to the full mini-batch aggregate. Without it,
    the local denominator is used (the full-batch case). An empty denominator gives 0.
    """
    num, den = aggregate(values, mask, loss_agg_mode, norm_constant=norm_constant)
    if global_denominator is not None:
        den = jnp.asarray(global_denominator, num.dtype)
    return num / jnp.maximum(den, 1)


# --------------------------------------------------------------------------------------------
# Per-token pieces


def ppo_clip_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    *,
    epsilon: float = 0.2,
    epsilon_high: float = 0.28,
    dual_clip: float | None = 3.0,
    log_ratio_clamp: float = 20.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-token PPO clip loss with clip-higher and dual-clip (module docstring formula).

    Args:
      logp: [b, T] log-probs of the sampled tokens under the current policy.
      old_logp: [b, T] the same under the policy that sampled them.
      advantages: [b] per-sequence or [b, T] per-token advantages.

    Returns:
      loss: [b, T] per-token loss (unmasked).
      metrics: [b, T] float indicators ``clipped_high`` (A > 0 and the upper clip is active,
        i.e. the token gets no gradient), ``clipped_low`` (A < 0 and the lower clip is active),
        ``dual_clipped`` (A < 0 and the ``-dual_clip * A`` cap is active), and ``approx_kl``,
        the k3 form (r - 1) - log r of KL(pi_old || pi_theta), and ``ratio`` r.
    """
    logp, old_logp, advantages = _float(logp), _float(old_logp), _float(advantages)
    if advantages.ndim == logp.ndim - 1:
        advantages = advantages[..., None]
    log_ratio = jnp.clip(logp - old_logp, -log_ratio_clamp, log_ratio_clamp)
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - epsilon, 1.0 + epsilon_high)
    clip_loss = jnp.maximum(unclipped, clipped)
    clip_active = clipped > unclipped
    if dual_clip is None:
        loss = clip_loss
        dual_active = jnp.zeros_like(clip_active)
    else:
        cap = -dual_clip * advantages
        loss = jnp.where(advantages < 0, jnp.minimum(clip_loss, cap), clip_loss)
        dual_active = (advantages < 0) & (cap < clip_loss)
    sg_ratio = jax.lax.stop_gradient(ratio)
    sg_log_ratio = jax.lax.stop_gradient(log_ratio)
    f = loss.dtype
    metrics = {
        "clipped_high": (clip_active & (advantages > 0)).astype(f),
        "clipped_low": (clip_active & (advantages < 0)).astype(f),
        "dual_clipped": jnp.broadcast_to(dual_active, loss.shape).astype(f),
        "approx_kl": (sg_ratio - 1.0) - sg_log_ratio,
        "ratio": sg_ratio,
    }
    return loss, metrics


@KL_ESTIMATORS.register("k1")
def _kl_k1(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """log pi - log pi_ref."""
    return logp - ref_logp


@KL_ESTIMATORS.register("k2")
def _kl_k2(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """0.5 (log pi - log pi_ref)^2 (verl "mse")."""
    return 0.5 * jnp.square(logp - ref_logp)


@KL_ESTIMATORS.register("k3")
def _kl_k3(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """exp(d) - d - 1 with d = log pi_ref - log pi clamped to +-20 (verl "low_var_kl")."""
    d = jnp.clip(ref_logp - logp, -_K3_LOG_RATIO_CLAMP, _K3_LOG_RATIO_CLAMP)
    return jnp.exp(d) - d - 1.0


def kl_penalty(
    logp: jax.Array,
    ref_logp: jax.Array,
    *,
    estimator: str = "k3",
    clamp: float | None = 10.0,
) -> jax.Array:
    """Per-token estimate of KL(pi_theta || pi_ref) from sampled-token log-probs.

    Args:
      logp: [b, T] current policy log-probs; ref_logp: [b, T] reference policy log-probs.
      estimator: a name in ``KL_ESTIMATORS``.
      clamp: the estimate is clipped to [-clamp, clamp]; None disables.

    Returns:
      [b, T] per-token KL estimate (unmasked).
    """
    kl = KL_ESTIMATORS.get(estimator)(_float(logp), _float(ref_logp))
    if clamp is not None:
        kl = jnp.clip(kl, -clamp, clamp)
    return kl


def entropy_from_logits(logits: jax.Array) -> jax.Array:
    """Entropy of softmax(logits) per position, stable for large and -inf logits.

    Args:
      logits: [b, T, V].

    Returns:
      [b, T] entropy in nats, float32 (float64 for float64 logits).
    """
    logp = jax.nn.log_softmax(_float(logits), axis=-1)
    p = jnp.exp(logp)
    # p = 0 where a logit is -inf; 0 * -inf would be nan, the entropy term is 0.
    return -jnp.sum(jnp.where(p > 0, p * jnp.where(p > 0, logp, 0), 0), axis=-1)


# --------------------------------------------------------------------------------------------
# The function the trainer calls per micro-batch


def policy_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    cfg: PolicyLossConfig,
    ref_logp: jax.Array | None = None,
    global_denominator: jax.Array | float | None = None,
    token_weights: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, dict[str, WeightedMean]]:
    """GRPO loss of one micro-batch (or shard): PPO clip loss + ``beta`` * KL, aggregated.

    Args:
      logp: [b, T] current log-probs of the sampled tokens (differentiated).
      old_logp: [b, T] log-probs under the sampling policy (constant).
      advantages: [b] per-sequence advantages (or [b, T] per-token).
      mask: [b, T] 1 on response tokens trained on.
      cfg: loss knobs.
      ref_logp: [b, T] reference-policy log-probs; required iff ``cfg.beta > 0``.
      global_denominator: ``loss_denominator(full_minibatch_mask, cfg.loss_agg_mode)``; with it
        the micro-batch losses (and gradients) sum exactly to the full mini-batch's. None uses
        this batch's own denominator.
      token_weights: ``aggregation_weights`` of the rows' original (unpacked) mask, laid out
        like ``mask``: the aggregation is then ``sum(w * values)`` over ``sum(dw)`` (or over
        ``global_denominator``), exact whatever layout the tokens are in (packed updates).

    Returns:
      loss: scalar to differentiate.
      metrics: {name: WeightedMean}; add them over micro-batches, then ``finalize_metrics``.
        ``pg_loss`` (and ``kl_loss`` when beta > 0) follow ``loss_agg_mode``; the rest are
        means over valid tokens: ``clipfrac_high``, ``clipfrac_low``, ``dual_clipfrac``,
        ``approx_kl`` (k3 form of KL(pi_old || pi_theta)), ``ratio``, ``kl`` (when beta > 0).
    """
    pg, tok = ppo_clip_loss(
        logp,
        old_logp,
        advantages,
        epsilon=cfg.epsilon,
        epsilon_high=cfg.clip_high,
        dual_clip=cfg.dual_clip,
        log_ratio_clamp=cfg.log_ratio_clamp,
    )
    mode, const = cfg.loss_agg_mode, cfg.loss_agg_constant

    def agg(values: jax.Array) -> tuple[jax.Array, jax.Array]:
        if token_weights is None:
            return aggregate(values, mask, mode, norm_constant=const)
        w, dw = token_weights
        return (jnp.sum(_masked(_float(values) * w, mask)),
                jnp.sum(_masked(dw, mask)).astype(_float(values).dtype))

    per_token = pg
    if cfg.beta > 0:
        if ref_logp is None:
            raise ValueError("ref_logp is required when beta > 0")
        kl = kl_penalty(logp, ref_logp, estimator=cfg.kl_estimator, clamp=cfg.kl_clamp)
        per_token = pg + cfg.beta * kl
    if token_weights is None:
        loss = aggregate_loss(
            per_token, mask, mode, global_denominator=global_denominator, norm_constant=const
        )
    else:
        num, den = agg(per_token)
        if global_denominator is not None:
            den = jnp.asarray(global_denominator, num.dtype)
        loss = num / jnp.maximum(den, 1)

    sg = jax.lax.stop_gradient
    n_tok = jnp.sum(mask > 0).astype(pg.dtype)

    def token_mean(x: jax.Array) -> WeightedMean:
        return WeightedMean(jnp.sum(_masked(sg(x), mask)), n_tok)

    metrics = {
        "pg_loss": WeightedMean(*agg(sg(pg))),
        "clipfrac_high": token_mean(tok["clipped_high"]),
        "clipfrac_low": token_mean(tok["clipped_low"]),
        "dual_clipfrac": token_mean(tok["dual_clipped"]),
        "approx_kl": token_mean(tok["approx_kl"]),
        "ratio": token_mean(tok["ratio"]),
    }
    if cfg.beta > 0:
        metrics["kl_loss"] = WeightedMean(*agg(sg(kl)))
        metrics["kl"] = token_mean(kl)
    return loss, metrics
