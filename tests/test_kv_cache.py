"""KV-cache decoding (prefill + one-token steps) equals a full forward over the same tokens, with
the dense and the blockwise attention."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_hf_reference import padded_batch

from codescaler_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM


def _random_lm(cfg: Qwen3Config, seed: int) -> Qwen3ForCausalLM:
    """Our LM with O(1) random weights (the default 0.02 init gives near-zero logits)."""
    lm = Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(seed))
    state = nnx.state(lm, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(state))))
    nnx.update(lm, jax.tree.map(
        lambda x: (1 + 0.3 * jax.random.normal(next(keys), x.shape)) if x.ndim == 1
        else 0.1 * jax.random.normal(next(keys), x.shape), state))
    return lm


@nnx.jit
def _full(lm, ids, mask):
    return lm(ids, mask)


@nnx.jit(static_argnames="last_only")
def _decode(lm, ids, mask, cache, last_only=False):
    return lm.decode(ids, mask, cache, last_only=last_only)


# Dense, and blockwise with KV blocks of 4 (the cache spans several, the last one partial).
ATTENTION = {"xla": dict(attention="xla"),
             "chunked": dict(attention="chunked", attention_block_q=4, attention_block_kv=4)}


@pytest.mark.parametrize("attention", list(ATTENTION))
def test_prefill_then_steps_equal_full_forward(attention):
    cfg = Qwen3Config.tiny(**ATTENTION[attention])
    lm = _random_lm(cfg, seed=0)
    prompt_len, steps, max_len = 7, 5, 16
    # Left-padded prompts of different lengths, as a sampler builds them.
    prompt, pmask = padded_batch(1, [7, 4, 1], prompt_len, cfg.vocab_size, left=True)
    new_tokens = np.random.RandomState(2).randint(2, cfg.vocab_size, size=(3, steps))
    ids = jnp.asarray(np.concatenate([prompt, new_tokens], 1))
    mask = jnp.asarray(np.concatenate([pmask, np.ones_like(new_tokens)], 1))
    # The reference is the dense full forward with the same weights.
    full = np.asarray(_full(_random_lm(dataclasses.replace(cfg, attention="xla"), 0), ids, mask))

    cache = lm.init_cache(3, max_len)
    logits, cache = _decode(lm, ids[:, :prompt_len], mask[:, :prompt_len], cache)
    got = [np.asarray(logits)]
    for t in range(steps):
        col = prompt_len + t
        logits, cache = _decode(lm, ids[:, col:col + 1], mask[:, col:col + 1], cache,
                                last_only=True)
        got.append(np.asarray(logits)[:, None])
    got = np.concatenate(got, 1)
    real = np.asarray(mask) == 1
    assert np.abs(full[real]).max() > 1.0
    np.testing.assert_allclose(got[real], full[real], atol=1e-4, rtol=0)
    assert int(cache.index) == prompt_len + steps
    np.testing.assert_array_equal(cache.next_pos, np.asarray(mask).sum(1))
    np.testing.assert_array_equal(cache.mask[:, :prompt_len + steps], real)
    assert not np.asarray(cache.mask[:, prompt_len + steps:]).any()


@pytest.mark.parametrize("attention", list(ATTENTION))
def test_chunked_prefill_and_finished_rows(attention):
    """A prompt fed in two chunks, and a row whose step is masked out (a finished sequence),
    give the same logits as the full forward over the real tokens."""
    cfg = Qwen3Config.tiny(num_attention_heads=4, num_key_value_heads=1, **ATTENTION[attention])
    lm = _random_lm(cfg, seed=1)
    prompt, pmask = padded_batch(3, [8, 5], 8, cfg.vocab_size, left=True)
    cache = lm.init_cache(2, 12)
    _, cache = _decode(lm, jnp.asarray(prompt[:, :3]), jnp.asarray(pmask[:, :3]), cache)
    logits_a, cache = _decode(lm, jnp.asarray(prompt[:, 3:]), jnp.asarray(pmask[:, 3:]), cache)
    # Step: row 0 gets token 9; row 1 is finished (mask 0, token is padding).
    step_ids, step_mask = np.array([[9], [0]]), np.array([[1], [0]])
    logits_b, cache = _decode(lm, jnp.asarray(step_ids), jnp.asarray(step_mask), cache)
    # Row 1 continues after the skipped slot.
    logits_c, cache = _decode(lm, jnp.asarray([[11], [12]]), jnp.ones((2, 1), jnp.int32), cache)

    ids = np.concatenate([prompt, step_ids, [[11], [12]]], 1)
    mask = np.concatenate([pmask, step_mask, [[1], [1]]], 1)
    ref = _random_lm(dataclasses.replace(cfg, attention="xla"), seed=1)
    full = np.asarray(_full(ref, jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(logits_a[:, -1], full[:, 7], atol=1e-4, rtol=0)
    np.testing.assert_allclose(logits_b[0, 0], full[0, 8], atol=1e-4, rtol=0)
    np.testing.assert_allclose(logits_c[:, 0], full[:, 9], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(cache.next_pos, [10, 6])


def test_cache_is_static_shape_and_jits_once():
    cfg = Qwen3Config.tiny()
    lm = _random_lm(cfg, seed=2)
    graphdef, state = nnx.split(lm)
    traces = []

    @jax.jit
    def step(state, tok, cache):
        traces.append(1)
        return nnx.merge(graphdef, state).decode(tok, jnp.ones_like(tok), cache, last_only=True)

    cache = lm.init_cache(2, 8, dtype=jnp.bfloat16)
    assert cache.k.dtype == jnp.bfloat16 and cache.k.shape[0] == cfg.num_hidden_layers
    tok = jnp.array([[3], [4]])
    for _ in range(4):
        logits, cache = step(state, tok, cache)
        tok = jnp.argmax(logits, -1)[:, None]
    assert len(traces) == 1 and logits.shape == (2, cfg.vocab_size)
    assert cache.k.shape == (cfg.num_hidden_layers, 2, 8, cfg.num_key_value_heads, cfg.head_dim)
