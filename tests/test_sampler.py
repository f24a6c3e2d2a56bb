"""The JAX sampler: parity with ``transformers`` ``generate``, log-probs, EOS / stop sequences,
top-k / top-p truncation, and the same samples on 1 and 8 devices.

The reference model is a random ``transformers`` Qwen3ForCausalLM (O(1) logits) saved with
``save_pretrained`` and loaded through our HF I/O.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from model_hf_reference import TINY, random_hf_model

from codescaler_jax.generate.sampler import (
    JaxSampler,
    SamplingConfig,
    categorical,
    choose_tokens,
    filter_logits,
    left_pad,
)
from codescaler_jax.models.hf_io import load_hf_model
from codescaler_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM
from codescaler_jax.models.sharding import MeshConfig, make_mesh

PAD = 0
NEW = 32
PROMPT_LENS = [12, 7, 3, 9]


@pytest.fixture(scope="module")
def hf_lm(tmp_path_factory):
    """(torch model, its directory) for the "mesh" tiny shape (divisible by 2 everywhere)."""
    model = random_hf_model("mesh", "lm", seed=11)
    path = tmp_path_factory.mktemp("lm")
    model.save_pretrained(path)
    return model, path


def _prompts(seed=0, name="mesh"):
    vocab = TINY[name]["vocab_size"]
    rng = np.random.RandomState(seed)
    return [rng.randint(2, vocab, size=n).tolist() for n in PROMPT_LENS]


@functools.cache
def _sampler(path, cfg, devices=1, mesh_cfg=None, attention="auto", scan=True):
    """One compiled sampler per (model, config, mesh, attention, layer layout) for the whole
    module (HF checkpoints load with scanned layers unless ``scan=False``)."""
    mesh = make_mesh(mesh_cfg or MeshConfig(), devices=jax.devices()[:devices])
    blocks = dict(attention_block_q=4, attention_block_kv=8) if attention == "chunked" else {}
    model = load_hf_model(path, Qwen3ForCausalLM, mesh=mesh, attention=attention,
                          scan_layers=scan, **blocks)
    return JaxSampler(model, cfg, mesh=mesh, batch_size=4, max_prompt_len=16, min_prompt_bucket=16)


@nnx.jit
def _forward(model, ids, mask):
    return model(ids, mask)


@functools.cache
def _lm(path):
    return load_hf_model(path, Qwen3ForCausalLM)


def _hf_greedy(model, prompts, eos=None):
    p_len = max(len(p) for p in prompts)
    ids, mask = left_pad(prompts, p_len, PAD)
    out = model.generate(
        input_ids=torch.tensor(ids, dtype=torch.long),
        attention_mask=torch.tensor(mask, dtype=torch.long),
        do_sample=False, max_new_tokens=NEW, pad_token_id=PAD, eos_token_id=eos,
        output_logits=True, return_dict_in_generate=True,
    )
    tokens = out.sequences[:, p_len:].numpy()
    logits = torch.stack(out.logits, 1)
    tokens = np.pad(tokens, ((0, 0), (0, NEW - tokens.shape[1])), constant_values=PAD)
    return tokens, logits


def _full_forward_logprobs(path, prompts, out, temperature=1.0):
    """log_softmax(logits / T) of each sampled token from one forward over prompt + response."""
    model = _lm(path)
    p_ids, p_mask = left_pad(prompts, out.prompt_len, PAD)
    r_mask = (np.arange(NEW)[None] < out.lengths[:, None]).astype(np.int32)
    ids = np.concatenate([p_ids, out.tokens], 1)
    mask = np.concatenate([p_mask, r_mask], 1)
    logits = _forward(model, jnp.asarray(ids), jnp.asarray(mask))[:, out.prompt_len - 1 : -1]
    logits = logits / temperature
    logp = jax.nn.log_softmax(logits, axis=-1)
    return np.asarray(jnp.take_along_axis(logp, jnp.asarray(out.tokens)[..., None], -1)[..., 0])


def _first_stop(row, eos):
    hits = np.flatnonzero(np.isin(row, eos))
    return int(hits[0]) + 1 if len(hits) else len(row)


@pytest.fixture(scope="module")
def hf_lm_tied(tmp_path_factory):
    """Tied embeddings: the sampler decodes with a transposed copy of the embedding."""
    model = random_hf_model("mha_tied", "lm", seed=12)
    path = tmp_path_factory.mktemp("lm_tied")
    model.save_pretrained(path)
    return model, path


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("which", ["hf_lm", "hf_lm_tied"])
def test_greedy_matches_transformers_generate_and_full_forward(which, scan, request):
    hf, path = request.getfixturevalue(which)
    prompts = _prompts(name="mesh" if which == "hf_lm" else "mha_tied")
    free, _ = _hf_greedy(hf, prompts)
    # An EOS id that row 0 reaches mid-way, so the parity covers stopping and padding too.
    eos = int(free[0, 10])
    ref_tokens, ref_logits = _hf_greedy(hf, prompts, eos=eos)
    cfg = SamplingConfig(max_new_tokens=NEW, greedy=True, eos_token_ids=(eos,), pad_token_id=PAD)
    out = _sampler(path, cfg, scan=scan).generate(prompts, jax.random.key(0))

    np.testing.assert_array_equal(out.tokens, ref_tokens)
    want_len = [_first_stop(r, [eos]) for r in free]
    np.testing.assert_array_equal(out.lengths, want_len)
    assert min(want_len) < NEW  # the EOS path was exercised
    np.testing.assert_array_equal(out.stopped, np.array(want_len) < NEW)

    valid = np.arange(NEW)[None] < out.lengths[:, None]
    hf_lp = torch.log_softmax(ref_logits, -1)[:, : ref_logits.shape[1]]
    hf_lp = np.asarray(hf_lp.gather(-1, torch.tensor(ref_tokens[:, : hf_lp.shape[1]],
                                                     dtype=torch.long)[..., None])[..., 0])
    hf_lp = np.pad(hf_lp, ((0, 0), (0, NEW - hf_lp.shape[1])))
    np.testing.assert_allclose(out.logprobs[valid], hf_lp[valid], atol=1e-4)
    np.testing.assert_allclose(out.logprobs, _full_forward_logprobs(path, prompts, out) * valid,
                               atol=1e-4)
    assert np.all(out.logprobs[~valid] == 0)


def test_temperature_logprobs_equal_full_forward(hf_lm):
    _, path = hf_lm
    prompts = _prompts(1)
    cfg = SamplingConfig(max_new_tokens=NEW, temperature=0.7, pad_token_id=PAD)
    out = _sampler(path, cfg).generate(prompts, jax.random.key(3))
    assert np.all(out.lengths == NEW)
    np.testing.assert_allclose(out.logprobs, _full_forward_logprobs(path, prompts, out, 0.7),
                               atol=1e-4)
    # Sampling at T=0.7 is not greedy: some token differs from the argmax path.
    greedy = _sampler(path, SamplingConfig(max_new_tokens=NEW, greedy=True, pad_token_id=PAD))
    assert np.any(greedy.generate(prompts, jax.random.key(3)).tokens != out.tokens)
    # The key matters, and the same key gives the same samples.
    sampler = _sampler(path, cfg)
    assert np.any(sampler.generate(prompts, jax.random.key(4)).tokens != out.tokens)
    np.testing.assert_array_equal(sampler.generate(prompts, jax.random.key(3)).tokens, out.tokens)


def test_stop_sequence_and_eos_end_rows_where_expected(hf_lm):
    _, path = hf_lm
    prompts = _prompts(2)
    base = SamplingConfig(max_new_tokens=NEW, greedy=True, pad_token_id=PAD)
    free = _sampler(path, base).generate(prompts, jax.random.key(0)).tokens
    stop = tuple(int(t) for t in free[1, 5:7])
    eos = int(free[2, 20])
    cfg = SamplingConfig(max_new_tokens=NEW, greedy=True, pad_token_id=PAD,
                         eos_token_ids=(eos,), stop_sequences=(stop,))
    out = _sampler(path, cfg).generate(prompts, jax.random.key(0))
    for i, row in enumerate(free):
        # Expected end: the first position where the row emits the EOS or completes `stop`.
        end = NEW
        for j in range(NEW):
            if row[j] == eos or (j >= 1 and tuple(row[j - 1 : j + 1]) == stop):
                end = j + 1
                break
        assert out.lengths[i] == end, (i, out.lengths[i], end)
        np.testing.assert_array_equal(out.tokens[i, :end], row[:end])
        assert np.all(out.tokens[i, end:] == PAD)
        assert out.stopped[i] == (end < NEW)
    assert out.lengths[1] <= 7 and out.lengths[2] <= 21


def _nucleus_case():
    probs = np.array([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.02], np.float64)
    return jnp.asarray(np.log(probs), jnp.float32)[None, :], probs


@pytest.mark.parametrize(
    "top_k,top_p,allowed",
    [
        (0, 0.75, [0, 1, 2]),     # mass before token: 0, .40, .65 < .75; .80 is not
        (2, 1.0, [0, 1]),
        (0, 0.85, [0, 1, 2, 3]),  # .80 < .85
        (3, 0.85, [0, 1, 2]),     # renormalised over top-3: mass before = 0, .5, .8125
        (0, 0.3, [0]),            # the most likely token is always kept
    ],
)
def test_top_k_top_p_never_draw_outside_the_nucleus(top_k, top_p, allowed):
    logits, probs = _nucleus_case()
    cfg = SamplingConfig(temperature=1.0, top_k=top_k, top_p=top_p)
    rows = 4000
    tokens, logp = jax.jit(lambda k: choose_tokens(jnp.repeat(logits, rows, 0), k, cfg))(
        jax.random.key(0)
    )
    tokens = np.asarray(tokens)
    assert set(np.unique(tokens)) == set(allowed)
    # Frequencies follow the renormalised nucleus (4000 draws: 3 sigma < 0.025).
    want = probs[allowed] / probs[allowed].sum()
    got = np.array([np.mean(tokens == t) for t in allowed])
    np.testing.assert_allclose(got, want, atol=0.025)
    # The reported log-prob is the untruncated one.
    np.testing.assert_allclose(np.asarray(logp), np.log(probs)[tokens], atol=1e-5)
    vals, ids = filter_logits(logits, top_k=top_k, top_p=top_p)
    kept = np.asarray(ids)[np.isfinite(np.asarray(vals))]
    assert sorted(kept.tolist()) == allowed


def test_two_level_categorical_draws_from_the_softmax():
    """The block-then-token draw used for whole-vocabulary candidates has the target law."""
    k = 10_000  # above the two-level cut-off, 20 blocks of 512 (the last one padded)
    rng = np.random.RandomState(0)
    logits = np.full(k, -np.inf, np.float32)
    heavy = rng.choice(k, 12, replace=False)          # 12 likely tokens in different blocks
    logits[heavy] = np.log(rng.uniform(1, 5, size=12))
    tail = rng.choice(np.setdiff1d(np.arange(k), heavy), 3000, replace=False)
    logits[tail] = np.log(2.0 / 3000)                 # a spread-out tail of total weight 2
    p = np.exp(logits - logits.max())
    p /= p.sum()
    rows = 2000
    draw = jax.jit(lambda key: categorical(key, jnp.broadcast_to(jnp.asarray(logits), (rows, k))))
    got = np.concatenate([np.asarray(draw(jax.random.key(i))) for i in range(10)])
    n = len(got)
    assert np.all(np.isfinite(logits[got]))  # no masked token is ever drawn
    freq = np.bincount(got, minlength=k) / n
    sigma = np.sqrt(p * (1 - p) / n)
    assert np.all(np.abs(freq[heavy] - p[heavy]) < 4 * sigma[heavy] + 1e-4)
    tail_p = p[tail].sum()
    assert abs(freq[tail].sum() - tail_p) < 4 * np.sqrt(tail_p * (1 - tail_p) / n)


@pytest.mark.parametrize("scale", [0.1, 1.0, 6.0])  # flat to peaked distributions
def test_unsorted_nucleus_equals_the_sorted_definition(scale):
    """Without top-k the nucleus is found by bisection; it must be the sorted nucleus."""
    logits = np.random.RandomState(int(scale * 10)).randn(48, 1000).astype(np.float32) * scale
    for top_p in (0.05, 0.5, 0.9, 0.95, 0.999):
        vals, ids = filter_logits(jnp.asarray(logits), top_p=top_p)
        got = np.isfinite(np.asarray(vals))
        assert np.all(np.asarray(ids) == np.arange(1000))
        p = np.exp(logits.astype(np.float64) - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        order = np.argsort(-p, axis=-1)
        sp = np.take_along_axis(p, order, -1)
        before = np.cumsum(sp, -1) - sp
        want, clear = np.zeros_like(got), np.zeros_like(got)
        np.put_along_axis(want, order, before < top_p, -1)
        # float32 sums cannot settle a token whose mass-before is within rounding of top_p.
        np.put_along_axis(clear, order, np.abs(before - top_p) > 1e-5, -1)
        assert clear.mean() > 0.99
        np.testing.assert_array_equal(got[clear], want[clear], err_msg=f"top_p={top_p}")


def test_sampler_loop_respects_top_k(hf_lm):
    """Every token the decode loop draws is among the k most likely under a full forward."""
    _, path = hf_lm
    prompts = _prompts(4)
    k = 3
    cfg = SamplingConfig(max_new_tokens=NEW, temperature=2.0, top_k=k, pad_token_id=PAD)
    out = _sampler(path, cfg).generate(prompts, jax.random.key(5))
    model = _lm(path)
    p_ids, p_mask = left_pad(prompts, out.prompt_len, PAD)
    ids = np.concatenate([p_ids, out.tokens], 1)
    mask = np.concatenate([p_mask, np.ones_like(out.tokens)], 1)
    logits = np.asarray(_forward(model, jnp.asarray(ids), jnp.asarray(mask)))
    logits = logits[:, out.prompt_len - 1 : -1]
    rank = (logits > np.take_along_axis(logits, out.tokens[..., None], -1)).sum(-1)
    assert rank.max() < k
    assert rank.max() > 0  # temperature 2 does draw below the argmax


def test_eight_devices_sample_the_same_as_one(hf_lm):
    _, path = hf_lm
    prompts = _prompts(6)
    cfg = SamplingConfig(max_new_tokens=NEW, temperature=0.8, top_p=0.9, top_k=20,
                         pad_token_id=PAD)
    one = _sampler(path, cfg).generate(prompts, jax.random.key(7))
    eight = _sampler(path, cfg, devices=8,
                     mesh_cfg=MeshConfig(data=2, fsdp=2, tensor=2)).generate(
        prompts, jax.random.key(7))
    np.testing.assert_array_equal(eight.tokens, one.tokens)
    np.testing.assert_array_equal(eight.lengths, one.lengths)
    np.testing.assert_allclose(eight.logprobs, one.logprobs, atol=1e-5)


def test_chunked_attention_and_chunked_prefill_sample_the_same(hf_lm):
    """attention="chunked" (blocks of 4 x 8 over a 16-token prompt bucket + 32 new tokens) and
    a prompt prefilled 5 tokens at a time, on a 2 x 2 x 2 mesh: the same greedy tokens and
    log-probs as the dense one-pass sampler on one device."""
    _, path = hf_lm
    prompts = _prompts(10)
    cfg = SamplingConfig(max_new_tokens=NEW, greedy=True, pad_token_id=PAD)
    ref = _sampler(path, cfg, attention="xla").generate(prompts, jax.random.key(0))
    chunked_cfg = SamplingConfig(max_new_tokens=NEW, greedy=True, pad_token_id=PAD,
                                 prefill_chunk=5)
    got = _sampler(path, chunked_cfg, devices=8, mesh_cfg=MeshConfig(data=2, fsdp=2, tensor=2),
                   attention="chunked").generate(prompts, jax.random.key(0))
    np.testing.assert_array_equal(got.tokens, ref.tokens)
    np.testing.assert_array_equal(got.lengths, ref.lengths)
    np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=1e-5)
    with pytest.raises(ValueError, match="prefill_chunk"):
        SamplingConfig(prefill_chunk=0)


def test_more_prompts_than_batch_size_and_config_checks(hf_lm):
    _, path = hf_lm
    prompts = _prompts(8) + _prompts(9)[:2]  # 6 prompts, batch_size 4: two decode loops
    cfg = SamplingConfig(max_new_tokens=NEW, greedy=True, pad_token_id=PAD)
    sampler = _sampler(path, cfg)
    out = sampler.generate(prompts, jax.random.key(0))
    assert out.tokens.shape == (6, NEW)
    alone = sampler.generate(prompts[4:], jax.random.key(0))
    np.testing.assert_array_equal(out.tokens[4:], alone.tokens)
    with pytest.raises(ValueError, match="max_prompt_len"):
        sampler.generate([[3] * 17], jax.random.key(0))
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=0.0)


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("devices", [1, 8])
def test_decode_loop_never_copies_the_kv_cache(scan, devices):
    """The compiled decode loop writes each new token's K/V into the [L, B, S, K, D] stack in
    place: no copy of the stack, nor of one layer of it, anywhere in the program (before, the
    one-layer slice written then the stack written made XLA copy the cache every step: 4 stack
    copies unrolled, 2 layer copies per scanned step), and on a 2 x 2 x 2 mesh no gather of it
    (rows over data x fsdp, KV heads over tensor)."""
    cfg = Qwen3Config.tiny(scan_layers=scan)
    mc = MeshConfig(data=2, fsdp=2, tensor=2) if devices == 8 else MeshConfig()
    mesh = make_mesh(mc, devices=jax.devices()[:devices])
    sc = SamplingConfig(max_new_tokens=16, greedy=True, eos_token_ids=(1,), pad_token_id=PAD)
    sampler = JaxSampler(Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0)), sc, mesh=mesh, batch_size=8,
                         max_prompt_len=8, min_prompt_bucket=8)
    hlo = sampler.lower(8).compile().as_text()
    assert " while(" in hlo  # the decode loop is in there
    ways = 4 if devices == 8 else 1  # per-device rows and KV heads
    rows, heads, slots = 8 // ways, cfg.num_key_value_heads // (devices // ways), 8 + 16
    stack = f"{rows},{slots},{heads},{cfg.head_dim}"  # one layer's [B, S, K, D], per device
    shapes = {f"{n},{stack}" for n in (cfg.num_hidden_layers, 1)} | {stack}
    copied = [s for s in re.findall(r"= \w+\[([\d,]*)\]\S* copy\(", hlo) if s in shapes]
    assert not copied, copied
    gathered = re.findall(r"= \w+\[([\d,]*)\][^=]*? all-gather\(", hlo)
    assert not [g for g in gathered if f",{slots}," in f",{g},"], gathered
