"""One mesh abstraction for the whole project: named axes, logical-axis rules, shardings.

The mesh always has three axes, ``('data', 'fsdp', 'tensor')``:

- ``data``: pure data parallelism (parameters replicated, batch split);
- ``fsdp``: batch split *and* parameters split along their ``embed`` dimension (ZeRO-3 style);
- ``tensor``: Megatron-style tensor parallelism (attention heads, MLP hidden units, vocabulary).

Model code never names mesh axes. Parameters and activations carry *logical* axis names
(``'embed'``, ``'heads'``, ``'mlp'``, ...) and a rules table maps each logical name to zero or
more mesh axes. A dimension whose size is not divisible by the product of its mesh axes stays
replicated (e.g. 8 KV heads on a 16-way tensor axis): sharding is an optimisation, never a
reason for a model not to run. The same code runs on 1 device and on a pod slice.

Typical use::

    mesh = make_mesh(MeshConfig(data=2, tensor=4))
    model = create_sharded(lambda: Qwen3RewardModel(cfg, rngs=nnx.Rngs(0)), mesh)
    with jax.set_mesh(mesh):          # lets the model constrain its activations
        scores = jitted_forward(model, jax.device_put(ids, batch_sharding(mesh)), ...)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from codescaler_jax.models.config import MeshConfig  # noqa: F401  (re-exported)

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. None means replicated. Parameters: vocab/embed/heads/kv_heads/
# head_dim/mlp/norm/classes, and layers (the leading axis of scanned layer stacks and of the KV
# cache; replicated, since a scan reads every layer on every device). Activations and caches:
# batch/seq/act_embed/cache_seq.
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "layers": None,
    "batch": ("data", "fsdp"),
    "seq": None,
    "act_embed": None,
    "cache_seq": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
    "classes": None,
}

Rules = Mapping[str, str | tuple[str, ...] | None]


def make_mesh(cfg: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build a ``('data', 'fsdp', 'tensor')`` mesh with Auto axis types over ``devices``.

    Auto (not Explicit, the ``jax.make_mesh`` default) lets XLA propagate shardings through
    contractions over sharded dimensions, which NNX layers rely on.
    """
    cfg = cfg or MeshConfig()
    devices = list(jax.devices() if devices is None else devices)
    shape = cfg.resolve(len(devices))
    try:
        # Topology-aware device order on TPU/GPU; plain reshape where that is not available.
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_device_mesh(shape, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        arr = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _mesh_axis_sizes(mesh: Mesh | jax.sharding.AbstractMesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))


def logical_to_spec(
    axes: Sequence[str | None],
    shape: Sequence[int] | None = None,
    mesh: Mesh | jax.sharding.AbstractMesh | None = None,
    rules: Rules | None = None,
) -> PartitionSpec:
    """Map logical axis names to a ``PartitionSpec``.

    Args:
        axes: one logical name (or None) per array dimension.
        shape: the array shape; with ``mesh``, dimensions not divisible by their mesh-axis
            product are left replicated.
        mesh: drop mesh axes the mesh lacks and check divisibility against its sizes.
        rules: logical -> mesh axes table (default ``DEFAULT_RULES``).

    Raises:
        KeyError: a logical name that the rules do not know.
    """
    rules = DEFAULT_RULES if rules is None else rules
    sizes = _mesh_axis_sizes(mesh) if mesh is not None else None
    used: set[str] = set()
    out: list[str | tuple[str, ...] | None] = []
    for dim, name in enumerate(axes):
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise KeyError(f"logical axis {name!r} has no sharding rule (known: {sorted(rules)})")
        target = rules[name]
        mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
        # A mesh axis may appear once per spec; missing axes (foreign meshes) are dropped.
        mesh_axes = tuple(
            a for a in mesh_axes if a not in used and (sizes is None or a in sizes)
        )
        if sizes is not None and shape is not None:
            if shape[dim] % math.prod(sizes[a] for a in mesh_axes):
                mesh_axes = ()
        used.update(mesh_axes)
        if not mesh_axes:
            out.append(None)
        else:
            out.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*out)


def logical_axes_of(variable: nnx.Variable) -> tuple[str | None, ...] | None:
    """The logical axis names a parameter was created with (``out_sharding`` metadata)."""
    return variable.get_metadata().get("out_sharding")


def _shape_of(variable: nnx.Variable) -> tuple[int, ...]:
    return tuple(variable.get_value().shape)


def param_shardings(tree: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
    """The ``NamedSharding`` of every variable in ``tree`` (a Module or an ``nnx.State``).

    Returns an ``nnx.State`` shaped like ``nnx.state(tree)`` whose leaves are shardings,
    usable as ``out_shardings`` or with ``jax.device_put``. Variables without logical axes
    are replicated.
    """
    state = nnx.state(tree) if isinstance(tree, nnx.Module) else tree

    def one(var: nnx.Variable) -> nnx.Variable:
        shape = _shape_of(var)
        axes = logical_axes_of(var)
        if axes is None:
            spec = PartitionSpec()
        else:
            if len(axes) != len(shape):
                raise ValueError(f"logical axes {axes} do not match shape {shape}")
            spec = logical_to_spec(axes, shape, mesh, rules)
        return var.replace(NamedSharding(mesh, spec))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def flat_param_shardings(
    tree: Any, mesh: Mesh, rules: Rules | None = None
) -> dict[tuple[Any, ...], NamedSharding]:
    """``{path: NamedSharding}`` for every variable (paths as in ``nnx.to_flat_state``)."""
    shardings = param_shardings(tree, mesh, rules)
    return {path: var.get_value() for path, var in nnx.to_flat_state(shardings)}


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules | None = None) -> nnx.Module:
    """Move ``model``'s variables onto ``mesh`` following the rules (in place; returns it)."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, param_shardings(state, mesh, rules)))
    return model


def create_sharded(
    factory: Callable[[], nnx.Module], mesh: Mesh, rules: Rules | None = None
) -> nnx.Module:
    """Initialise ``factory()`` directly sharded: no device ever holds the whole model."""
    abstract = nnx.eval_shape(factory)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = param_shardings(abstract_state, mesh, rules)

    def init() -> Any:
        return nnx.state(factory())

    state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of batch-major arrays (``[batch, ...]``): batch over ``('data', 'fsdp')``."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def tree_shardings(tree: Any, logical_axes: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
    """``NamedSharding`` for each array of ``tree`` given a matching tree of logical-axes tuples."""
    return jax.tree.map(
        lambda x, axes: NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh, rules)),
        tree,
        logical_axes,
    )


def shard_activation(x: jax.Array, axes: Sequence[str | None], rules: Rules | None = None):
    """Constrain an activation's sharding when a mesh is active (``jax.set_mesh``); else no-op.

    The model calls this with the default rules; custom parameter rules do not change how
    activations are laid out (batch over data/fsdp, heads and MLP units over tensor).

    Args:
        x: any array, e.g. ``[batch, seq, embed]``.
        axes: one logical name per dimension of ``x``.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(axes, x.shape, mesh, rules)
    return jax.lax.with_sharding_constraint(x, spec)
