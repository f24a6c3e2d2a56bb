"""Scanned layers (``scan_layers``): the stacked layout computes what the unrolled one does,
its program does not grow with depth, and everything that walks parameters handles it."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from model_hf_reference import padded_batch

from codescaler_jax.config import ConfigError, load_config
from codescaler_jax.models.qwen3 import (
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3RewardModel,
    stack_layers,
    stacked_layer_path,
    unstack_layers,
)
from codescaler_jax.models.sharding import MeshConfig, make_mesh, shard_model
from codescaler_jax.rm.config import OptimSection, RMTrainConfig
from codescaler_jax.rm.train_step import (
    StepOptions,
    check_resume_layout,
    checkpoint_scan_layers,
    init_state,
    make_optimizer,
    make_schedule,
    make_train_step,
    split_model,
    state_shardings,
)
from codescaler_jax.rm.trainer import model_config

LENGTHS = [9, 6, 1]


def _params(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _pair(cls, seed=0, **kw):
    """The same random model in both layouts: ``(unrolled, scanned)``, O(1) outputs."""
    cfg = Qwen3Config.tiny(num_hidden_layers=3, **kw)
    unrolled = cls(cfg, rngs=nnx.Rngs(seed))
    rng = np.random.RandomState(seed)
    params = jax.tree.map(
        lambda x: jnp.asarray((1 + 0.3 * rng.randn(*x.shape)) if x.ndim == 1
                              else 0.1 * rng.randn(*x.shape), jnp.float32),
        _params(unrolled))
    nnx.update(unrolled, params)
    scanned = cls(Qwen3Config.tiny(num_hidden_layers=3, scan_layers=True, **kw),
                  rngs=nnx.Rngs(seed + 1))
    nnx.update(scanned, stack_layers(params))
    return unrolled, scanned


def _close(a, b, tol=1e-6):
    """Every array of ``a`` within ``tol`` of ``b``'s, relative to the larger of 1 and the
    array's largest entry (float32 rounding scales with the values; gradients reach ~10)."""

    def check(x, y):
        y = np.asarray(y)
        scale = max(1.0, float(np.abs(y).max())) if y.size else 1.0
        np.testing.assert_allclose(x, y, atol=tol * scale, rtol=0)

    jax.tree.map(check, a, b)


def test_layout_of_stacked_parameters():
    _, scanned = _pair(Qwen3RewardModel)
    flat = dict(nnx.to_flat_state(nnx.state(scanned, nnx.Param)))
    q = flat[("model", "layers", "self_attn", "q_proj", "kernel")]
    assert q.get_value().shape == (3, 64, 4, 16)
    assert q.get_metadata()["out_sharding"] == ("layers", "embed", "heads", "head_dim")
    norm = flat[("model", "layers", "input_layernorm", "weight")]
    assert norm.get_value().shape == (3, 64)
    assert stacked_layer_path(("model", "layers", "mlp", "up_proj", "kernel"))
    assert not stacked_layer_path(("model", "layers", 0, "mlp", "up_proj", "kernel"))
    assert not stacked_layer_path(("model", "embed_tokens", "embedding"))
    # Converting back gives the unrolled tree exactly.
    params = _params(scanned)
    _close(stack_layers(unstack_layers(params)), params, tol=0)


@pytest.mark.parametrize("remat", [False, "dots_with_no_batch_dims_saveable"])
def test_rm_scores_and_gradients_agree(remat):
    unrolled, scanned = _pair(Qwen3RewardModel, remat=remat)
    ids, mask = map(jnp.asarray, padded_batch(1, LENGTHS, 9, 256))

    @nnx.jit
    def loss_and_grads(model):
        loss = lambda m: jnp.sum(jnp.tanh(m(ids, mask)) * jnp.array([1.0, -2.0, 0.5]))
        return nnx.value_and_grad(loss)(model), model(ids, mask)

    (l0, g0), s0 = loss_and_grads(unrolled)
    (l1, g1), s1 = loss_and_grads(scanned)
    assert np.abs(np.asarray(s0)).max() > 0.3
    _close(s1, s0)
    _close(l1, l0)
    g0, g1 = nnx.to_pure_dict(g0), unstack_layers(nnx.to_pure_dict(g1))
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g0)) > 1.0
    # Gradients to 2e-6 of each tensor's largest entry: float32 rounding alone moves them
    # that much (measured: the same unrolled model eager vs jitted differs by 1.6e-6 in the
    # embedding gradient, whose largest entry is 1.7; scan vs unrolled there: 2.2e-6).
    _close(g1, g0, tol=2e-6)


def test_lm_logits_and_kv_cache_decoding_agree():
    unrolled, scanned = _pair(Qwen3ForCausalLM, seed=2)
    prompt, pmask = padded_batch(4, [6, 3, 1], 6, 256, left=True)
    prompt, pmask = jnp.asarray(prompt), jnp.asarray(pmask)

    @nnx.jit
    def run(lm):
        full = lm(prompt, pmask)
        cache = lm.init_cache(3, 6).extend(3)
        logits, cache = lm.decode(prompt, pmask, cache, last_only=True)
        steps = [logits]
        for _ in range(3):
            tok = jnp.argmax(steps[-1], -1)[:, None]
            logits, cache = lm.decode(tok, jnp.ones_like(tok), cache, last_only=True)
            steps.append(logits)
        return full, jnp.stack(steps, 1), cache

    full0, dec0, cache0 = run(unrolled)
    full1, dec1, cache1 = run(scanned)
    real = np.asarray(pmask) == 1
    assert np.abs(np.asarray(full0)[real]).max() > 1.0
    _close(np.asarray(full1)[real], np.asarray(full0)[real])
    _close(dec1, dec0)
    np.testing.assert_allclose(dec0[:, 0], np.asarray(full0)[:, -1], atol=1e-5, rtol=0)
    assert cache1.k.shape == (3, 3, 9, 2, 16)  # [layers, batch, slots, kv_heads, head_dim]
    _close(cache1, cache0)


def _rm_hlo_sizes(layers: int, scan: bool) -> tuple[int, int | None]:
    """``(lowered StableHLO chars, compiled HLO chars)`` of the RM forward + backward (the
    unrolled program is only lowered: compiling it is the cost that scanning avoids)."""
    cfg = Qwen3Config.tiny(num_hidden_layers=layers, scan_layers=scan, remat=True)
    model = nnx.eval_shape(lambda: Qwen3RewardModel(cfg, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ids = jax.ShapeDtypeStruct((2, 16), jnp.int32)

    def loss(params, ids, mask):
        return nnx.merge(graphdef, params, rest)(ids, mask).sum()

    lowered = jax.jit(jax.grad(loss)).lower(params, ids, ids)
    return len(lowered.as_text()), len(lowered.compile().as_text()) if scan else None


def test_program_size_does_not_grow_with_depth():
    scan2, scan8 = _rm_hlo_sizes(2, True), _rm_hlo_sizes(8, True)
    unrolled2, unrolled8 = _rm_hlo_sizes(2, False), _rm_hlo_sizes(8, False)
    assert scan8[0] < 1.02 * scan2[0] and scan8[1] < 1.02 * scan2[1], (scan2, scan8)
    assert unrolled8[0] > 2.5 * unrolled2[0], (unrolled2, unrolled8)
    assert scan8[0] < 0.5 * unrolled8[0]


def test_named_sizes_scan_by_default_and_config_key():
    assert Qwen3Config.qwen3_8b().scan_layers and Qwen3Config.qwen3_0_6b().scan_layers
    assert not Qwen3Config.tiny().scan_layers
    assert Qwen3Config.from_hf(Qwen3Config.qwen3_4b().to_hf_dict()).scan_layers
    with pytest.raises(ValueError, match="scan_layers"):
        Qwen3Config.tiny(scan_layers="yes")
    size = ["model.size=qwen3_0_6b", "model.num_hidden_layers=2"]
    assert model_config(load_config(RMTrainConfig, None, size), 0, 0).scan_layers
    off = load_config(RMTrainConfig, None, [*size, "model.scan_layers=false"])
    assert not model_config(off, 0, 0).scan_layers
    tiny_on = load_config(RMTrainConfig, None, ["model.scan_layers=true"])
    assert model_config(tiny_on, 0, 0).scan_layers
    with pytest.raises(ConfigError, match="model.scan_layers"):
        load_config(RMTrainConfig, None, ["model.scan_layers=sometimes"])


def _one_train_step(scan: bool, freeze: list[str]):
    """Params after one RM train step (weight decay on, ``freeze``) on a 2x2x2 mesh, in the
    unrolled layout whatever ``scan``, plus the optimizer state's leaf count."""
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    unrolled, scanned = _pair(Qwen3RewardModel, seed=5)
    model = shard_model(scanned if scan else unrolled, mesh)
    graphdef, params, rest = split_model(model)
    optim = OptimSection(learning_rate=1e-2, warmup_steps=0, schedule="constant",
                         eps=1e-3, weight_decay=0.5, freeze=freeze)
    sched = make_schedule(optim, 10)
    tx = make_optimizer(optim, sched)
    sh = state_shardings(model, tx, mesh)
    state = init_state(params, tx, sh)
    step = jax.jit(make_train_step(graphdef, rest, tx, sched, StepOptions()),
                   out_shardings=(sh, None))
    ids, mask = padded_batch(6, [9, 7, 5, 3, 9, 2, 4, 8], 9, 256)
    batch = {"chosen_ids": ids[:4], "chosen_mask": mask[:4],
             "rejected_ids": ids[4:], "rejected_mask": mask[4:]}
    with jax.set_mesh(mesh):
        new, metrics = step(state, jax.tree.map(jnp.asarray, batch))
        jax.block_until_ready(new)
    # Adam's moments take their parameter's sharding, stacked ones included.
    mu = new["opt_state"]
    flat_sh = dict(jax.tree_util.tree_leaves_with_path(sh["params"]))
    for path, x in jax.tree_util.tree_leaves_with_path(new["params"]):
        assert x.sharding.is_equivalent_to(flat_sh[path], x.ndim), path
    n_state = sum(x.size for x in jax.tree.leaves(mu))
    before = unstack_layers(jax.tree.map(np.asarray, params))
    after = unstack_layers(jax.tree.map(np.asarray, new["params"]))
    return before, after, float(metrics["grad_norm"]), n_state


@pytest.mark.slow  # CI time: the faster tests of this file cover the same path
def test_train_step_freeze_and_weight_decay_agree_across_layouts():
    freeze = ["model.embed_tokens", "model.layers.1"]
    before, after0, norm0, _ = _one_train_step(False, freeze)
    _, after1, norm1, _ = _one_train_step(True, freeze)
    assert norm1 == pytest.approx(norm0, rel=1e-5)
    _close(after1, after0)
    # Frozen: the embedding and every parameter of layer 1; layers 0 and 2 train.
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), after1, before)
    assert moved["model"]["embed_tokens"]["embedding"] == 0.0
    assert all(v == 0.0 for v in jax.tree.leaves(moved["model"]["layers"][1]))
    for i in (0, 2):
        assert all(v > 0.0 for v in jax.tree.leaves(moved["model"]["layers"][i]))


@pytest.mark.parametrize("scan", [False, True])
def test_weight_decay_skips_norm_scales_in_both_layouts(scan):
    """With a zero gradient AdamW's update is ``-lr * wd * param``: nonzero for matrices, zero
    for norm scales (``[L, dim]`` when stacked, which an ``ndim > 1`` rule would decay)."""
    unrolled, scanned = _pair(Qwen3RewardModel)
    params = _params(scanned if scan else unrolled)
    optim = OptimSection(learning_rate=0.1, warmup_steps=0, schedule="constant",
                         weight_decay=0.5, max_grad_norm=0.0)
    tx = make_optimizer(optim, make_schedule(optim, 10))
    updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), tx.init(params),
                                    params)
    flat = jax.tree_util.tree_leaves_with_path(unstack_layers(updates))
    flat_p = dict(jax.tree_util.tree_leaves_with_path(unstack_layers(params)))
    for path, u in flat:
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            assert float(jnp.abs(u).max()) == 0.0, name
        else:
            np.testing.assert_allclose(u, -0.05 * flat_p[path], rtol=1e-5, err_msg=name)


def test_freeze_errors_name_the_entry():
    optim = OptimSection(freeze=["model.layers.9"])
    tx = make_optimizer(optim, make_schedule(optim, 10))
    _, scanned = _pair(Qwen3RewardModel)
    with pytest.raises(ValueError, match=r"optim.freeze: \['model.layers.9'\]"):
        tx.init(_params(scanned))


def test_checkpoint_layout_is_read_from_orbax_metadata(tmp_path):
    """Resuming in the other layer layout is refused with the key to change, found from the
    checkpoint's metadata (before Orbax fails on a tree mismatch)."""
    unrolled, scanned = _pair(Qwen3RewardModel)
    for name, model in (("unrolled", unrolled), ("scanned", scanned)):
        with ocp.CheckpointManager(tmp_path / name, options=ocp.CheckpointManagerOptions(
                create=True)) as mngr:
            mngr.save(3, args=ocp.args.Composite(
                state=ocp.args.StandardSave({"params": _params(model)})))
            mngr.wait_until_finished()
    assert checkpoint_scan_layers(tmp_path / "unrolled", 3) is False
    assert checkpoint_scan_layers(tmp_path / "scanned", 3) is True
    check_resume_layout(tmp_path / "scanned", 3, True, "model.scan_layers")
    with pytest.raises(ValueError, match=r"unrolled layers but model.scan_layers=true; resume "
                                         r"with --set model.scan_layers=false"):
        check_resume_layout(tmp_path / "unrolled", 3, True, "model.scan_layers")
