"""The GRPO update: actor log-probs and the jit-compiled train step over mini- and micro-batches.

A training batch is one rollout step: ``B = num_prompts x num_generations`` rows, each the
left-padded prompt followed by the right-padded response (``[B, P + N]``), with the response
mask ``[B, N]``, per-row advantages ``[B]``, and the actor's log-probs of the sampled tokens
before the update (``old_logp [B, N]``, recomputed by ``make_logprob_fn``, as the reference
does instead of trusting the sampler's; ``algorithm.old_logprobs: sampler`` takes the
sampler's with one mini-batch, and ``sampler_learner_drift`` measures how far the two are).

``make_train_step`` builds ``step(state, batch) -> (state, metrics)``: the rows are split into
``num_minibatches`` mini-batches, one optimizer update each (the reference: 2 per step), and
every mini-batch's gradient is accumulated over ``micro_batches`` micro-batches. Each micro-batch
divides its loss by the *mini-batch's* denominator (``losses.loss_denominator``), so the
accumulated gradient is exactly the whole mini-batch's, and under sharding every device's
partial sums add up to the same (tested: 1 vs 4 micro-batches, 1 vs 8 devices).

Row ``r`` goes to mini-batch (micro-batch) ``r mod n``: with the batch dimension sharded over
devices, every device keeps its own rows in every split (no data moves).

Log-probs use ``logits / temperature`` (verl's actor divides by the rollout temperature), so
the trained distribution is the one the sampler drew from before top-k/top-p truncation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from codescaler_jax.models.logprobs import token_stats
from codescaler_jax.models.qwen3 import Qwen3ForCausalLM
from codescaler_jax.rl.losses import (
    PolicyLossConfig,
    WeightedMean,
    finalize_metrics,
    loss_denominator,
    policy_loss,
)

BATCH_KEYS = ("input_ids", "attention_mask", "response_mask", "advantages", "old_logp")


@dataclasses.dataclass(frozen=True)
class UpdateOptions:
    """Static options of the GRPO update.

    Attributes:
        loss: the policy-loss knobs (clip ranges, aggregation, KL).
        num_minibatches: optimizer updates per train step (rows split into this many).
        micro_batches: gradient-accumulation micro-batches per mini-batch (memory only: the
            gradient is the same for any value).
        temperature: log-probs are taken from ``logits / temperature``.
        logprob_chunk: response positions per chunk when computing log-probs, so at most
            ``[rows, chunk, vocab]`` logits exist at once (None: all at once).
    """

    loss: PolicyLossConfig = dataclasses.field(default_factory=PolicyLossConfig)
    num_minibatches: int = 2
    micro_batches: int = 1
    temperature: float = 1.0
    logprob_chunk: int | None = None

    def __post_init__(self) -> None:
        if self.num_minibatches < 1 or self.micro_batches < 1:
            raise ValueError(
                f"num_minibatches={self.num_minibatches} and micro_batches={self.micro_batches} "
                "must be >= 1"
            )
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


def split_rows(x: jax.Array, n: int) -> jax.Array:
    """``[B, ...] -> [n, B/n, ...]``; split ``k`` holds rows ``k, k+n, k+2n, ...``."""
    b = x.shape[0]
    if b % n:
        raise ValueError(f"{b} rows cannot be split into {n} equal parts")
    return jnp.swapaxes(x.reshape(b // n, n, *x.shape[1:]), 0, 1)


def merge_rows(x: jax.Array) -> jax.Array:
    """Inverse of ``split_rows``: ``[n, B/n, ...] -> [B, ...]``."""
    n, m = x.shape[:2]
    return jnp.swapaxes(x, 0, 1).reshape(n * m, *x.shape[2:])


def response_token_stats(
    model: Qwen3ForCausalLM,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    response_len: int,
    *,
    temperature: float = 1.0,
    chunk: int | None = None,
    with_entropy: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """Log-probs (and entropies) of the response tokens under ``logits / temperature``.

    Args:
        model: the policy.
        input_ids: ``[B, P + N]`` prompt (left-padded) then response (right-padded).
        attention_mask: ``[B, P + N]`` 1 on real tokens.
        response_len: N (static).
        temperature: divides the logits.
        chunk: positions per chunk; each chunk's logits are recomputed in the backward pass.
        with_entropy: also return the entropy of each position's distribution.

    Returns:
        ``(logp [B, N] float32, entropy [B, N] float32 or None)``; position ``j`` is the
        distribution that predicts response token ``j``.
    """
    t = input_ids.shape[1]
    p = t - response_len
    if p < 1:
        raise ValueError(f"need at least one prompt position before the {response_len} responses")
    hidden = model.hidden_states(input_ids, attention_mask)[:, p - 1 : t - 1]
    targets = input_ids[:, p:]
    return token_stats(model.logits, hidden, targets, temperature=temperature,
                       chunk_size=chunk, with_entropy=with_entropy)


def make_logprob_fn(
    graphdef: nnx.GraphDef, rest: nnx.State, opts: UpdateOptions, *, with_entropy: bool = True
) -> Callable[[Any, jax.Array, jax.Array, int], tuple[jax.Array, jax.Array | None]]:
    """``fn(params, input_ids, attention_mask, response_len) -> (logp [B, N], entropy [B, N])``.

    No gradient; the rows run ``opts.micro_batches`` at a time (memory). Used for the old
    log-probs (policy params) and the reference log-probs (frozen params, ``beta > 0``).
    ``response_len`` must be static under ``jax.jit``.
    """

    def fn(params, input_ids, attention_mask, response_len):
        def one(xs):
            ids, mask = xs
            model = nnx.merge(graphdef, params, rest)
            return response_token_stats(
                model, ids, mask, response_len, temperature=opts.temperature,
                chunk=opts.logprob_chunk, with_entropy=with_entropy,
            )

        n = opts.micro_batches
        out = jax.lax.map(one, (split_rows(input_ids, n), split_rows(attention_mask, n)))
        return jax.tree.map(merge_rows, out)

    return fn


def sampler_learner_drift(
    sampler_logp: jax.Array, learner_logp: jax.Array, response_mask: jax.Array,
    *, log_ratio_clamp: float = 20.0,
) -> dict[str, jax.Array]:
    """How far the sampler's log-probs of the sampled tokens are from the learner's.

    Both are ``[B, N]`` log-probs of the same response tokens under ``logits / temperature``
    (the sampler's from its decode steps, the learner's from ``make_logprob_fn`` with the same
    parameters); only positions where ``response_mask`` is 1 count. With ``d = learner -
    sampler`` (``log r``, ``r = pi_learner / pi_sampler`` on tokens the sampler drew):

    - ``rollout/sampler_learner_kl``: the token mean of the k3 estimator ``(r - 1) - log r`` of
      KL(pi_sampler || pi_learner) (unbiased, never negative; verl's ``low_var_kl``), with
      ``d`` clamped to ``+-log_ratio_clamp`` before ``exp`` as in the policy loss;
    - ``rollout/sampler_learner_kl_k1``: the token mean of ``-d`` (the k1 form, unbiased but
      of either sign);
    - ``rollout/sampler_learner_logp_abs_diff_max``: the largest ``|d|``.

    Zero up to float rounding when both sides compute the same distribution; drift from a
    different engine, precision or stale weights shows here before it biases the ratio.
    """
    m = response_mask.astype(jnp.float32)
    d = learner_logp.astype(jnp.float32) - sampler_logp.astype(jnp.float32)
    dc = jnp.clip(d, -log_ratio_clamp, log_ratio_clamp)
    count = jnp.maximum(jnp.sum(m), 1.0)
    return {
        "rollout/sampler_learner_kl": jnp.sum(m * (jnp.expm1(dc) - dc)) / count,
        "rollout/sampler_learner_kl_k1": jnp.sum(m * -d) / count,
        "rollout/sampler_learner_logp_abs_diff_max": jnp.max(jnp.where(m > 0, jnp.abs(d), 0.0)),
    }


def _metric_zeros(metrics: Any) -> Any:
    return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), metrics)


def make_minibatch_grads(
    graphdef: nnx.GraphDef, rest: nnx.State, opts: UpdateOptions
) -> Callable[[Any, dict[str, jax.Array]], tuple[Any, dict[str, WeightedMean]]]:
    """``grads(params, minibatch) -> (gradient, summed metrics)`` of one mini-batch.

    ``minibatch``: the ``BATCH_KEYS`` arrays (+ ``ref_logp`` when ``beta > 0``) of its rows.
    The gradient is of the mini-batch loss, accumulated exactly over ``opts.micro_batches``.
    """
    cfg = opts.loss

    def loss_fn(params, mb, denominator):
        model = nnx.merge(graphdef, params, rest)
        n = mb["response_mask"].shape[1]
        logp, _ = response_token_stats(
            model, mb["input_ids"], mb["attention_mask"], n,
            temperature=opts.temperature, chunk=opts.logprob_chunk,
        )
        return policy_loss(
            logp, mb["old_logp"], mb["advantages"], mb["response_mask"], cfg=cfg,
            ref_logp=mb.get("ref_logp"), global_denominator=denominator,
        )

    grad_fn = jax.grad(loss_fn, has_aux=True)

    def grads(params, minibatch):
        denominator = loss_denominator(
            minibatch["response_mask"], cfg.loss_agg_mode, norm_constant=cfg.loss_agg_constant
        )
        if opts.micro_batches == 1:
            return grad_fn(params, minibatch, denominator)
        micro = {k: split_rows(v, opts.micro_batches) for k, v in minibatch.items()}
        first = jax.tree.map(lambda x: x[0], micro)
        shapes = jax.eval_shape(grad_fn, params, first, denominator)

        def body(acc, mb):
            out = grad_fn(params, mb, denominator)
            return jax.tree.map(jnp.add, acc, out), None

        total, _ = jax.lax.scan(body, _metric_zeros(shapes), micro)
        return total

    return grads


def make_train_step(
    graphdef: nnx.GraphDef,
    rest: nnx.State,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    opts: UpdateOptions,
    *,
    minibatch_grads: Callable[[Any, dict], tuple[Any, dict[str, WeightedMean]]] | None = None,
) -> Callable[[dict, dict], tuple[dict, dict]]:
    """``step(state, batch) -> (state, metrics)``: ``opts.num_minibatches`` optimizer updates.

    ``state``: ``{"params", "opt_state", "step"}`` (``step`` counts train steps, not updates).
    ``batch``: the ``BATCH_KEYS`` arrays of all ``B`` rows (+ ``ref_logp`` when ``beta > 0``).
    ``metrics``: the policy-loss metrics over all rows (``pg_loss``, ``clipfrac_high``,
    ``clipfrac_low``, ``dual_clipfrac``, ``approx_kl``, ``ratio``, ``kl`` ...), ``grad_norm``
    (mean over the updates, before clipping) and ``learning_rate``.

    ``minibatch_grads``: another layout's gradient (``rl.packing``); its ``batch`` arrays come
    already split, ``[num_minibatches, ...]``.
    """
    presplit = minibatch_grads is not None
    minibatch_grads = minibatch_grads or make_minibatch_grads(graphdef, rest, opts)

    def step(state: dict, batch: dict) -> tuple[dict, dict]:
        minis = batch if presplit else {
            k: split_rows(v, opts.num_minibatches) for k, v in batch.items()}

        def update(carry, mb):
            params, opt_state = carry
            grads, metrics = minibatch_grads(params, mb)
            grad_norm = optax.tree.norm(grads)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), (metrics, grad_norm)

        (params, opt_state), (metrics, grad_norms) = jax.lax.scan(
            update, (state["params"], state["opt_state"]), minis
        )
        summed = jax.tree.map(lambda x: jnp.sum(x, axis=0), metrics)
        out = dict(finalize_metrics(summed))
        out["grad_norm"] = jnp.mean(grad_norms)
        out["learning_rate"] = schedule(state["step"])
        new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
        return new_state, out

    return step


def per_update_schedule(schedule: optax.Schedule, num_minibatches: int) -> optax.Schedule:
    """The optimizer sees one count per mini-batch update; the learning rate follows train
    steps (verl steps its LR scheduler once per training step), so all updates of one step
    share ``schedule(step)``."""
    return lambda count: schedule(count // num_minibatches)
