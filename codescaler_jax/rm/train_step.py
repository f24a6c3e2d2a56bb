"""The jit-compiled RM train and eval steps, the optimizer, and the train-state shardings.

The train state is a plain pytree ``{"params": <pure dict>, "opt_state": <optax state>,
"step": int32}``: easy to checkpoint with Orbax and to give explicit shardings. Chosen and
rejected sequences go through the model in one forward pass (``[2b, L]``). Gradient
accumulation scans over micro-batches and divides every micro-batch loss by the *global*
number of pairs, so the accumulated gradient equals the one-big-batch gradient exactly.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from codescaler_jax.models.qwen3 import layer_path, stacked_layer_path, tree_scan_layers
from codescaler_jax.models.sharding import param_shardings
from codescaler_jax.rm.config import OptimSection
from codescaler_jax.rm.loss import bt_metrics, bt_pair_losses

BATCH_KEYS = ("chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask")


def make_schedule(cfg: OptimSection, total_steps: int) -> optax.Schedule:
    """Linear warmup to ``learning_rate``, then constant / cosine / linear decay to min ratio."""
    warm = max(cfg.warmup_steps, 0)
    decay = max(total_steps - warm, 1)
    end = cfg.learning_rate * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.learning_rate)
    elif cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(cfg.learning_rate, decay, alpha=cfg.min_lr_ratio)
    else:
        after = optax.linear_schedule(cfg.learning_rate, end, decay)
    if warm == 0:
        return after
    return optax.join_schedules(
        [optax.linear_schedule(cfg.learning_rate / warm, cfg.learning_rate, warm - 1), after],
        [warm],
    )


def _path_name(path: tuple[Any, ...]) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _matches(name: str, prefixes: tuple[str, ...]) -> bool:
    """``name`` is one of ``prefixes`` or lies below one (whole dotted components:
    ``model.layers.1`` covers ``model.layers.1.mlp`` but not ``model.layers.10``)."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _frozen_layers(path: tuple[Any, ...], n_layers: int, frozen: tuple[str, ...]) -> list[bool]:
    """Per layer of the stacked (scanned) parameter at ``path``: is it frozen? A layer is
    frozen when its unrolled name (``model.layers.<i>.…``) or the stack's name matches."""
    if _matches(_path_name(path), frozen):
        return [True] * n_layers
    return [_matches(_path_name(layer_path(path, i)), frozen) for i in range(n_layers)]


def _decay_mask(params: Any) -> Any:
    """Weight decay on matrices only: norm scales are vectors, ``[L, dim]`` when stacked."""
    return jax.tree_util.tree_map_with_path(
        lambda path, p: p.ndim - (1 if stacked_layer_path(path) else 0) > 1, params
    )


def _zero_frozen_layer_slices(frozen: tuple[str, ...]) -> optax.GradientTransformation:
    """Zero the slices of stacked parameters whose layer is frozen (the rest of the stack
    trains). Applied to the gradients (so frozen layers add nothing to the clipped norm or to
    Adam's moments) and again to the updates (so weight decay does not move them)."""

    def zero(path, u):
        if not stacked_layer_path(path):
            return u
        keep = [not f for f in _frozen_layers(path, u.shape[0], frozen)]
        if all(keep):
            return u
        return u * jnp.asarray(keep, u.dtype).reshape((-1,) + (1,) * (u.ndim - 1))

    def update(updates, state, params=None):
        del params
        return jax.tree_util.tree_map_with_path(zero, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(cfg: OptimSection, schedule: optax.Schedule) -> optax.GradientTransformation:
    """Grad clipping then AdamW; weight decay skips norm scales (1-D, or 2-D when stacked).

    Parameters whose dotted path is or lies below an entry of ``cfg.freeze`` get no update
    and no optimizer state. Entries read the same in both layer layouts:
    ``model.embed_tokens``; ``model.layers`` (all layers); ``model.layers.3`` or
    ``model.layers.3.mlp`` (one layer: with scanned layers that layer's slice of each stack
    gets no update while the other layers train; the stack keeps its optimizer state, zero
    in the frozen slices). An entry that matches no parameter is an error naming it."""
    if not cfg.freeze:
        return _trainable_optimizer(cfg, schedule, _decay_mask)
    frozen = tuple(cfg.freeze)
    slices = _zero_frozen_layer_slices(frozen)
    train = optax.chain(slices, _trainable_optimizer(cfg, schedule, _decay_mask), slices)

    def labels(params):
        used: set[str] = set()

        def label(path, x):
            name = _path_name(path)
            if stacked_layer_path(path):
                names = [_path_name(layer_path(path, i)) for i in range(x.shape[0])]
                flags = _frozen_layers(path, x.shape[0], frozen)
            else:
                names, flags = [name], [_matches(name, frozen)]
            used.update(p for p in frozen for n in [name, *names] if _matches(n, (p,)))
            return "frozen" if all(flags) else "train"

        out = jax.tree_util.tree_map_with_path(label, params)
        unknown = [p for p in frozen if p not in used]
        if unknown:
            raise ValueError(f"optim.freeze: {unknown} match no parameter (paths look like "
                             f"'model.embed_tokens', 'model.layers.0.mlp', 'score')")
        return out

    return optax.multi_transform({"train": train, "frozen": optax.set_to_zero()}, labels)


def _trainable_optimizer(cfg, schedule, decay_mask) -> optax.GradientTransformation:
    parts = []
    if cfg.max_grad_norm and cfg.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
    parts.append(
        optax.adamw(
            schedule,
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
        )
    )
    return optax.chain(*parts)


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """Static options of the train step."""

    grad_accum_steps: int = 1
    margin: float = 0.0
    center_coef: float | None = None


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, dict, nnx.State]:
    """``(graphdef, params as a pure dict, other state)``."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(params), rest


def _dict_keys(path: tuple[Any, ...]) -> tuple[str, ...]:
    """The trailing run of dict keys of a pytree key path (a parameter's path in a state)."""
    out: list[str] = []
    for k in reversed(path):
        if not isinstance(k, jax.tree_util.DictKey):
            break
        out.append(str(k.key))
    return tuple(reversed(out))


def state_shardings(
    model_or_abstract: nnx.Module, tx: optax.GradientTransformation, mesh: Mesh
) -> dict[str, Any]:
    """Shardings of ``{"params", "opt_state", "step"}``: optimizer moments follow their params."""
    _, params, _ = nnx.split(model_or_abstract, nnx.Param, ...)
    p_shard = nnx.to_pure_dict(param_shardings(params, mesh))
    abstract_params = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(params)
    )
    replicated = NamedSharding(mesh, PartitionSpec())
    # A leaf of the optimizer state whose key path ends with a parameter's path and has its
    # shape (Adam's mu / nu) takes that parameter's sharding; anything else (counters) is
    # replicated. Works for any optax state, masked (frozen) parts included.
    by_path = {
        _dict_keys(path): (x.shape, sh)
        for (path, x), sh in zip(
            jax.tree_util.tree_leaves_with_path(abstract_params), jax.tree.leaves(p_shard)
        )
    }

    def leaf_sharding(path, x):
        keys = _dict_keys(path)
        for start in range(len(keys)):
            hit = by_path.get(keys[start:])
            if hit is not None and hit[0] == x.shape:
                return hit[1]
        return replicated

    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    o_shard = jax.tree_util.tree_map_with_path(leaf_sharding, abstract_opt)
    return {"params": p_shard, "opt_state": o_shard, "step": replicated}


def checkpoint_scan_layers(directory: str | os.PathLike, step: int) -> bool | None:
    """The layer layout of the Orbax checkpoint ``directory/<step>`` (its ``state`` item),
    read from the metadata without loading arrays: True scanned (stacked), False unrolled,
    None if it holds no layers."""
    path = epath.Path(os.fspath(directory)) / str(step) / "state"
    meta = ocp.StandardCheckpointHandler().metadata(path)
    return tree_scan_layers(getattr(meta, "tree", meta))


def check_resume_layout(directory: str | os.PathLike, step: int, scan_layers: bool,
                        key: str) -> None:
    """Refuse to resume a checkpoint in the other layer layout, naming the config ``key``
    that must change (Orbax restores a tree of the same structure only)."""
    saved = checkpoint_scan_layers(directory, step)
    if saved is not None and saved != scan_layers:
        layout = "scanned (stacked)" if saved else "unrolled"
        raise ValueError(
            f"checkpoint step {step} in {directory} has {layout} layers but {key}="
            f"{str(scan_layers).lower()}; resume with --set {key}={str(saved).lower()}"
        )


def init_state(params: dict, tx: optax.GradientTransformation, shardings: dict) -> dict:
    """Fresh optimizer state placed with its shardings."""
    opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings["step"])
    return {"params": params, "opt_state": opt_state, "step": step}


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
