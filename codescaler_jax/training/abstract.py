"""Shape-only stand-ins for a run's arrays, for dry-run compiles: no weights, no data.

A ``jax.ShapeDtypeStruct`` with a sharding is all ``jit(f).lower(...)`` needs; these helpers
build them for the train state and for batches, on any mesh (fake CPU devices or the devices
of a TPU slice).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from codescaler_jax.models.sharding import batch_sharding


def sds(x: Any, sharding: jax.sharding.Sharding) -> jax.ShapeDtypeStruct:
    """``x``'s shape and dtype with ``sharding``."""
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def abstract_train_state(
    abstract_model: nnx.Module, tx: optax.GradientTransformation, mesh: Mesh
) -> tuple[nnx.GraphDef, nnx.State, dict, dict]:
    """``(graphdef, rest, state, shardings)`` of a train state ``{"params", "opt_state",
    "step"}`` as sharded shape structs (the layout ``training.state.state_shardings`` gives)."""
    from codescaler_jax.training.state import split_model, state_shardings

    graphdef, params, rest = split_model(abstract_model)
    sh = state_shardings(abstract_model, tx, mesh)
    state = {
        "params": jax.tree.map(sds, params, sh["params"]),
        "opt_state": jax.tree.map(sds, jax.eval_shape(tx.init, params), sh["opt_state"]),
        "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=sh["step"]),
    }
    return graphdef, rest, state, sh


def abstract_batch(shapes: dict[str, tuple[tuple[int, ...], Any]], mesh: Mesh) -> dict:
    """``{key: ShapeDtypeStruct}`` of batch-major arrays split over ``('data', 'fsdp')``.

    ``shapes``: ``{key: (shape, dtype)}``, e.g. ``{"input_ids": ((B, L), jnp.int32)}``.
    """
    bs = batch_sharding(mesh)
    return {k: jax.ShapeDtypeStruct(s, d, sharding=bs) for k, (s, d) in shapes.items()}


def abstract_params(abstract_model: nnx.Module, mesh: Mesh) -> tuple[nnx.GraphDef, dict,
                                                                        nnx.State]:
    """``(graphdef, params, rest)`` with params as sharded shape structs (a frozen model)."""
    from codescaler_jax.models.sharding import param_shardings

    graphdef, params, rest = nnx.split(abstract_model, nnx.Param, ...)
    shardings = nnx.to_pure_dict(param_shardings(params, mesh))
    return graphdef, jax.tree.map(sds, nnx.to_pure_dict(params), shardings), rest
