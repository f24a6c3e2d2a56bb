"""Mesh construction, logical-axis rules, and identical outputs on differently shaped meshes.

Runs on the 8 fake CPU devices of tests/conftest.py; every jitted call is waited on
(``block_until_ready``) because independent collectives can deadlock on 2 cores otherwise.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from model_hf_reference import TINY, padded_batch, random_hf_model, torch_out

from codescaler_jax.models.hf_io import load_hf_model
from codescaler_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM, Qwen3RewardModel
from codescaler_jax.models.sharding import (
    DEFAULT_RULES,
    MeshConfig,
    batch_sharding,
    create_sharded,
    flat_param_shardings,
    logical_to_spec,
    make_mesh,
    shard_model,
    tree_shardings,
)

MESHES = {
    "one_device": (MeshConfig(data=1, fsdp=1, tensor=1), 1),
    "data8": (MeshConfig(data=8, fsdp=1, tensor=1), 8),
    "data2_tensor4": (MeshConfig(data=2, fsdp=1, tensor=4), 8),
    "fsdp4_tensor2": (MeshConfig(data=1, fsdp=4, tensor=2), 8),
}


def test_mesh_config_resolution_and_errors():
    assert MeshConfig().resolve(8) == (1, 8, 1)
    assert MeshConfig(data=2, fsdp=-1, tensor=2).resolve(8) == (2, 2, 2)
    assert MeshConfig(data=-1, fsdp=1, tensor=4).resolve(8) == (2, 1, 4)
    with pytest.raises(ValueError, match="not divisible"):
        MeshConfig(data=-1, fsdp=1, tensor=3).resolve(8)
    with pytest.raises(ValueError, match="product 4 != number of devices 8"):
        MeshConfig(data=2, fsdp=1, tensor=2).resolve(8)
    with pytest.raises(ValueError, match="at most one axis"):
        MeshConfig(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="MeshConfig.tensor"):
        MeshConfig(tensor=0)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert mesh.axis_names == ("data", "fsdp", "tensor") and mesh.devices.shape == (2, 2, 2)
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert make_mesh(MeshConfig(fsdp=1), jax.devices()[:1]).devices.size == 1


def test_logical_rules():
    mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=4))
    assert logical_to_spec(("embed", "heads", "head_dim"), (64, 8, 16), mesh) == PartitionSpec(
        "fsdp", "tensor", None)
    # 2 KV heads cannot split 4 ways: replicated instead of failing.
    assert logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 2, 16), mesh) == PartitionSpec(
        "fsdp", None, None)
    assert logical_to_spec(("batch", "seq"), (8, 5), mesh) == PartitionSpec(("data", "fsdp"), None)
    assert logical_to_spec(("batch",), (3,), mesh) == PartitionSpec(None)
    with pytest.raises(KeyError, match="no sharding rule"):
        logical_to_spec(("nonsense",))
    # The layer axis of scanned stacks is replicated by default; a rule that shards it falls
    # back to replication when the depth does not divide, and takes its mesh axis first.
    assert logical_to_spec(("layers", "embed", "mlp"), (36, 64, 128), mesh) == PartitionSpec(
        None, "fsdp", "tensor")
    fsdp_mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    rules = {**DEFAULT_RULES, "layers": "fsdp"}
    assert logical_to_spec(("layers", "embed"), (36, 64), fsdp_mesh, rules) == PartitionSpec(
        "fsdp", None)
    assert logical_to_spec(("layers", "embed"), (3, 64), fsdp_mesh, rules) == PartitionSpec(
        None, "fsdp")


@pytest.fixture(scope="module")
def mesh_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("mesh_rm")
    hf = random_hf_model("mesh", "rm", seed=21)
    hf.save_pretrained(path)
    ids, mask = padded_batch(5, [16, 14, 11, 9, 6, 4, 2, 1], 16, TINY["mesh"]["vocab_size"])
    return str(path), ids, mask, torch_out(hf, ids, mask)


@pytest.mark.parametrize(
    "mesh_name,scan",
    [(name, True) for name in MESHES] + [("fsdp4_tensor2", False)],
)
def test_same_scores_on_every_mesh(mesh_checkpoint, mesh_name, scan):
    path, ids, mask, ref = mesh_checkpoint
    cfg, n = MESHES[mesh_name]
    mesh = make_mesh(cfg, jax.devices()[:n])
    model = load_hf_model(path, Qwen3RewardModel, mesh=mesh, scan_layers=scan)

    # Loading placed every tensor with its target sharding.
    target = flat_param_shardings(model, mesh)
    for p, var in nnx.to_flat_state(nnx.state(model)):
        assert var.get_value().sharding.is_equivalent_to(target[p], var.get_value().ndim), p

    # The tensor axis really splits attention and MLP weights (heads / hidden units).
    # With scanned layers the same holds per layer; the leading layer axis is never split.
    data, fsdp, tensor = cfg.resolve(n)
    layer = model.model.layers if scan else model.model.layers[0]
    lead = (TINY["mesh"]["num_hidden_layers"],) if scan else ()
    h, heads, kv, d, inter = 64, 8, 4, 16, 128
    expected = {
        "q": (layer.self_attn.q_proj.kernel, (h // fsdp, heads // tensor, d)),
        "k": (layer.self_attn.k_proj.kernel, (h // fsdp, kv // tensor, d)),
        "v": (layer.self_attn.v_proj.kernel, (h // fsdp, kv // tensor, d)),
        "o": (layer.self_attn.o_proj.kernel, (heads // tensor, d, h // fsdp)),
        "gate": (layer.mlp.gate_proj.kernel, (h // fsdp, inter // tensor)),
        "up": (layer.mlp.up_proj.kernel, (h // fsdp, inter // tensor)),
        "down": (layer.mlp.down_proj.kernel, (inter // tensor, h // fsdp)),
        "norm": (layer.input_layernorm.weight, (h,)),
    }
    for name, (var, shard_shape) in expected.items():
        shard_shape = lead + shard_shape
        arr = var.get_value()
        assert arr.sharding.shard_shape(arr.shape) == shard_shape, name
        assert {s.data.shape for s in arr.addressable_shards} == {shard_shape}, name
        assert len(arr.addressable_shards) == n

    @nnx.jit
    def forward(model, ids, mask):
        return model(ids, mask)

    bs = batch_sharding(mesh)
    with jax.set_mesh(mesh):  # lets the model constrain activations
        scores = forward(model, jax.device_put(jnp.asarray(ids), bs),
                         jax.device_put(jnp.asarray(mask), bs)).block_until_ready()
    np.testing.assert_allclose(np.asarray(scores), ref, atol=1e-5, rtol=0)


def test_create_sharded_and_shard_model_match_plain_init():
    cfg = Qwen3Config.tiny(num_attention_heads=8, num_key_value_heads=4, vocab_size=128,
                           num_hidden_layers=1)
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
    sharded = create_sharded(lambda: Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(7)), mesh)
    plain = Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(7))
    flat_plain = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(plain))}
    moved = shard_model(plain, mesh)
    target = flat_param_shardings(moved, mesh)
    for model in (sharded, moved):
        for p, var in nnx.to_flat_state(nnx.state(model)):
            arr = var.get_value()
            assert arr.sharding.is_equivalent_to(target[p], arr.ndim), p
            # Same random draws; jit may fuse the sampling differently (1 ulp).
            np.testing.assert_allclose(np.asarray(arr), flat_plain[p], rtol=1e-6, atol=1e-9)
    emb = sharded.model.embed_tokens.embedding.get_value()
    assert emb.sharding.shard_shape(emb.shape) == (128 // 4, 64 // 2)  # vocab x embed split


@pytest.mark.parametrize("scan", [False, True])
def test_kv_cache_decoding_on_a_mesh_matches_one_device(scan):
    cfg = Qwen3Config.tiny(num_attention_heads=8, num_key_value_heads=4, vocab_size=128,
                           num_hidden_layers=2, scan_layers=scan)
    mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=4))
    lm = Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(3))
    prompt, pmask = padded_batch(8, [6, 3], 6, cfg.vocab_size, left=True)
    prompt, pmask = jnp.asarray(prompt), jnp.asarray(pmask)

    @nnx.jit
    def run(lm, cache):
        logits, cache = lm.decode(prompt, pmask, cache, last_only=True)
        tok = jnp.argmax(logits, -1)[:, None]
        logits2, cache = lm.decode(tok, jnp.ones_like(tok), cache, last_only=True)
        return jnp.stack([logits, logits2]), cache

    ref, _ = run(lm, lm.init_cache(2, 10))
    sharded = shard_model(lm, mesh)
    cache = lm.init_cache(2, 10)
    cache = jax.device_put(cache, tree_shardings(cache, cache.logical_axes(), mesh))
    kv_spec = PartitionSpec(None, ("data", "fsdp"), None, "tensor", None)  # [L, B, S, K, D]
    assert cache.k.sharding.spec == kv_spec
    with jax.set_mesh(mesh):
        out, new_cache = run(sharded, cache)
        out.block_until_ready()
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=0)
    assert isinstance(new_cache.k.sharding, NamedSharding)
    assert new_cache.k.sharding.is_equivalent_to(NamedSharding(mesh, kv_spec), 5)
