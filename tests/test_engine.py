"""The continuous-batching engine: the same tokens as the static sampler and ``transformers``
``generate``, slots refilled, decode steps ~ total tokens / slots, no recompilation, and the
same samples on a sharded 8-device mesh."""

import functools
import re

import jax
import numpy as np
import pytest
import torch
from model_hf_reference import TINY, random_hf_model

from codescaler_jax.bench.rollout import counting_lm, forced_prompts, static_utilisation
from codescaler_jax.generate.engine import ContinuousSampler
from codescaler_jax.models.hf_io import load_hf_model
from codescaler_jax.models.qwen3 import KVCache, Qwen3Config, Qwen3ForCausalLM
from codescaler_jax.models.sharding import MeshConfig, make_mesh
from codescaler_jax.rl.sampler import SAMPLERS, JaxSampler, SamplingConfig

PAD = 0
NEW = 24
PROMPT_LENS = [12, 7, 3, 9, 5, 16, 2]


@pytest.fixture(scope="module")
def hf_lm(tmp_path_factory):
    model = random_hf_model("mesh", "lm", seed=11)
    path = tmp_path_factory.mktemp("lm")
    model.save_pretrained(path)
    return model, path


def _prompts(seed=0):
    rng = np.random.RandomState(seed)
    return [rng.randint(2, TINY["mesh"]["vocab_size"], size=n).tolist() for n in PROMPT_LENS]


@functools.cache
def _model(path, devices=1, mesh_cfg=None):
    mesh = make_mesh(mesh_cfg or MeshConfig(), devices=jax.devices()[:devices])
    return load_hf_model(path, Qwen3ForCausalLM, mesh=mesh), mesh


def _engines(path, cfg, slots=2, devices=1, mesh_cfg=None, static_batch=4, refill_batch=1):
    model, mesh = _model(path, devices, mesh_cfg)
    kw = dict(mesh=mesh, max_prompt_len=16, min_prompt_bucket=16)
    return (ContinuousSampler(model, cfg, batch_size=slots, chunk=4, refill_batch=refill_batch,
                              min_free=refill_batch, **kw),
            JaxSampler(model, cfg, batch_size=static_batch, **kw))


def _hf_greedy(model, prompts, eos):
    out = []
    for p in prompts:  # one row at a time: no padding in the reference
        seq = model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p),
                             dtype=torch.long), do_sample=False, max_new_tokens=NEW,
                             pad_token_id=PAD, eos_token_id=eos)[0, len(p):].numpy()
        out.append(np.pad(seq, (0, NEW - len(seq)), constant_values=PAD))
    return np.stack(out)


def test_greedy_equals_static_sampler_and_transformers(hf_lm):
    hf, path = hf_lm
    prompts = _prompts()
    free = _hf_greedy(hf, prompts, eos=None)
    eos = int(free[0, 6])  # row 0 ends mid-way; others run on, so slots free at different times
    cfg = SamplingConfig(max_new_tokens=NEW, greedy=True, eos_token_ids=(eos,), pad_token_id=PAD)
    engine, static = _engines(path, cfg)
    got = engine.generate(prompts, jax.random.key(0))
    want = static.generate(prompts, jax.random.key(0))
    np.testing.assert_array_equal(got.tokens, _hf_greedy(hf, prompts, eos=eos))
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.lengths, want.lengths)
    np.testing.assert_array_equal(got.stopped, want.stopped)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
    assert got.prompt_len == want.prompt_len == 16
    assert got.stopped.any() and not got.stopped.all()
    # 7 requests through 2 slots: every prompt was prefilled into a refilled slot.
    chunks = sum(-(-len(p) // engine.chunk) for p in prompts)
    assert engine.last_stats["prefill_chunks"] == chunks


def test_sampled_rows_equal_the_static_sampler_with_the_same_row_keys(hf_lm):
    """Row r draws from fold_in(rng, r): the static sampler's key for row r at batch size 1."""
    _, path = hf_lm
    prompts = _prompts(1)
    greedy = SamplingConfig(max_new_tokens=NEW, greedy=True, pad_token_id=PAD)
    free, _ = _engines(path, greedy)
    rows = free.generate(prompts, jax.random.key(0)).tokens
    stop = (int(rows[2, 3]), int(rows[2, 4]))
    cfg = SamplingConfig(max_new_tokens=NEW, temperature=0.8, top_k=20, top_p=0.9,
                         pad_token_id=PAD, stop_sequences=(stop,), eos_token_ids=(5, 9))
    engine, _ = _engines(path, cfg, slots=4)
    _, single = _engines(path, cfg, static_batch=1)
    got = engine.generate(prompts, jax.random.key(7))
    want = single.generate(prompts, jax.random.key(7))
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.lengths, want.lengths)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
    assert np.any(got.tokens != rows)  # it sampled, not argmax
    other = engine.generate(prompts, jax.random.key(8))
    assert np.any(other.tokens != got.tokens)


def test_no_recompilation_as_requests_come_and_go(hf_lm):
    """One program per queue bucket (slots x 2^k prompts), holding one decode step and one
    prefill-chunk step, whatever requests come and go within and between calls."""
    _, path = hf_lm
    cfg = SamplingConfig(max_new_tokens=NEW, greedy=True, eos_token_ids=(3, 7), pad_token_id=PAD)
    engine, _ = _engines(path, cfg, slots=2)
    prompts = _prompts(0) + _prompts(1)
    for n, seed in ((7, 0), (5, 1), (8, 2), (6, 3)):  # all in the bucket of 8
        out = engine.generate(prompts[seed:seed + n], jax.random.key(seed))
        assert len(out.tokens) == n and engine.last_stats["queue"] == 8
    assert dict(engine.traces) == {"init": 1, "run": 1, "prefill": 1, "decode": 1}
    engine.generate(prompts[:3], jax.random.key(0))  # a new bucket (4): one more program
    assert dict(engine.traces) == {"init": 2, "run": 2, "prefill": 2, "decode": 2}
    assert engine.last_stats["queue"] == 4


def test_sharded_slots_sample_the_same_as_one_device(hf_lm):
    _, path = hf_lm
    cfg = SamplingConfig(max_new_tokens=12, temperature=1.0, pad_token_id=PAD)
    prompts = _prompts(2)
    one, _ = _engines(path, cfg, slots=4)
    # Sharded slots, prompts prefilled two at a time (the one-hot row writes).
    eight, _ = _engines(path, cfg, slots=4, devices=8,
                        mesh_cfg=MeshConfig(data=2, fsdp=2, tensor=2), refill_batch=2)
    a = one.generate(prompts, jax.random.key(1))
    b = eight.generate(prompts, jax.random.key(1))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
    with jax.set_mesh(eight.mesh):
        cache = eight._init()["cache"]
    # Slots over data x fsdp (4 ways), KV heads over tensor ...
    assert cache.k.sharding.spec[1] == ("data", "fsdp")
    assert cache.k.sharding.spec[3] == "tensor"
    # ... and the rollout program (refills included) never gathers the cache onto a device.
    hlo = eight.lower_rollout(len(prompts)).compile().as_text()
    gathered = re.findall(r"= \w+\[([\d,]*)\][^=]*? all-gather\(", hlo)
    _, slots, s_len = cache.k.shape[:3]
    assert not [g for g in gathered if f",{slots},{s_len}," in f",{g},"], gathered


def test_one_long_row_costs_total_tokens_over_slots_not_rows_times_longest():
    cfg = Qwen3Config.tiny()
    model = counting_lm(cfg)
    mesh = make_mesh(MeshConfig(), devices=jax.devices()[:1])
    short, long_, slots = 6, 60, 4
    lengths = np.array([long_] + [short] * 39)
    prompts = forced_prompts(lengths, cfg.vocab_size, 1, [5] * len(lengths))
    sc = SamplingConfig(max_new_tokens=64, greedy=True, eos_token_ids=(1,), pad_token_id=PAD)
    engine = ContinuousSampler(model, sc, mesh=mesh, batch_size=slots, max_prompt_len=8,
                               min_prompt_bucket=8, chunk=8)
    out = engine.generate(prompts, jax.random.key(0))
    np.testing.assert_array_equal(out.lengths, lengths)  # the forced lengths, EOS included
    assert out.stopped.all()
    for row, n, p in zip(out.tokens, lengths, prompts, strict=True):
        np.testing.assert_array_equal(row[:n], (p[-1] + 1 + np.arange(n)) % cfg.vocab_size)
    # The first token of each row comes from its prefill, the rest from decode steps.
    ideal = (lengths - 1).sum() / slots
    steps = engine.last_stats["decode_steps"]
    assert ideal <= steps <= 1.1 * ideal, (steps, ideal)
    assert engine.last_stats["slot_utilisation"] > 0.9
    static_steps, static_util = static_utilisation(lengths, slots)
    assert static_steps == 9 * (short - 1) + long_ - 1  # 10 batches, one of them long
    assert steps < 0.7 * static_steps and static_util < 0.65
    assert steps < len(lengths) * long_ / slots / 5


def test_registered_for_the_trainer():
    from codescaler_jax.rl.config import RolloutSection

    assert RolloutSection(engine="continuous").engine == "continuous"
    assert SAMPLERS.get("continuous") is ContinuousSampler


@pytest.mark.parametrize("scan", [False, True])
def test_per_row_cache_index_writes_each_row_at_its_own_slot(scan):
    """A one-token step with a per-row index [B] equals each row decoded alone at its own
    scalar index: same logits, same cache (the scatter writes only (layer, b, index[b]))."""
    import dataclasses

    import jax.numpy as jnp
    from flax import nnx

    cfg = Qwen3Config.tiny(scan_layers=scan)
    lm = Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(3))
    rng = np.random.RandomState(0)
    b, s = 3, 12
    cache = lm.init_cache(b, s)
    shape = cache.k.shape
    index = jnp.asarray([2, 7, 4], jnp.int32)
    mask = jnp.asarray(np.arange(s)[None] < np.asarray(index)[:, None])
    cache = dataclasses.replace(
        cache, k=jnp.asarray(rng.randn(*shape), cache.k.dtype),
        v=jnp.asarray(rng.randn(*shape), cache.v.dtype), mask=mask, next_pos=index,
        index=index)
    tok = jnp.asarray([[5], [9], [11]], jnp.int32)
    ones = jnp.ones((b, 1), jnp.int32)
    logits, new = jax.jit(lambda c: lm.decode(tok, ones, c, last_only=True))(cache)
    for r in range(b):
        row = KVCache(k=cache.k[:, r:r + 1], v=cache.v[:, r:r + 1], mask=cache.mask[r:r + 1],
                      next_pos=cache.next_pos[r:r + 1], index=index[r])
        want_logits, want = lm.decode(tok[r:r + 1], ones[r:r + 1], row, last_only=True)
        np.testing.assert_allclose(logits[r], want_logits[0], atol=1e-5)
        np.testing.assert_allclose(new.k[:, r], want.k[:, 0], atol=1e-5)
        np.testing.assert_allclose(new.v[:, r], want.v[:, 0], atol=1e-5)
        np.testing.assert_array_equal(new.mask[r], want.mask[0])
    np.testing.assert_array_equal(new.index, index + 1)
    # Only slot index[b] of each row changed.
    changed = np.any(np.asarray(new.k != cache.k), axis=(0, 3, 4))  # [B, S]
    np.testing.assert_array_equal(changed, np.arange(s)[None] == np.asarray(index)[:, None])


def test_rollout_program_never_copies_the_kv_cache_per_step():
    """The compiled rollout holds the whole [L, slots, S, K, D] cache stack once: no copy of it
    in the loops (a lax.cond per step, or a vmapped per-row write, made XLA copy K and V every
    step), so a step costs what the static sampler's does at the same batch."""
    cfg = Qwen3Config.tiny()
    model = counting_lm(cfg)
    mesh = make_mesh(MeshConfig(), devices=jax.devices()[:1])
    sc = SamplingConfig(max_new_tokens=16, greedy=True, eos_token_ids=(1,), pad_token_id=PAD)
    engine = ContinuousSampler(model, sc, mesh=mesh, batch_size=4, max_prompt_len=8,
                               min_prompt_bucket=8, chunk=4)
    hlo = engine.lower_rollout(12).compile().as_text()
    with jax.set_mesh(mesh):
        k = engine._init()["cache"].k
    stack = f"{k.dtype.name[0]}{k.dtype.itemsize * 8}[{','.join(map(str, k.shape))}]"
    copies = re.findall(rf"= {re.escape(stack)}\S* copy\(", hlo)
    assert len(copies) <= 1, copies  # at most the initial zeros, outside the loops
    assert " while(" in hlo  # the loops are in there, on device


def test_min_free_refill_batch_and_scanned_layers_give_the_same_rows():
    """Refilling only once 3 slots are free, 3 prompts prefilled together (their chunk counts
    differ), changes the schedule, not the rows; so does the scanned layer layout."""
    lengths = np.array([9, 2, 14, 5, 3, 11, 1, 7, 4, 6])
    outs = []
    for scan, min_free in ((False, 1), (False, 3), (True, 2)):
        cfg = Qwen3Config.tiny(scan_layers=scan)
        model = counting_lm(cfg)
        mesh = make_mesh(MeshConfig(), devices=jax.devices()[:1])
        prompts = forced_prompts(lengths, cfg.vocab_size, 1, [3, 8, 5, 1, 7, 2, 6, 4, 8, 5])
        sc = SamplingConfig(max_new_tokens=12, greedy=True, eos_token_ids=(1,), pad_token_id=PAD)
        engine = ContinuousSampler(model, sc, mesh=mesh, batch_size=4, max_prompt_len=8,
                                   min_prompt_bucket=8, chunk=4, min_free=min_free,
                                   refill_batch=min_free)
        out = engine.generate(prompts, jax.random.key(0))
        np.testing.assert_array_equal(out.lengths, np.minimum(lengths, 12))
        np.testing.assert_array_equal(out.stopped, lengths <= 12)  # 14: cut at the budget
        outs.append((out, dict(engine.last_stats)))
    (a, sa), (b, sb), (c, _) = outs
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
    np.testing.assert_array_equal(a.tokens, c.tokens)  # (other random layer weights)
    assert sb["decode_steps"] > sa["decode_steps"] and sb["slot_utilisation"] < sa[
        "slot_utilisation"]
    # One prefill step per chunk of each group, not per prompt: fewer steps than one at a time.
    assert sb["prefill_chunks"] < sa["prefill_chunks"] == sum(-(-n // 4) for n in
                                                              [3, 8, 5, 1, 7, 2, 6, 4, 8, 5])


def test_engine_kwargs_are_checked_against_the_engine():
    """``rollout.engine_kwargs`` (e.g. ``refill_batch``) are the engine's constructor
    arguments (the trainer passes them: tests/test_packing.py, slow); a name the engine does
    not take is refused, naming it, and so is a refill batch over the slots."""
    from codescaler_jax.config import load_config
    from codescaler_jax.rl.config import GRPOConfig, RolloutSection

    cfg = load_config(GRPOConfig, "configs/grpo_tiny.yaml", [
        "rollout.engine=continuous", "rollout.engine_kwargs={refill_batch: 2, min_free: 2}"])
    assert cfg.rollout.engine_kwargs == {"refill_batch": 2, "min_free": 2}
    with pytest.raises(ValueError, match=r"rollout.engine_kwargs: \['refill_batchh'\]"):
        RolloutSection(engine="continuous", engine_kwargs={"refill_batchh": 2})
    with pytest.raises(ValueError, match="refill_batch=9 must be in"):
        cfg2 = Qwen3Config.tiny()
        ContinuousSampler(counting_lm(cfg2), SamplingConfig(max_new_tokens=4, greedy=True),
                          mesh=make_mesh(MeshConfig(), devices=jax.devices()[:1]),
                          batch_size=4, max_prompt_len=8, refill_batch=9)
