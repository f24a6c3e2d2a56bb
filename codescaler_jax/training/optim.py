"""The optimizer and learning-rate schedule both trainers use, from an ``OptimSection``.

``make_schedule``: linear warmup, then constant / cosine / linear decay. ``make_optimizer``:
gradient clipping then AdamW, with weight decay on matrices only and ``optim.freeze`` prefixes
that get no update (whole parameters, or single layers of a scanned stack).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from codescaler_jax.models.qwen3 import layer_path, stacked_layer_path
from codescaler_jax.training.config import OptimSection


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
