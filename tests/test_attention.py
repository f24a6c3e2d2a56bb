"""The attention entry point: every implementation against the dense ``xla`` reference (forward
and gradients), the mask rule (padding left and right, GQA, a fully masked row, a KV cache
offset, segments), linear memory of ``chunked`` in the RM train step, and clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from codescaler_jax.config import ConfigError, load_config
from codescaler_jax.models import attention as A
from codescaler_jax.models.attention import AttentionConfigError, dot_product_attention
from codescaler_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM, Qwen3RewardModel
from codescaler_jax.models.sharding import MeshConfig, make_mesh
from codescaler_jax.rm.config import OptimSection, RMTrainConfig
from codescaler_jax.rm.train_step import (
    StepOptions,
    make_optimizer,
    make_schedule,
    make_train_step,
    split_model,
)


def _qkv(b, t, s, n, kh, d, dtype=jnp.float32, seed=0):
    rng = np.random.RandomState(seed)
    q = rng.randn(b, t, n, d)
    k, v = rng.randn(b, s, kh, d), rng.randn(b, s, kh, d)
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def _padded_valid(t: int, kinds: list[str]) -> jnp.ndarray:
    """``[len(kinds), t]`` bool rows: "full", "right" (3/4 real), "left" (last 2/3 real),
    "empty" (no real key: every query of that row is fully masked)."""
    pos = np.arange(t)
    rows = {"full": pos >= 0, "right": pos < max(1, 3 * t // 4), "left": pos >= t // 3,
            "empty": pos < 0}
    return jnp.asarray(np.stack([rows[k] for k in kinds]))


def _attend(impl, q, k, v, valid, **kw):
    return dot_product_attention(q, k, v, kv_valid=valid, implementation=impl, **kw)


def _value_and_grads(impl, q, k, v, valid, **kw):
    """Output and d(sum(out * w))/d(q, k, v) with a fixed random cotangent ``w``."""
    w = jnp.asarray(np.random.RandomState(9).randn(*q.shape), q.dtype)

    @jax.jit
    def run(q, k, v):
        out, vjp = jax.vjp(lambda q, k, v: _attend(impl, q, k, v, valid, **kw), q, k, v)
        return out, vjp(w)

    return run(q, k, v)


# (name, T, heads, kv_heads, head_dim, block_q, block_kv, row kinds)
CASES = [
    ("gqa2_right_left_empty", 37, 4, 2, 16, 8, 16, ["right", "left", "empty"]),
    ("gqa4_blocks_not_dividing", 29, 8, 2, 8, 16, 8, ["left", "full"]),
    ("mha_blocks_longer_than_seq", 13, 3, 3, 16, 64, 64, ["right", "left"]),
    ("mqa_length_1", 1, 4, 1, 8, 8, 8, ["full", "empty"]),
    ("block_1", 6, 2, 1, 8, 1, 1, ["right", "left"]),
]


@pytest.mark.parametrize("name,t,n,kh,d,bq,bk,kinds", CASES, ids=[c[0] for c in CASES])
def test_chunked_equals_xla_float32(name, t, n, kh, d, bq, bk, kinds):
    q, k, v = _qkv(len(kinds), t, t, n, kh, d)
    valid = _padded_valid(t, kinds)
    ref, ref_g = _value_and_grads("xla", q, k, v, valid)
    out, g = _value_and_grads("chunked", q, k, v, valid, block_q=bq, block_kv=bk)
    assert out.dtype == jnp.float32 and out.shape == q.shape
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
    for a, b in zip(g, ref_g, strict=True):
        assert not np.isnan(np.asarray(a)).any()
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    assert np.abs(np.asarray(ref)).max() > 0.3 and np.abs(np.asarray(ref_g[2])).max() > 0.3
    # Fully masked query rows (an empty row; left padding before the first real key) give 0.
    seen = np.asarray(A.visible_mask(t, valid).any(-1))
    if not seen.all():
        assert np.all(np.asarray(out)[~seen] == 0) and np.all(np.asarray(ref)[~seen] == 0)


def test_chunked_equals_xla_bfloat16():
    q, k, v = _qkv(3, 45, 45, 8, 2, 32, dtype=jnp.bfloat16, seed=1)
    valid = _padded_valid(45, ["right", "left", "full"])
    ref, ref_g = _value_and_grads("xla", q, k, v, valid)
    out, g = _value_and_grads("chunked", q, k, v, valid, block_q=16, block_kv=16)
    assert out.dtype == jnp.bfloat16
    diff = np.abs(np.asarray(out, np.float32) - np.asarray(ref, np.float32)).max()
    assert diff < 2e-2, diff
    for a, b in zip(g, ref_g, strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 2e-2


@pytest.mark.parametrize("offset", [0, 9, 52])
def test_chunked_with_a_traced_cache_offset_equals_xla(offset):
    """Queries written at slot ``offset`` of a 60-slot cache (a prefill chunk / decode step):
    the offset is a traced scalar, the cache length no multiple of the block; gradients too."""
    q, k, v = _qkv(2, 5, 60, 4, 2, 16, seed=2)
    valid = jnp.asarray(np.random.RandomState(3).rand(2, 60) > 0.3)
    ref, ref_g = _value_and_grads("xla", q, k, v, valid, q_offset=offset)
    out, g = _value_and_grads("chunked", q, k, v, valid, q_offset=jnp.int32(offset),
                              block_q=2, block_kv=16)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
    for a, b in zip(g, ref_g, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_segment_ids_restrict_attention_to_a_segment():
    q, k, v = _qkv(2, 30, 30, 4, 2, 8, seed=4)
    seg = jnp.asarray(np.sort(np.random.RandomState(5).randint(0, 3, (2, 30)), axis=1))
    valid = _padded_valid(30, ["full", "right"])
    kw = dict(q_segment_ids=seg, kv_segment_ids=seg)
    ref, ref_g = _value_and_grads("xla", q, k, v, valid, **kw)
    out, g = _value_and_grads("chunked", q, k, v, valid, block_q=8, block_kv=8, **kw)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
    for a, b in zip(g, ref_g, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    # Segments really cut: without them the result differs.
    assert np.abs(np.asarray(ref - _attend("xla", q, k, v, valid))).max() > 0.1


@pytest.mark.parametrize("layout", ["packed", "unsorted"])
def test_chunked_skips_other_segments_blocks_and_stays_exact(layout):
    """Packed sequences (sorted segments, padding with segment 0 at the end): a query block's
    KV loop starts at its segment's first block and the backward stops at the last query
    block of the KV block's segments, with the same values and gradients as ``xla``; with
    unsorted segment ids the range test skips less but stays exact."""
    t, block = 48, 8
    q, k, v = _qkv(2, t, t, 4, 2, 8, seed=11)
    if layout == "packed":  # segments of 16, 8, 16 tokens, then 8 padding tokens
        row = np.repeat([1, 2, 3, 0], [16, 8, 16, 8])
        seg = np.stack([row, np.repeat([1, 2, 0], [24, 16, 8])])
    else:
        seg = np.random.RandomState(12).randint(1, 4, (2, t))
    valid = jnp.asarray(seg > 0)
    seg = jnp.asarray(seg, jnp.int32)
    kw = dict(q_segment_ids=seg, kv_segment_ids=seg)
    ref, ref_g = _value_and_grads("xla", q, k, v, valid, **kw)
    out, g = _value_and_grads("chunked", q, k, v, valid, block_q=block, block_kv=block, **kw)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
    for a, b in zip(g, ref_g, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    q_seg = seg.reshape(2, t // block, block).transpose(1, 0, 2)
    j_lo, i_hi = (np.asarray(x) for x in A._segment_bounds(q_seg, seg, valid, block))
    if layout == "packed":
        # blocks of 8: row 0 holds segments 1 | 1 | 2 | 3 | 3 | pad, row 1 1 | 1 | 1 | 2 | 2 | pad.
        # Query blocks 3 and 4 start at KV block 3; the padding block sees no key at all.
        assert j_lo.tolist() == [0, 0, 0, 3, 3, 6]
        # KV blocks 0-2 are seen by query blocks 0-2 only, 3-4 by 3-4, the padding by none
        assert i_hi.tolist() == [3, 3, 3, 5, 5, 0]
    else:
        assert j_lo.tolist() == [0] * 6 and i_hi.tolist() == [6] * 6


@pytest.mark.parametrize("mesh_shape", [None, (2, 1, 2)], ids=["one_device", "data2_tensor2"])
def test_splash_interpret_equals_xla(mesh_shape):
    """The Pallas TPU kernel in interpret mode on CPU: right and left padding, GQA, T = 200
    (padded to two 128-blocks), forward and backward; also under shard_map on a 2x2 mesh."""
    q, k, v = _qkv(2, 200, 200, 4, 2, 16, seed=6)
    valid = _padded_valid(200, ["right", "left"])
    ref, ref_g = _value_and_grads("xla", q, k, v, valid)
    kw = dict(interpret=True, block_q=128, block_kv=128)
    if mesh_shape is None:
        out, g = _value_and_grads("splash", q, k, v, valid, **kw)
    else:
        data, fsdp, tensor = mesh_shape
        mesh = make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor),
                         devices=jax.devices()[:4])
        with jax.set_mesh(mesh):
            out, g = _value_and_grads("splash", q, k, v, valid, **kw)
            jax.block_until_ready((out, g))
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
    for a, b in zip(g, ref_g, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)


def _intermediate_shapes(jaxpr) -> list[tuple[int, ...]]:
    """Shapes of every value computed in a jaxpr, inner jaxprs (loops, custom_vjp) included."""
    shapes = []
    for eqn in jaxpr.eqns:
        shapes += [tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape")]
        for p in eqn.params.values():
            for sub in p if isinstance(p, (list, tuple)) else [p]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    shapes += _intermediate_shapes(inner)
    return shapes


def test_cache_paths_never_build_a_full_size_mask():
    """A chunked prefill step (12 queries) and a decode step (1 query) over an 80-slot cache
    with ``chunked``: no value has a query and a full cache dimension at once; per head only
    ``[queries, block_kv]`` blocks exist. (``xla`` does build ``[B, 12, 80]``: the probe works.)"""
    cfg = Qwen3Config.tiny(attention="chunked", attention_block_q=4, attention_block_kv=16,
                           num_hidden_layers=1)
    lm = Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0))
    cache = lm.init_cache(2, 80)

    def shapes(lm, chunk):
        ids = jnp.ones((2, chunk), jnp.int32)
        fn = lambda ids, cache: lm.decode(ids, jnp.ones_like(ids), cache)  # noqa: E731
        return _intermediate_shapes(jax.make_jaxpr(fn)(ids, cache).jaxpr)

    for chunk in (12, 1):
        for shape in shapes(lm, chunk):
            if 80 in shape:  # the cache (all layers, and one layer's), its [B, S] mask only
                assert shape in ((2, 80), (2, 80, 2, 16), (1, 2, 80, 2, 16)), shape
    dense = Qwen3ForCausalLM(Qwen3Config.tiny(attention="xla", num_hidden_layers=1),
                             rngs=nnx.Rngs(0))
    assert (2, 12, 80) in shapes(dense, 12)


def _rm_step_temporaries(attention: str, seq_len: int) -> int:
    """Compiled temporaries (bytes) of the RM train step, 1 pair x ``seq_len`` tokens, tiny."""
    cfg = Qwen3Config.tiny(num_hidden_layers=1, attention=attention)
    abstract = nnx.eval_shape(lambda: Qwen3RewardModel(cfg, rngs=nnx.Rngs(0)))
    graphdef, params, rest = split_model(abstract)
    optim = OptimSection(warmup_steps=0, schedule="constant")
    sched = make_schedule(optim, 10)
    tx = make_optimizer(optim, sched)
    state = {"params": params, "opt_state": jax.eval_shape(tx.init, params),
             "step": jax.ShapeDtypeStruct((), jnp.int32)}
    batch = {key: jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
             for key in ("chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask")}
    step = jax.jit(make_train_step(graphdef, rest, tx, sched, StepOptions()))
    return step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes


def test_rm_train_step_memory_is_linear_with_chunked():
    """T = 1k, 2k, 4k, 8k: chunked temporaries grow <= 2.5x per doubling, xla's ~4x."""
    lengths = (1024, 2048, 4096, 8192)
    for attention, low, high in (("chunked", 1.0, 2.5), ("xla", 3.5, 4.5)):
        temps = [_rm_step_temporaries(attention, t) for t in lengths]
        growth = [b / a for a, b in zip(temps, temps[1:])]
        assert all(low <= g <= high for g in growth), (attention, temps, growth)
        if attention == "chunked":
            chunked_8k = temps[-1]
    assert chunked_8k * 20 < temps[-1]  # xla needs > 20x more at 8k tokens


def _share_params(src: nnx.Module, cls, cfg: Qwen3Config) -> nnx.Module:
    dst = cls(cfg, rngs=nnx.Rngs(1))
    nnx.update(dst, nnx.state(src, nnx.Param))
    return dst


def _random_params(model: nnx.Module, seed: int) -> nnx.Module:
    """O(1) outputs (the 0.02 init gives near-zero logits, which would make 1e-5 vacuous)."""
    state = nnx.state(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(state))))
    nnx.update(model, jax.tree.map(
        lambda x: (1 + 0.3 * jax.random.normal(next(keys), x.shape)) if x.ndim == 1
        else 0.1 * jax.random.normal(next(keys), x.shape), state))
    return model


def test_model_rm_scores_grads_and_lm_logits_chunked_equal_xla():
    """Same weights, attention="xla" vs "chunked" (blocks of 8 over 21 tokens, GQA): RM
    scores, loss and parameter gradients, and LM logits with right and left padding."""
    base = Qwen3Config.tiny(attention="xla")
    chunked = Qwen3Config.tiny(attention="chunked", attention_block_q=8, attention_block_kv=8)
    rng = np.random.RandomState(7)
    ids = jnp.asarray(rng.randint(2, 256, (3, 21)))
    right = jnp.asarray(np.arange(21)[None] < np.array([[21], [13], [1]]), jnp.int32)
    left = right[:, ::-1]

    rm = _random_params(Qwen3RewardModel(base, rngs=nnx.Rngs(0)), 0)
    rm_c = _share_params(rm, Qwen3RewardModel, chunked)

    def loss(m):
        scores = m(ids, right)
        return optax.sigmoid_binary_cross_entropy(scores, jnp.ones(3)).mean(), scores

    step = nnx.value_and_grad(loss, has_aux=True)
    ((l0, s0), g0), ((l1, s1), g1) = (nnx.jit(step)(m) for m in (rm, rm_c))
    assert np.abs(np.asarray(s0)).max() > 0.3
    np.testing.assert_allclose(s1, s0, atol=1e-5, rtol=0)
    np.testing.assert_allclose(l1, l0, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), g1, g0)

    lm = _random_params(Qwen3ForCausalLM(base, rngs=nnx.Rngs(0)), 1)
    lm_c = _share_params(lm, Qwen3ForCausalLM, chunked)
    both = jnp.concatenate([ids, ids]), jnp.concatenate([right, left])  # right and left padding
    a, b = (np.asarray(nnx.jit(lambda m: m(*both))(m)) for m in (lm, lm_c))
    real = np.asarray(both[1]) == 1
    assert np.abs(a[real]).max() > 0.3
    np.testing.assert_allclose(b[real], a[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("attention", ["xla", "chunked"])
def test_prefill_in_chunks_equals_one_forward(attention):
    """``prefill(chunk_size=5)`` over a left-padded 23-token prompt gives the full forward's
    last-token logits and the same cache as a one-pass prefill."""
    cfg = Qwen3Config.tiny(attention=attention, attention_block_q=4, attention_block_kv=8)
    lm = _random_params(Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0)), 2)
    rng = np.random.RandomState(8)
    ids = jnp.asarray(rng.randint(2, 256, (3, 23)))
    mask = jnp.asarray(np.arange(23)[None] >= np.array([[0], [13], [22]]), jnp.int32)
    full = np.asarray(nnx.jit(lambda m: m(ids, mask))(lm))[:, -1]
    assert np.abs(full).max() > 0.3
    one, cache_one = nnx.jit(lambda m: m.prefill(ids, mask, m.init_cache(3, 30)))(lm)
    # chunk 5: a 3-token remainder, then 4 chunks in the scan.
    got, cache = nnx.jit(lambda m: m.prefill(ids, mask, m.init_cache(3, 30), chunk_size=5))(lm)
    np.testing.assert_allclose(one, full, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got, full, atol=1e-5, rtol=0)
    assert int(cache.index) == 23
    np.testing.assert_array_equal(cache.next_pos, cache_one.next_pos)
    np.testing.assert_array_equal(cache.mask, cache_one.mask)
    np.testing.assert_allclose(cache.k[1], cache_one.k[1], atol=1e-5)


def test_auto_picks_by_platform_and_length():
    r = A.resolve_implementation
    assert r("auto", q_len=4096, kv_len=4096, platform="tpu") == "splash"
    assert r("auto", q_len=16, kv_len=16, platform="gpu") == "cudnn"
    n = A.CPU_CHUNKED_MIN_KV_LEN
    assert r("auto", q_len=n, kv_len=n, platform="cpu") == "chunked"
    assert r("auto", q_len=1, kv_len=4 * n, platform="cpu") == "chunked"  # decode, long cache
    assert r("auto", q_len=1, kv_len=n - 1, platform="cpu") == "xla"  # decode, short cache
    m = A.CPU_CHUNKED_MIN_Q_LEN
    assert r("auto", q_len=m, kv_len=m, platform="cpu") == "chunked"  # prefill / training
    assert r("auto", q_len=m - 1, kv_len=m - 1, platform="cpu") == "xla"
    assert A._chunked_defaults("auto", "chunked", m, None) == (A.CPU_SHORT_BLOCK,) * 2
    assert A._chunked_defaults("chunked", "chunked", m, None) == (
        A.CHUNKED_BLOCK_Q, A.CHUNKED_BLOCK_KV)
    assert A._chunked_defaults("auto", "chunked", A.CPU_SHORT_BLOCK_MAX_KV_LEN, None) == (
        A.CHUNKED_BLOCK_Q, A.CHUNKED_BLOCK_KV)
    assert r("xla", q_len=10**6, kv_len=10**6, platform="tpu") == "xla"
    # Without a mesh, the platform is the default backend's (cpu here).
    assert A._target_platform(None) == "cpu"


def test_clear_errors():
    q, k, v = _qkv(1, 8, 8, 2, 1, 16)
    valid = jnp.ones((1, 8), bool)
    with pytest.raises(AttentionConfigError, match="'flash' is unknown"):
        _attend("flash", q, k, v, valid)
    with pytest.raises(AttentionConfigError, match=r"splash.*'cpu'.*interpret=True"):
        _attend("splash", q, k, v, valid)
    with pytest.raises(AttentionConfigError, match=r"cudnn.*GPU.*'cpu'"):
        _attend("cudnn", q, k, v, valid)
    with pytest.raises(AttentionConfigError, match="block_q=64 is not a multiple of 128"):
        _attend("splash", q, k, v, valid, interpret=True, block_q=64)
    with pytest.raises(AttentionConfigError, match="block_kv=200 is not a multiple of 128"):
        _attend("splash", q, k, v, valid, interpret=True, block_kv=200)
    with pytest.raises(AttentionConfigError, match="block_q=0"):
        A.chunked_attention(q, k, v, valid, block_q=0)
    # A head_dim the kernel cannot fit in TPU VMEM at these blocks (traced only, no compute).
    big = jax.ShapeDtypeStruct((1, 512, 2, 1024), jnp.bfloat16)
    big_kv = jax.ShapeDtypeStruct((1, 512, 1, 1024), jnp.bfloat16)
    with pytest.raises(AttentionConfigError, match="head_dim=1024 with block_q=512"):
        jax.eval_shape(lambda q, k: _attend("splash", q, k, k, jnp.ones((1, 512), bool),
                                            interpret=True), big, big_kv)
    with pytest.raises(ValueError, match="kv_valid"):
        _attend("xla", q, k, v, valid[:, :4])
    with pytest.raises(ValueError, match="Qwen3Config.attention='flash'"):
        Qwen3Config.tiny(attention="flash")
    with pytest.raises(ValueError, match="attention_block_q"):
        Qwen3Config.tiny(attention_block_q=0)


def test_config_key_is_validated_at_load():
    with pytest.raises(ConfigError, match="model.attention"):
        load_config(RMTrainConfig, "configs/rm_tiny.yaml", ["model.attention=flash"])
    with pytest.raises(ValueError, match="model.attention_block_kv"):
        load_config(RMTrainConfig, "configs/rm_tiny.yaml", ["model.attention_block_kv=0"])
    cfg = load_config(RMTrainConfig, "configs/rm_tiny.yaml",
                      ["model.attention=chunked", "model.attention_block_q=256"])
    from codescaler_jax.rm.trainer import model_config

    mcfg = model_config(cfg, vocab_min=0, pad_id=0)
    assert mcfg.attention == "chunked" and mcfg.attention_block_q == 256
