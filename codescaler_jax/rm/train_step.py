"""The jit-compiled RM train and eval steps.

The optimizer and schedule (``training.optim``), the train state and its shardings
(``training.state``) are shared with the GRPO trainer; their names are re-exported here.

Chosen and rejected sequences go through the model in one forward pass (``[2b, L]``). Gradient
accumulation scans over micro-batches and divides every micro-batch loss by the *global*
number of pairs, so the accumulated gradient equals the one-big-batch gradient exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from codescaler_jax.rm.loss import bt_metrics, bt_pair_losses

# Re-exported: these lived here before the GRPO trainer shared them (training/).
from codescaler_jax.training.checkpoint import (  # noqa: F401, E402
    check_resume_layout,
    checkpoint_scan_layers,
)
from codescaler_jax.training.optim import make_optimizer, make_schedule  # noqa: F401, E402
from codescaler_jax.training.state import init_state, split_model, state_shardings  # noqa: F401

BATCH_KEYS = ("chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask")


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """Static options of the train step."""

    grad_accum_steps: int = 1
    margin: float = 0.0
    center_coef: float | None = None


def _scores_fn(graphdef: nnx.GraphDef, rest: nnx.State) -> Callable:
    def scores(params: dict, ids: jax.Array, mask: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, params, rest)(ids, mask)

    return scores


def _micro_batches(batch: dict[str, jax.Array], n: int) -> dict[str, jax.Array]:
    """``[B, ...]`` -> ``[n, B/n, ...]`` taking rows ``k, k+n, ...`` for micro-batch k, which keeps
    each device's rows on that device when the batch dimension is sharded."""

    def split(x: jax.Array) -> jax.Array:
        b = x.shape[0]
        return jnp.swapaxes(x.reshape(b // n, n, *x.shape[1:]), 0, 1)

    return {k: split(batch[k]) for k in BATCH_KEYS}


def make_train_step(
    graphdef: nnx.GraphDef,
    rest: nnx.State,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    opts: StepOptions,
) -> Callable[[dict, dict], tuple[dict, dict]]:
    """``step(state, batch) -> (state, metrics)``; batch arrays ``[B, L]`` (chosen / rejected)."""
    scores_fn = _scores_fn(graphdef, rest)

    def micro_loss(params, mb, n_global):
        ids = jnp.concatenate([mb["chosen_ids"], mb["rejected_ids"]], axis=0)
        mask = jnp.concatenate([mb["chosen_mask"], mb["rejected_mask"]], axis=0)
        s = scores_fn(params, ids, mask)
        b = mb["chosen_ids"].shape[0]
        chosen, rejected = s[:b], s[b:]
        per = bt_pair_losses(
            chosen, rejected, margin=opts.margin or None, center_coef=opts.center_coef
        )
        return per.sum() / n_global, (chosen, rejected, per)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def step(state: dict, batch: dict) -> tuple[dict, dict]:
        params = state["params"]
        n_global = batch["chosen_ids"].shape[0]
        a = opts.grad_accum_steps
        if a == 1:
            (_, (c, r, per)), grads = grad_fn(params, batch, n_global)
        else:
            mbs = _micro_batches(batch, a)

            def body(acc, mb):
                (_, aux), g = grad_fn(params, mb, n_global)
                return jax.tree.map(jnp.add, acc, g), aux

            zeros = jax.tree.map(jnp.zeros_like, params)
            grads, (c, r, per) = jax.lax.scan(body, zeros, mbs)
            c, r, per = c.reshape(-1), r.reshape(-1), per.reshape(-1)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        sums = bt_metrics(c, r, jnp.ones_like(c))
        sums["loss_sum"] = per.sum()
        metrics = {
            **sums,
            "grad_norm": grad_norm,
            "learning_rate": schedule(state["step"]),
        }
        new_state = {"params": new_params, "opt_state": opt_state, "step": state["step"] + 1}
        return new_state, metrics

    return step


def make_eval_step(
    graphdef: nnx.GraphDef, rest: nnx.State, opts: StepOptions
) -> Callable[[dict, dict], dict]:
    """``eval_step(params, batch) -> summed metrics`` plus ``pair_correct [b]``;
    ``batch["weight"]`` masks padding pairs."""
    scores_fn = _scores_fn(graphdef, rest)

    def eval_step(params: dict, batch: dict) -> dict:
        ids = jnp.concatenate([batch["chosen_ids"], batch["rejected_ids"]], axis=0)
        mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]], axis=0)
        s = scores_fn(params, ids, mask)
        b = batch["chosen_ids"].shape[0]
        c, r = s[:b], s[b:]
        w = batch["weight"]
        per = bt_pair_losses(c, r, margin=opts.margin or None, center_coef=opts.center_coef)
        sums = bt_metrics(c, r, w)
        sums["loss_sum"] = (per * w).sum()
        sums["pair_correct"] = (c > r).astype(jnp.float32)  # [b], for breakdowns by pair kind
        return sums

    return eval_step
