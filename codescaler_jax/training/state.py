"""The train state both trainers use, and its shardings.

The train state is a plain pytree ``{"params": <pure dict>, "opt_state": <optax state>,
"step": int32}``: easy to checkpoint with Orbax and to give explicit shardings. Optimizer
moments take the sharding of the parameter they belong to; counters are replicated.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from codescaler_jax.models.sharding import param_shardings


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


def init_state(params: dict, tx: optax.GradientTransformation, shardings: dict) -> dict:
    """Fresh optimizer state placed with its shardings."""
    opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings["step"])
    return {"params": params, "opt_state": opt_state, "step": step}
