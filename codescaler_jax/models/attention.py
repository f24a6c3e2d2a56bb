"""One attention entry point for the whole project, with a dispatch over implementations.

``dot_product_attention(q, k, v, kv_valid=..., q_offset=..., implementation=...)`` computes
grouped-query softmax attention with one mask rule for every path::

    query i (at kv slot q_offset + i) sees key slot j  iff  kv_valid[b, j]
        and j <= q_offset + i
        and q_segment_ids[b, i] == kv_segment_ids[b, j]   (when segment ids are given)

That one rule covers right-padded batches (RM, training), left-padded batches (the sampler)
and decoding into a KV cache (``q_offset`` = the cache's write index, ``kv_valid`` = the
cache's filled slots). Query head ``h`` reads KV head ``h // (N // K)`` (HF ``repeat_kv``
order). Softmax runs in float32; the output comes back in ``q.dtype``. A query that sees no
key at all (a fully masked row) gives 0, never NaN.

Implementations (``IMPLEMENTATIONS``; the model picks one with ``Qwen3Config.attention``):

- ``xla``: the dense reference. Builds the ``[B, T, S]`` mask and the ``[B, N, T, S]``
  scores; quadratic memory. Fastest for short sequences on CPU.
- ``chunked``: pure-JAX blockwise (flash) attention: an online softmax over KV blocks, KV
  blocks above the causal diagonal skipped, each KV head's query group folded into the rows
  (repeated KV heads never exist), and a ``custom_vjp`` whose backward pass recomputes the
  scores block by block from the saved output and log-sum-exp. Memory is linear in T in the
  forward and the backward pass. Runs anywhere, with static or traced ``q_offset``
  (differentiable in both cases).
- ``splash``: jax's Pallas TPU splash-attention kernel, under ``shard_map`` (batch over
  ``data``/``fsdp``, heads over ``tensor``), padding and segments expressed as segment ids.
  TPU only; on CPU only in Pallas interpret mode (``interpret=True``, slow, for tests).
- ``cudnn``: ``jax.nn.dot_product_attention(..., implementation="cudnn")``; GPU only.
- ``auto``: ``splash`` on TPU, ``cudnn`` on GPU; on CPU ``chunked`` for self-attention
  over ``CPU_CHUNKED_MIN_Q_LEN`` queries and keys or more (with ``CPU_SHORT_BLOCK`` blocks
  below ``CPU_SHORT_BLOCK_MAX_KV_LEN`` keys) and for decoding over ``CPU_CHUNKED_MIN_KV_LEN``
  key slots or more (measured), ``xla`` otherwise.

``splash`` and ``cudnn`` take a static ``q_offset`` (their masks are static); decoding
with a traced cache index goes through ``chunked`` on every backend.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from codescaler_jax.models.config import ATTENTION_IMPLEMENTATIONS

IMPLEMENTATIONS = ATTENTION_IMPLEMENTATIONS  # named in models.config, which needs no jax
_NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: exp(_NEG_INF - x) is exactly 0
# Default blocks of the chunked path (queries x keys per step).
CHUNKED_BLOCK_Q = 256
CHUNKED_BLOCK_KV = 256
# Splash: blocks must be multiples of the TPU lane width when segment ids are used.
SPLASH_LANES = 128
SPLASH_BLOCK = 512
# What XLA:TPU (libtpu 0.0.42, v5p, jax 0.10.2) compiles, measured by compiling the kernel's
# forward + backward for a v5p:2x2x1 topology from a CPU host: any head_dim from 8 to 512 (64,
# 96, 100, 129 ... need no lane multiple) at block 128-512, but it runs out of VMEM at head_dim
# 1024 x block 512, head_dim 2048 x block 512 and block 2048 x 2048 (head_dim 128), while
# head_dim 512 x 512, 1024 x 128, 256 x 1024 and 128 x 1024 compile. These two bounds separate
# every measured case.
SPLASH_MAX_BLOCK_AREA = 1024 * 1024
SPLASH_MAX_HEAD_DIM_X_BLOCKS = 512 * 1024
# auto on CPU: chunked from this many key slots up, xla below. Measured with
# `python -m codescaler_jax.bench.attention` (batch 1, 4 query / 2 KV heads of 128, f32, blocks
# 256, 2 shared cores at load 4-14, process CPU seconds): training fwd+bwd xla/chunked time
# 0.83-0.94x at T=256, 0.97x at 384, 0.99-1.24x at 512, 0.99x at 640, 1.29x at 768, 1.41-1.71x
# at 1024, 1.6x at 2048, 2.4x at 8192; a decode step (1 query over S cached slots) 0.87x at
# S=512, 1.4x at 1024, 1.04x at 2048, 1.5x at 4096, 2.6x at 32768 (wall).
CPU_CHUNKED_MIN_KV_LEN = 768
# auto on CPU for self-attention (prefill, training): chunked from this many queries and keys up,
# with 128 x 128 blocks below 1024 keys, so that the blocks above the causal diagonal are skipped
# (a 256-token sequence in one 256 block skips nothing; in 128 blocks it skips 1 of 4). Measured
# in the RM forward + backward of `bench.model --small` (hidden 256, 4 layers, 4/2 heads of 64,
# batch 4, f32, one pinned core, CPU seconds, 8 interleaved rounds at load ~18): xla 634 ms,
# chunked 128 587 ms, chunked 64 583 ms per step at T=256; at T=512 (batch 2) xla 789 ms,
# chunked 128 681 ms, chunked 256 692 ms; transformers (sdpa, causal flash kernel) 634 / 774 ms.
CPU_CHUNKED_MIN_Q_LEN = 256
CPU_SHORT_BLOCK = 128
CPU_SHORT_BLOCK_MAX_KV_LEN = 1024


class AttentionConfigError(ValueError):
    """An attention implementation, block size or head_dim that the chosen path rejects."""


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    kv_valid: jax.Array,
    q_offset: int | jax.Array = 0,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    implementation: str = "xla",
    block_q: int | None = None,
    block_kv: int | None = None,
    mesh: Any = None,
    interpret: bool = False,
) -> jax.Array:
    """Grouped-query causal attention with padding (see the module docstring for the mask).

    Args:
        q: ``[B, T, N, D]`` queries (RoPE applied).
        k, v: ``[B, S, K, D]`` keys and values, ``N % K == 0``.
        kv_valid: ``[B, S]`` bool, True where a key slot holds a real token.
        q_offset: kv slot of query 0: a Python int (0 for self-attention without a cache),
            or a traced int32 scalar (a KV cache's write index).
        q_segment_ids, kv_segment_ids: ``[B, T]`` / ``[B, S]`` int32 (>= 0), both or neither:
            a query sees only keys of its own segment (packed sequences).
        implementation: one of ``IMPLEMENTATIONS``.
        block_q, block_kv: block sizes of ``chunked`` / ``splash`` (None: the path's
            default, capped at the sequence lengths).
        mesh: ``splash`` only: the mesh to ``shard_map`` over (default: the mesh set with
            ``jax.set_mesh``, if any).
        interpret: ``splash`` only: run the Pallas kernel in interpret mode (any backend).

    Returns:
        ``[B, T, N, D]`` in ``q.dtype``.

    Raises:
        AttentionConfigError: unknown implementation; a backend that lacks it (splash
            without a TPU and without ``interpret``, cudnn without a GPU); a block size or
            head_dim the kernel rejects.
    """
    _check_shapes(q, k, v, kv_valid, q_segment_ids, kv_segment_ids)
    name = resolve_implementation(implementation, q_len=q.shape[1], kv_len=k.shape[1],
                                  platform=_target_platform(mesh))
    static_offset = isinstance(q_offset, (int, np.integer))
    if name in ("splash", "cudnn") and not static_offset:
        name = "chunked"  # their masks are static; a traced cache index goes blockwise
    if name == "xla":
        return _xla_attention(q, k, v, kv_valid, q_offset, q_segment_ids, kv_segment_ids)
    if name == "chunked":
        default_q, default_kv = _chunked_defaults(implementation, name, k.shape[1], mesh)
        return chunked_attention(q, k, v, kv_valid, q_offset, q_segment_ids, kv_segment_ids,
                                 block_q=block_q or default_q,
                                 block_kv=block_kv or default_kv)
    if name == "splash":
        return _splash_attention(q, k, v, kv_valid, int(q_offset), q_segment_ids,
                                 kv_segment_ids, block_q, block_kv, mesh, interpret)
    return _cudnn_attention(q, k, v, kv_valid, int(q_offset), q_segment_ids, kv_segment_ids,
                            block_q, block_kv)


def resolve_implementation(implementation: str, *, q_len: int, kv_len: int,
                           platform: str | None = None) -> str:
    """The concrete implementation ``auto`` stands for (others are returned as they are).

    Raises:
        AttentionConfigError: ``implementation`` is not one of ``IMPLEMENTATIONS``.
    """
    if implementation not in IMPLEMENTATIONS:
        raise AttentionConfigError(
            f"attention implementation {implementation!r} is unknown; use one of "
            f"{list(IMPLEMENTATIONS)}"
        )
    if implementation != "auto":
        return implementation
    platform = platform or jax.default_backend()
    if platform == "tpu":
        return "splash"
    if platform in ("gpu", "cuda", "rocm"):
        return "cudnn"
    if q_len >= CPU_CHUNKED_MIN_Q_LEN and kv_len >= CPU_CHUNKED_MIN_Q_LEN:
        return "chunked"
    return "chunked" if kv_len >= CPU_CHUNKED_MIN_KV_LEN else "xla"


def _chunked_defaults(implementation: str, name: str, kv_len: int, mesh: Any) -> tuple[int, int]:
    """Default chunked blocks: ``CPU_SHORT_BLOCK`` where ``auto`` chose chunked on CPU for
    fewer than ``CPU_SHORT_BLOCK_MAX_KV_LEN`` keys, else ``CHUNKED_BLOCK_Q/KV``."""
    if (implementation == "auto" and name == "chunked" and kv_len < CPU_SHORT_BLOCK_MAX_KV_LEN
            and _target_platform(mesh) == "cpu"):
        return CPU_SHORT_BLOCK, CPU_SHORT_BLOCK
    return CHUNKED_BLOCK_Q, CHUNKED_BLOCK_KV


def _target_platform(mesh: Any) -> str:
    """The platform the computation is compiled for: the mesh's (also an AOT-compile mesh over
    TPU topology devices on a CPU host), else the active mesh's, else the default backend."""
    for m in (mesh, jax.sharding.get_abstract_mesh()):
        if m is None or getattr(m, "empty", True):
            continue
        if isinstance(m, jax.sharding.Mesh):
            return m.devices.flat[0].platform
        platform = getattr(getattr(m, "abstract_device", None), "platform", None)
        if platform:
            return platform
    return jax.default_backend()


def _check_shapes(q, k, v, kv_valid, q_seg, kv_seg) -> None:
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(
            f"attention: q must be [B, T, N, D] and k, v [B, S, K, D]; got q {q.shape}, "
            f"k {k.shape}, v {v.shape}"
        )
    b, _, n, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or n % k.shape[2]:
        raise ValueError(
            f"attention: q {q.shape} and k {k.shape} disagree on batch or head_dim, or "
            f"{n} query heads are not a multiple of {k.shape[2]} KV heads"
        )
    if kv_valid.shape != k.shape[:2]:
        raise ValueError(f"attention: kv_valid {kv_valid.shape} must be [B, S] = {k.shape[:2]}")
    if (q_seg is None) != (kv_seg is None):
        raise ValueError("attention: pass q_segment_ids and kv_segment_ids together, or neither")
    if q_seg is not None and (q_seg.shape != q.shape[:2] or kv_seg.shape != k.shape[:2]):
        raise ValueError(
            f"attention: segment ids {q_seg.shape} / {kv_seg.shape} must be [B, T] / [B, S]"
        )


# ---- xla: the dense reference ------------------------------------------------------------------


def visible_mask(t: int, kv_valid: jax.Array, q_offset: int | jax.Array = 0,
                 q_segment_ids: jax.Array | None = None,
                 kv_segment_ids: jax.Array | None = None) -> jax.Array:
    """The dense mask ``[B, T, S]`` bool of the module docstring's rule (for ``xla``, tests)."""
    s = kv_valid.shape[1]
    q_pos = q_offset + jnp.arange(t)
    mask = (jnp.arange(s)[None, :] <= q_pos[:, None])[None] & kv_valid[:, None, :]
    if q_segment_ids is not None:
        mask &= q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    return mask


def _xla_attention(q, k, v, kv_valid, q_offset, q_seg, kv_seg) -> jax.Array:
    b, t, n, d = q.shape
    s, kv = k.shape[1], k.shape[2]
    g = n // kv
    mask = visible_mask(t, kv_valid, q_offset, q_seg, kv_seg)
    # Head-major, with each KV head's query group folded into the rows: one [g*t, d] x [d, s]
    # matmul per (batch, KV head). XLA:CPU runs this 1.5x faster (forward + backward, CPU
    # seconds) than the equivalent 5-D einsum; the arithmetic is identical.
    qh = q.reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, d)
    kh = k.transpose(0, 2, 1, 3)  # [b, kv, s, d]
    vh = v.transpose(0, 2, 1, 3)
    scores = jnp.einsum("bkqd,bksd->bkqs", qh, kh, preferred_element_type=jnp.float32)
    scores = scores.reshape(b, kv, g, t, s) * (d ** -0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, kv, g * t, s)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, vh).reshape(b, kv, g, t, d)
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, d)
    # A fully masked row would be the mean of all values (uniform softmax over _NEG_INF): 0.
    return jnp.where(mask.any(-1)[:, :, None, None], out, 0).astype(q.dtype)


# ---- chunked: blockwise online softmax with a recomputing backward ------------------------------


def chunked_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, kv_valid: jax.Array,
    q_offset: int | jax.Array = 0, q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None, *, block_q: int = CHUNKED_BLOCK_Q,
    block_kv: int = CHUNKED_BLOCK_KV,
) -> jax.Array:
    """Blockwise (flash) attention in pure JAX; same arguments and result as
    ``dot_product_attention``.

    Queries are cut into blocks of at most ``block_q`` positions (sized to share T evenly,
    padded internally; each KV head's ``N // K`` query heads ride along as extra rows, so a
    block is a ``[block_q * N/K, D]`` matrix per KV head and KV heads are never repeated).
    For each query block a loop runs over the KV blocks up to the causal diagonal only (its
    trip count is computed from ``q_offset``, so a traced cache index bounds it too) with
    the online softmax: running max ``m``, normaliser ``l`` and un-normalised output,
    rescaled as each block arrives. Keys are sliced from ``k``/``v`` where they lie (a KV
    cache is never copied or padded: the last block is shifted left to end at ``S`` and
    masks the keys its neighbour owns).

    The backward pass (``custom_vjp``) saves only the output and the per-row log-sum-exp; it
    loops over KV blocks and, inside, over the query blocks at or below the diagonal,
    recomputing each block's probabilities. Memory is ``O(T + S)`` in both passes (plus one
    ``[B, K, block_q * N/K, block_kv]`` block), never ``O(T * S)``.
    """
    b, t, n, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    if block_q < 1 or block_kv < 1:
        raise AttentionConfigError(
            f"chunked attention: block_q={block_q} and block_kv={block_kv} must be >= 1"
        )
    bq, bk = _even_block(t, block_q), _even_block(s, block_kv)
    nq = -(-t // bq)
    tp = nq * bq
    qp = jnp.pad(q, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
    qb = qp.reshape(b, nq, bq, kh, g, d).transpose(1, 0, 3, 2, 4, 5)  # [nq, B, K, bq, g, D]
    q_seg = None
    if q_segment_ids is not None:
        q_seg = jnp.pad(q_segment_ids, ((0, 0), (0, tp - t))).reshape(b, nq, bq).transpose(1, 0, 2)
    offset = jnp.asarray(q_offset, jnp.int32)
    kv_valid = kv_valid.astype(bool)
    bounds = _segment_bounds(q_seg, kv_segment_ids, kv_valid, bk)
    out = _flash(bk, qb, k, v, kv_valid, q_seg, kv_segment_ids, offset, bounds)
    return out.transpose(1, 0, 3, 2, 4, 5).reshape(b, tp, n, d)[:, :t]


def _segment_bounds(q_seg, kv_seg, kv_valid, bk: int) -> tuple[jax.Array, jax.Array] | None:
    """With segment ids, the blocks no query of a block can see, skipped (packed sequences:
    a query block's loop starts at its first segment's first KV block, not at key 0).

    Returns ``(j_lo [nq], i_hi [nk])``: query block ``i`` starts its KV loop at block
    ``j_lo[i]`` (every earlier KV block holds, in every batch row, no valid key of a segment
    within the query block's range of segments), and KV block ``j``'s backward loop stops
    before query block ``i_hi[j]`` (likewise for every later query block). Exact for any
    segment ids (a range test, so it skips less when segments are not sorted); ``None``
    without segment ids."""
    if q_seg is None:
        return None
    nq = q_seg.shape[0]
    s = kv_seg.shape[1]
    nk = -(-s // bk)
    starts = jnp.minimum(jnp.arange(nk) * bk, s - bk)
    idx = starts[:, None] + jnp.arange(bk)[None, :]  # [nk, bk]
    seg, ok = kv_seg[:, idx], kv_valid[:, idx]  # [B, nk, bk]
    big = jnp.iinfo(jnp.int32).max
    kv_min = jnp.where(ok, seg, big).min(-1)  # [B, nk]; a block without valid keys: (big, -big)
    kv_max = jnp.where(ok, seg, -big).max(-1)
    q_min, q_max = q_seg.min(-1).T, q_seg.max(-1).T  # [B, nq]
    apart = ((kv_max[:, None, :] < q_min[:, :, None]) | (kv_min[:, None, :] > q_max[:, :, None]))
    apart = apart.all(0)  # [nq, nk]: no batch row's queries of block i see block j
    j_lo = jnp.cumprod(apart, axis=1).sum(1).astype(jnp.int32)
    i_hi = (nq - jnp.cumprod(apart[::-1], axis=0).sum(0)).astype(jnp.int32)
    return j_lo, i_hi


def _even_block(n: int, block: int) -> int:
    """The block size actually used for a length ``n``: as many blocks as ``block`` needs, but
    shrunk to share ``n`` evenly (rounded up to a multiple of 8), so that e.g. 384 tokens at
    block 256 run as 2 x 192 instead of 2 x 256 with 128 wasted rows."""
    count = -(-n // block)
    size = -(-n // count)
    return min(block, n, -(-size // 8) * 8)


def _kv_block(x: jax.Array, j: jax.Array, bk: int) -> tuple[jax.Array, jax.Array]:
    """Block ``j`` of ``x [B, S, ...]`` along axis 1: ``(x[:, start:start + bk], start)``.

    The last block, when ``S % bk``, starts at ``S - bk`` (overlapping its neighbour); the
    overlap is masked by the caller (keys below ``j * bk`` belong to block ``j - 1``)."""
    start = jnp.minimum(j * bk, x.shape[1] - bk)
    return jax.lax.dynamic_slice_in_dim(x, start, bk, axis=1), start


def _block_mask(q_pos, j, start, bk, kv_valid, q_seg_i, kv_seg) -> jax.Array:
    """``[B, 1, bq, 1, bk]`` bool: which (query position, key slot) pairs of a block count."""
    k_pos = start + jnp.arange(bk)
    causal = (k_pos[None, :] <= q_pos[:, None]) & (k_pos >= j * bk)[None, :]  # [bq, bk]
    valid = jax.lax.dynamic_slice_in_dim(kv_valid, start, bk, axis=1)  # [B, bk]
    mask = causal[None] & valid[:, None, :]
    if q_seg_i is not None:
        kv_seg_j = jax.lax.dynamic_slice_in_dim(kv_seg, start, bk, axis=1)
        mask &= q_seg_i[:, :, None] == kv_seg_j[:, None, :]
    return mask[:, None, :, None, :]


def _scores(qi, kj, mask, scale):
    """Masked, scaled scores ``[B, K, R, bk]`` float32 of rows ``qi [B, K, bq, g, D]``."""
    b, kh, bq, g, d = qi.shape
    s = jnp.einsum("bkrd,bksd->bkrs", qi.reshape(b, kh, bq * g, d), kj,
                   preferred_element_type=jnp.float32)
    s = jnp.where(mask, s.reshape(b, kh, bq, g, -1) * scale, _NEG_INF)
    return s.reshape(b, kh, bq * g, -1)


def _flash_forward(bk, qb, k, v, kv_valid, q_seg, kv_seg, offset, bounds):
    nq, b, kh, bq, g, d = qb.shape
    s = k.shape[1]
    nk = -(-s // bk)
    scale = d ** -0.5
    rows = bq * g

    def q_block(i):
        qi = qb[i]
        q_pos = offset + i * bq + jnp.arange(bq)
        q_seg_i = None if q_seg is None else q_seg[i]
        # KV blocks holding a key <= the block's last query position; the rest are skipped.
        n_kv = jnp.minimum(nk, (offset + (i + 1) * bq - 1) // bk + 1)
        j_lo = 0 if bounds is None else bounds[0][i]  # KV blocks of earlier segments: skipped

        def body(j, carry):
            m, norm, acc = carry
            kj, start = _kv_block(k, j, bk)
            vj, _ = _kv_block(v, j, bk)
            mask = _block_mask(q_pos, j, start, bk, kv_valid, q_seg_i, kv_seg)
            sc = _scores(qi, kj.transpose(0, 2, 1, 3), mask, scale)
            m_new = jnp.maximum(m, sc.max(-1))
            # Rows that have seen only masked keys keep m = _NEG_INF; their p = exp(0) = 1
            # terms are wiped by alpha = 0 as soon as a real key arrives, or by `seen` below.
            p = jnp.exp(sc - m_new[..., None])
            alpha = jnp.exp(m - m_new)
            norm = alpha * norm + p.sum(-1)
            pv = jnp.einsum("bkrs,bksd->bkrd", p.astype(v.dtype), vj.transpose(0, 2, 1, 3),
                            preferred_element_type=jnp.float32)
            return m_new, norm, alpha[..., None] * acc + pv

        init = (jnp.full((b, kh, rows), _NEG_INF, jnp.float32),
                jnp.zeros((b, kh, rows), jnp.float32),
                jnp.zeros((b, kh, rows, d), jnp.float32))
        m, norm, acc = jax.lax.fori_loop(j_lo, n_kv, body, init)
        seen = m > 0.5 * _NEG_INF  # False: the row saw no key at all (fully masked)
        out = jnp.where(seen[..., None], acc / jnp.where(seen, norm, 1.0)[..., None], 0.0)
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, norm, 1.0)), 0.0)
        return out.astype(qb.dtype).reshape(b, kh, bq, g, d), lse

    out, lse = jax.lax.map(q_block, jnp.arange(nq))
    return out, lse  # [nq, B, K, bq, g, D], [nq, B, K, rows]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(bk, qb, k, v, kv_valid, q_seg, kv_seg, offset, bounds):
    return _flash_forward(bk, qb, k, v, kv_valid, q_seg, kv_seg, offset, bounds)[0]


def _flash_fwd(bk, qb, k, v, kv_valid, q_seg, kv_seg, offset, bounds):
    out, lse = _flash_forward(bk, qb, k, v, kv_valid, q_seg, kv_seg, offset, bounds)
    return out, (qb, k, v, kv_valid, q_seg, kv_seg, offset, bounds, out, lse)


def _flash_bwd(bk, res, d_out):
    qb, k, v, kv_valid, q_seg, kv_seg, offset, bounds, out, lse = res
    nq, b, kh, bq, g, d = qb.shape
    s = k.shape[1]
    nk = -(-s // bk)
    scale = d ** -0.5
    rows = bq * g
    cdt = qb.dtype  # matmul operand dtype (bf16 stays bf16, accumulation in float32)
    do = d_out.reshape(nq, b, kh, rows, d)
    delta = jnp.sum(do.astype(jnp.float32) * out.reshape(do.shape).astype(jnp.float32), -1)

    def kv_block(dq, j):
        kj, start = _kv_block(k, j, bk)
        vj, _ = _kv_block(v, j, bk)
        kj, vj = kj.transpose(0, 2, 1, 3), vj.transpose(0, 2, 1, 3)  # [B, K, bk, D]
        # First query block with a position >= j * bk (earlier ones cannot see this block).
        i0 = jnp.clip((j * bk - offset) // bq, 0, nq)

        def body(i, carry):
            dq, dk, dv = carry
            qi = qb[i]
            q_pos = offset + i * bq + jnp.arange(bq)
            mask = _block_mask(q_pos, j, start, bk, kv_valid,
                               None if q_seg is None else q_seg[i], kv_seg)
            p = jnp.exp(_scores(qi, kj, mask, scale) - lse[i][..., None])  # [B, K, R, bk]
            do_i = do[i]
            dv = dv + jnp.einsum("bkrs,bkrd->bksd", p.astype(cdt), do_i,
                                 preferred_element_type=jnp.float32)
            dp = jnp.einsum("bkrd,bksd->bkrs", do_i, vj, preferred_element_type=jnp.float32)
            ds = (p * (dp - delta[i][..., None])).astype(cdt)
            dq_i = jnp.einsum("bkrs,bksd->bkrd", ds, kj, preferred_element_type=jnp.float32)
            dq = dq.at[i].add(dq_i * scale)
            dk = dk + scale * jnp.einsum("bkrs,bkrd->bksd", ds, qi.reshape(b, kh, rows, d),
                                         preferred_element_type=jnp.float32)
            return dq, dk, dv

        zeros = jnp.zeros((b, kh, bk, d), jnp.float32)
        i_hi = nq if bounds is None else bounds[1][j]  # query blocks of later segments
        dq, dk, dv = jax.lax.fori_loop(i0, jnp.maximum(i0, i_hi), body, (dq, zeros, zeros))
        return dq, (dk, dv)

    dq0 = jnp.zeros((nq, b, kh, rows, d), jnp.float32)
    dq, (dk, dv) = jax.lax.scan(kv_block, dq0, jnp.arange(nk))

    def unblock(x):  # [nk, B, K, bk, D] -> [B, S, K, D]; the last block's overlap is dropped
        x = x.transpose(1, 0, 3, 2, 4)  # [B, nk, bk, K, D]
        tail = s - (nk - 1) * bk
        head = x[:, :-1].reshape(b, (nk - 1) * bk, kh, d)
        return jnp.concatenate([head, x[:, -1, bk - tail:]], axis=1).astype(k.dtype)

    return (dq.reshape(qb.shape).astype(qb.dtype), unblock(dk), unblock(dv),
            None, None, None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _rows_with_keys(t: int, kv_valid, q_offset, q_seg, kv_seg, block: int = 512) -> jax.Array:
    """``[B, T]`` bool: whether each query sees at least one key, in O(T + S) memory."""
    s = kv_valid.shape[1]
    q_pos = q_offset + jnp.arange(t)
    if q_seg is None:
        first = jnp.argmax(kv_valid, axis=1)  # first real key slot (0 when there is none)
        return kv_valid.any(1)[:, None] & (first[:, None] <= q_pos[None, :])
    bk = min(block, s)

    def one(seen, j):
        start = jnp.minimum(j * bk, s - bk)
        k_pos = start + jnp.arange(bk)
        valid = jax.lax.dynamic_slice_in_dim(kv_valid, start, bk, axis=1)
        seg = jax.lax.dynamic_slice_in_dim(kv_seg, start, bk, axis=1)
        hit = (k_pos[None, None, :] <= q_pos[None, :, None]) & valid[:, None, :]
        hit &= q_seg[:, :, None] == seg[:, None, :]
        return seen | hit.any(-1), None

    seen, _ = jax.lax.scan(one, jnp.zeros(q_seg.shape, bool), jnp.arange(-(-s // bk)))
    return seen


# ---- splash: the Pallas TPU kernel -------------------------------------------------------------


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _splash_attention(q, k, v, kv_valid, q_offset: int, q_seg, kv_seg, block_q, block_kv,
                      mesh, interpret: bool) -> jax.Array:
    platform = _target_platform(mesh)
    if platform != "tpu" and not interpret:
        raise AttentionConfigError(
            f"attention='splash' is the Pallas TPU kernel and the backend here is "
            f"{platform!r}; use a TPU, or interpret=True (slow, for tests), or "
            f"attention='chunked'"
        )
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b, t, n, d = q.shape
    s = k.shape[1]
    bq = block_q or min(SPLASH_BLOCK, _round_up(t, SPLASH_LANES))
    bk = block_kv or min(SPLASH_BLOCK, _round_up(s, SPLASH_LANES))
    for key, val in (("block_q", bq), ("block_kv", bk)):
        if val < SPLASH_LANES or val % SPLASH_LANES:
            raise AttentionConfigError(
                f"splash attention: {key}={val} is not a multiple of {SPLASH_LANES} (the TPU "
                f"lane width the kernel tiles segment ids by)"
            )
    if bq * bk > SPLASH_MAX_BLOCK_AREA or d * (bq + bk) > SPLASH_MAX_HEAD_DIM_X_BLOCKS:
        raise AttentionConfigError(
            f"splash attention: head_dim={d} with block_q={bq}, block_kv={bk} needs more TPU "
            f"VMEM than the kernel has (compiles: block_q * block_kv <= "
            f"{SPLASH_MAX_BLOCK_AREA:,} and head_dim * (block_q + block_kv) <= "
            f"{SPLASH_MAX_HEAD_DIM_X_BLOCKS:,}); use smaller blocks or attention='chunked'"
        )
    tp, sp = _round_up(t, bq), _round_up(s, bk)
    # Segment ids carry the padding: a key slot that is not valid gets segment 0, which no
    # query has (real segments are shifted to >= 1). Padded query rows are dropped after.
    qs = jnp.zeros((b, t), jnp.int32) if q_seg is None else q_seg.astype(jnp.int32)
    ks = jnp.zeros((b, s), jnp.int32) if kv_seg is None else kv_seg.astype(jnp.int32)
    qs = jnp.pad(qs + 1, ((0, 0), (0, tp - t)), constant_values=1)
    ks = jnp.pad(jnp.where(kv_valid, ks + 1, 0), ((0, 0), (0, sp - s)))
    pad = lambda x, L: jnp.pad(x, ((0, 0), (0, L - x.shape[1]), (0, 0), (0, 0)))  # noqa: E731
    # [B, heads, seq, D], scaled queries (the kernel does not scale).
    qh = (pad(q, tp) * jnp.asarray(d ** -0.5, q.dtype)).transpose(0, 2, 1, 3)
    kh_ = pad(k, sp).transpose(0, 2, 1, 3)
    vh = pad(v, sp).transpose(0, 2, 1, 3)

    def local(qh, kh_, vh, qs, ks):
        n_local = qh.shape[1]
        mask = sa.MultiHeadMask([sa.CausalMask((tp, sp), offset=q_offset)] * n_local)
        sizes = sa.BlockSizes(
            block_q=bq, block_kv=bk, block_kv_compute=bk,
            block_q_dkv=bq, block_kv_dkv=bk, block_kv_dkv_compute=bk,
            block_q_dq=bq, block_kv_dq=bk,
        )
        kernel = sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                    interpret=interpret)
        seg = sa.SegmentIds(q=qs, kv=ks)
        return jax.vmap(kernel)(qh, kh_, vh, seg)

    am = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
    if am is None or am.empty:
        out = local(qh, kh_, vh, qs, ks)
    else:
        out = _shard_splash(local, am, qh, kh_, vh, qs, ks)
    out = out.transpose(0, 2, 1, 3)[:, :t]
    seen = _rows_with_keys(t, kv_valid, q_offset, q_seg, kv_seg)
    return jnp.where(seen[:, :, None, None], out, 0).astype(q.dtype)


def _shard_splash(local, mesh, qh, kh_, vh, qs, ks):
    """Run ``local`` under ``shard_map``: batch over data/fsdp, heads over tensor."""
    from jax.sharding import PartitionSpec as P

    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
    batch_axes = tuple(a for a in ("data", "fsdp") if a in sizes)
    if qh.shape[0] % math.prod(sizes[a] for a in batch_axes):
        batch_axes = ()
    tensor = sizes.get("tensor", 1)
    # Heads split only when both query and KV heads divide: each shard then holds whole
    # query groups with their own KV heads (head h still reads KV head h // (N // K)).
    heads = "tensor" if tensor > 1 and qh.shape[1] % tensor == 0 and kh_.shape[1] % tensor == 0 \
        else None
    bspec = batch_axes or None
    hspec = P(bspec, heads, None, None)
    sspec = P(bspec, None)
    return jax.shard_map(local, mesh=mesh, in_specs=(hspec, hspec, hspec, sspec, sspec),
                         out_specs=hspec, check_vma=False)(qh, kh_, vh, qs, ks)


# ---- cudnn ---------------------------------------------------------------------------------------


def _cudnn_attention(q, k, v, kv_valid, q_offset: int, q_seg, kv_seg, block_q, block_kv):
    platform = _target_platform(None)
    if platform not in ("gpu", "cuda", "rocm"):
        raise AttentionConfigError(
            f"attention='cudnn' needs an NVIDIA GPU and the backend here is {platform!r}; use "
            f"attention='chunked' or 'xla'"
        )
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise AttentionConfigError(
            f"attention='cudnn' runs in bfloat16 or float16, and q is {q.dtype}; set the "
            f"model dtype to bfloat16 or use attention='chunked'"
        )
    if q_seg is not None:
        raise AttentionConfigError(
            "attention='cudnn' does not take segment ids here; use attention='chunked'"
        )
    t, s = q.shape[1], k.shape[1]
    if q_offset != 0 or t != s:
        # cuDNN's causal mask is aligned at slot 0; a shifted diagonal goes blockwise.
        return chunked_attention(q, k, v, kv_valid, q_offset, block_q=block_q or CHUNKED_BLOCK_Q,
                                 block_kv=block_kv or CHUNKED_BLOCK_KV)
    # cuDNN expresses key padding as a length (a valid prefix: right padding). A batch whose
    # valid keys are not a prefix (left padding) takes the chunked path instead, decided at
    # run time so one compiled program serves both layouts.
    lengths = kv_valid.sum(-1, dtype=jnp.int32)
    prefix = jnp.all(kv_valid == (jnp.arange(s)[None, :] < lengths[:, None]))

    def fast(q, k, v):
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                           key_value_seq_lengths=lengths,
                                           implementation="cudnn")
        return jnp.where((lengths > 0)[:, None, None, None], out, 0).astype(q.dtype)

    def general(q, k, v):
        return chunked_attention(q, k, v, kv_valid, 0, block_q=block_q or CHUNKED_BLOCK_Q,
                                 block_kv=block_kv or CHUNKED_BLOCK_KV)

    return jax.lax.cond(prefix, fast, general, q, k, v)
