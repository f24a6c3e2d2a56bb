"""FLOP accounting and the device's measured matmul peak, for MFU figures.

MFU here = model FLOPs per second / *measured* peak of a large jitted matmul on the same
device and dtype (not a datasheet number), so figures are comparable on CPUs too. Model FLOPs
count matmuls only: 6 x (non-embedding params) per trained token (2 forward + 4 backward),
plus causal attention (QK^T and AV, 2 x 2 x seq x head_dim x heads per token and layer
forward, halved for causality, x3 with backward).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp


def matmul_params(
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    vocab_out: int = 0,
) -> int:
    """Parameters that take part in matmuls per token (excludes the embedding lookup)."""
    attn = hidden * head_dim * (heads + 2 * kv_heads) + heads * head_dim * hidden
    mlp = 3 * hidden * intermediate
    return layers * (attn + mlp) + hidden * vocab_out


def train_flops_per_token(
    *,
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    seq_len: int,
    vocab_out: int = 1,
    backward: bool = True,
) -> float:
    """Matmul FLOPs per token of one forward (+backward when ``backward``) pass.

    ``vocab_out`` is the output head width (1 for a scalar RM head, vocab for an LM).
    """
    n = matmul_params(hidden, intermediate, layers, heads, kv_heads, head_dim, vocab_out)
    dense = 2.0 * n
    attn = 2.0 * 2.0 * seq_len * head_dim * heads * layers / 2.0  # causal: half the square
    fwd = dense + attn
    return fwd * 3.0 if backward else fwd


def measure_matmul_peak(
    dtype=jnp.float32, n: int = 2048, repeat: int = 5, devices: list | None = None
) -> float:
    """Aggregate FLOP/s of the best of ``repeat`` jitted matmuls over ``devices`` (default all).

    Each device multiplies its own ``[n, n]`` block by a replicated ``[n, n]`` matrix, so the
    figure is the peak of the devices *together*: on fake CPU devices that share cores it is
    the cores' peak, not the device count times one device's.
    """
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = list(devices or jax.devices())
    d = len(devices)
    mesh = Mesh(np.asarray(devices), ("d",))
    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.device_put(
        jax.random.normal(k1, (d * n, n), dtype), NamedSharding(mesh, PartitionSpec("d"))
    )
    b = jax.device_put(jax.random.normal(k2, (n, n), dtype), NamedSharding(mesh, PartitionSpec()))
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * d * n**3 / best
