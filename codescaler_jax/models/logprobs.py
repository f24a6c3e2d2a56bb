"""Per-token log-probs (and entropies) from hidden states, chunked over the sequence.

The one implementation behind ``Qwen3ForCausalLM.token_logprobs`` and the GRPO log-prob
passes (``rl.grpo.response_token_stats``). With ``chunk_size`` the sequence is processed that
many positions at a time and each chunk's logits are recomputed in the backward pass
(``jax.checkpoint``), so at most ``[B, chunk, V]`` logits exist at once.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def token_stats(
    logits_fn: Callable[[jax.Array], jax.Array],
    hidden: jax.Array,
    targets: jax.Array,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    with_entropy: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """``(log p(targets) [B, T] float32, entropy [B, T] float32 or None)``.

    ``logits_fn`` maps hidden states ``[B, C, H]`` to float32 logits ``[B, C, V]`` (the LM
    head); the distribution is ``softmax(logits / temperature)``. ``hidden [B, T, H]``,
    ``targets [B, T]`` int.
    """

    def stats(h: jax.Array, tgt: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        logits = logits_fn(h)
        if temperature != 1.0:
            logits = logits / temperature
        logz = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]
        if not with_entropy:
            return picked - logz, None
        probs = jnp.exp(logits - logz[..., None])
        return picked - logz, logz - jnp.sum(probs * logits, axis=-1)

    b, t, _ = hidden.shape
    if chunk_size is None or chunk_size >= t:
        return stats(hidden, targets)
    pad = (-t) % chunk_size
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    tgt = jnp.pad(targets, ((0, 0), (0, pad)))
    n = (t + pad) // chunk_size
    h = h.reshape(b, n, chunk_size, -1).swapaxes(0, 1)
    tgt = tgt.reshape(b, n, chunk_size).swapaxes(0, 1)
    out = jax.lax.map(lambda xs: jax.checkpoint(stats)(*xs), (h, tgt))

    def unchunk(x: jax.Array | None) -> jax.Array | None:
        return None if x is None else x.swapaxes(0, 1).reshape(b, t + pad)[:, :t]

    return unchunk(out[0]), unchunk(out[1])
