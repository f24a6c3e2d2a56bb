"""The co-located reward model: the RM (and, with beta > 0, the reference policy) sharded on
the policy's mesh by the policy's rules, scoring the same as a standalone 1-device scorer,
shaped on device without the raw scores coming to the host, and the dry run's memory split
by part (policy, optimizer, RM, reference, KV cache)."""

import functools

import jax
import numpy as np
import pytest
from flax import nnx

from codescaler_jax.code.extract import extract_batch
from codescaler_jax.data.problems import humaneval_problems
from codescaler_jax.generate.sampler import SamplingConfig
from codescaler_jax.models.qwen3 import Qwen3ForCausalLM
from codescaler_jax.models.sharding import (
    MeshConfig,
    create_sharded,
    flat_param_shardings,
    logical_axes_of,
    logical_to_spec,
    make_mesh,
)
from codescaler_jax.rl.advantages import compute_advantages
from codescaler_jax.rl.rewards import CodeScalerReward, RolloutBatch
from codescaler_jax.rm.scorer import RewardScorer, load_rm
from codescaler_jax.rm.shaping import shape_rewards_jit
from codescaler_jax.training.report import per_device_bytes
from tests.tiny_rm import save_tiny_rm

MODES = ("softplus", "sigmoid", "raw", "raw_unguarded")


def _mesh8():
    return make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))


def _mesh1():
    return make_mesh(devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    return save_tiny_rm(tmp_path_factory.mktemp("colo_rm"), seed=3)


@pytest.fixture(scope="module")
def alone(rm_dir):
    """The standalone scorer: one device."""
    return RewardScorer.from_pretrained(rm_dir, mesh=_mesh1(), batch_size=4, max_length=512)


@pytest.fixture(scope="module")
def colo(rm_dir):
    """The co-located scorer: the 8-device policy mesh, data x fsdp x tensor = 2 x 2 x 2."""
    return RewardScorer.from_pretrained(rm_dir, mesh=_mesh8(), batch_size=8, max_length=512)


@functools.cache
def _batch():
    """Real prompts with real responses: correct and wrong solutions, code the training
    extractor rejects (no block, two blocks, a syntax error), and an empty answer."""
    probs = humaneval_problems()[:6]
    fence = lambda code: f"```python\n{code}\n```"  # noqa: E731
    rows = []
    for k, p in enumerate(probs):
        rows.append((p, "Here is my solution.\n" + fence(p.solution)))
        rows.append((p, fence(p.stub + "    return None\n")))
        rows.append((p, ["no code at all", fence("x = 1") + fence("y = 2"),
                         fence("def f(:\n    pass"), ""][k % 4]))
    return RolloutBatch([p for p, _ in rows], [r for _, r in rows], [[1]] * len(rows))


def _expected_specs(model, mesh):
    """The partition spec the policy's rules give each parameter of ``model`` on ``mesh``."""
    state = nnx.state(model, nnx.Param)
    return {path: logical_to_spec(logical_axes_of(v), v.get_value().shape, mesh)
            for path, v in nnx.to_flat_state(state)}


def _specs(model):
    state = nnx.state(model, nnx.Param)
    return {path: v.get_value().sharding.spec for path, v in nnx.to_flat_state(state)}


def test_rm_is_sharded_on_the_policy_mesh_by_the_policy_rules(rm_dir):
    mesh = _mesh8()
    rm, _, rm_mesh = load_rm(rm_dir, mesh=mesh)
    assert rm_mesh is mesh
    got, want = _specs(rm), _expected_specs(rm, mesh)
    assert got == want
    for path, v in nnx.to_flat_state(nnx.state(rm, nnx.Param)):
        assert v.get_value().sharding.mesh == mesh, path
    # Really split: the embedding over tensor (vocab) and fsdp (embed), attention heads over
    # tensor; the one KV head cannot split 2 ways and stays replicated.
    emb = got[("model", "embed_tokens", "embedding")]
    assert emb == jax.sharding.PartitionSpec("tensor", "fsdp")
    (q,) = [spec for path, spec in got.items() if "q_proj" in path]
    assert "tensor" in str(q) and "fsdp" in str(q)
    # The same parameter of a policy of the same architecture gets the same spec.
    policy = create_sharded(lambda: Qwen3ForCausalLM(rm.cfg, rngs=nnx.Rngs(0)), mesh)
    shared = set(got) & set(_specs(policy))
    assert len(shared) > 8
    assert {p: got[p] for p in shared} == {p: _specs(policy)[p] for p in shared}


def test_reference_params_are_sharded_like_the_policy():
    from codescaler_jax.config import load_config
    from codescaler_jax.rl.config import GRPOConfig
    from codescaler_jax.rl.trainer import GRPOTrainer

    cfg = load_config(GRPOConfig, "configs/grpo_tiny.yaml", [
        "algorithm.beta=0.05", "policy.num_hidden_layers=1", "policy.num_attention_heads=4",
        "policy.num_key_value_heads=2", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    mesh = make_mesh(cfg.mesh)
    mcfg = cfg.policy.sized_config(vocab_min=1000, pad_token_id=0, eos_token_id=1)
    model = create_sharded(lambda: Qwen3ForCausalLM(mcfg, rngs=nnx.Rngs(0)), mesh)
    want = flat_param_shardings(model, mesh)
    with jax.set_mesh(mesh):
        prog = GRPOTrainer(cfg).build_programs(model, mesh, SamplingConfig(max_new_tokens=8))
    ref = jax.tree_util.tree_leaves_with_path(prog.ref_params)
    pol = jax.tree_util.tree_leaves_with_path(prog.state["params"])
    assert len(ref) == len(pol) == len(want)
    for (kp, r), (_, p) in zip(ref, pol, strict=True):
        assert r.sharding == p.sharding, jax.tree_util.keystr(kp)
        np.testing.assert_array_equal(np.asarray(r), np.asarray(p))
        # a copy, not an alias (the train step donates the policy's buffers)
        ptr = lambda x: x.addressable_shards[0].data.unsafe_buffer_pointer()  # noqa: E731
        assert ptr(r) != ptr(p)
    assert {s.spec for s in want.values()} == {r.sharding.spec for _, r in ref}
    assert any("tensor" in str(r.sharding.spec) for _, r in ref)
    assert any("fsdp" in str(r.sharding.spec) for _, r in ref)


def test_colocated_rm_scores_the_same_as_the_standalone_scorer(alone, colo):
    batch = _batch()
    codes = [e.code or r for e, r in zip(extract_batch(batch.responses, mode="train"),
                                         batch.responses, strict=True)]
    prompts = [p.prompt for p in batch.problems]
    assert {k: v for k, v in colo.mesh.shape.items()} == {"data": 2, "fsdp": 2, "tensor": 2}
    ref = alone.score(prompts, codes)
    assert np.ptp(ref) > 0.1  # the inputs really get different scores
    np.testing.assert_allclose(colo.score(prompts, codes), ref, rtol=1e-5, atol=1e-5)
    # The on-device path: the same scores, placed at the given slots, never on the host.
    n = len(codes)
    slots = np.arange(n)[::-1].copy()
    with jax.transfer_guard_device_to_host("disallow"):
        dev = colo.score_ids_on_device(colo.encode(prompts, codes), slots, n + 3, fill=-7.0)
    assert dev.sharding.mesh == colo.mesh and dev.sharding.is_fully_replicated
    got = np.asarray(dev)
    np.testing.assert_allclose(got[slots], ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[n:], -7.0)


@pytest.mark.parametrize("mode", MODES)
def test_on_device_shaping_equals_the_host_shaping(alone, colo, mode):
    batch = _batch()
    ex = extract_batch(batch.responses, mode="train")
    valid = np.array([e.valid for e in ex])
    assert 0 < valid.sum() < len(valid)  # valid and invalid rows
    mesh = colo.mesh
    res = CodeScalerReward(colo, shaping=mode)(batch)
    # The host shaping of before: standalone scores (NaN where not scored -> 0) through
    # shape_rewards_jit on host numpy arrays; and the float64 formulas of each mode.
    todo = np.arange(len(ex)) if mode == "raw_unguarded" else np.flatnonzero(valid)
    scores = np.full(len(ex), np.nan, np.float32)
    scores[todo] = alone.score([batch.problems[i].prompt for i in todo],
                               [ex[i].code for i in todo])
    np.testing.assert_allclose(res.scores, scores, rtol=1e-5, atol=1e-5)  # NaN where unscored
    host = np.asarray(shape_rewards_jit(np.nan_to_num(scores, nan=0.0), valid, mode=mode))
    s = np.nan_to_num(scores, nan=0.0).astype(np.float64)
    f64 = {"softplus": np.where(valid, np.logaddexp(0.0, s), 0.0),
           "sigmoid": np.where(valid, 1 / (1 + np.exp(-s)), 0.0),
           "raw": np.where(valid, s, 0.0), "raw_unguarded": s}[mode]
    dev = res.device_rewards
    assert isinstance(dev, jax.Array) and dev.sharding.mesh == mesh
    np.testing.assert_allclose(np.asarray(dev), host, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dev), f64, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(res.rewards, np.asarray(dev))  # the host copy for logging
    if mode != "raw_unguarded":
        assert np.all(res.rewards[~valid] == 0) and np.isnan(res.scores[~valid]).all()


def test_scores_shaping_and_advantages_stay_on_device(colo):
    """RM scores -> shaping -> group advantages with no device-to-host transfer at all."""
    batch = _batch()
    ex = extract_batch(batch.responses, mode="train")
    valid = np.array([e.valid for e in ex])
    todo = np.flatnonzero(valid)
    scorer, mesh = colo, colo.mesh
    seqs = scorer.encode([batch.problems[i].prompt for i in todo], [ex[i].code for i in todo])
    adv_fn = jax.jit(compute_advantages, static_argnames=("num_generations",))
    with jax.transfer_guard_device_to_host("disallow"), jax.set_mesh(mesh):
        scores = scorer.score_ids_on_device(seqs, todo, len(ex))
        rewards = shape_rewards_jit(scores, valid, mode="softplus")
        adv = jax.block_until_ready(adv_fn(rewards, num_generations=3))
    host = CodeScalerReward(scorer)(batch).rewards
    want = np.asarray(compute_advantages(jax.numpy.asarray(host), num_generations=3))
    np.testing.assert_allclose(np.asarray(adv), want, rtol=1e-6, atol=1e-6)
    assert np.abs(want).max() > 0.1


# ---------------------------------------------------------------- dry run: memory by part
def _tiny_dry_cfg(*extra):
    from codescaler_jax.config import load_config
    from codescaler_jax.rl.config import GRPOConfig

    return load_config(GRPOConfig, "configs/grpo_tiny.yaml", [
        "policy.num_hidden_layers=1", "rollout.max_new_tokens=32", "data.max_prompt_length=64",
        "data.min_prompt_bucket=64", "reward.rm_max_length=128", *extra])


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_dry_run_memory_by_part_matches_the_real_arrays(beta):
    """The per-part figures come from abstract arrays and shardings (nothing compiled); they
    equal the per-device bytes of the real train state, reference copy and KV cache."""
    from codescaler_jax.models.sharding import tree_shardings
    from codescaler_jax.rl.trainer import GRPOTrainer
    from codescaler_jax.train_grpo import build_dry_run
    from codescaler_jax.training.dry_run import memory_by_part
    from codescaler_jax.training.report import local_target

    cfg = _tiny_dry_cfg(f"algorithm.beta={beta}", "mesh.fsdp=4", "mesh.tensor=2")
    info, specs = build_dry_run(cfg, local_target())
    parts = info["memory_by_part"]
    assert set(parts) == {"policy_params", "optimizer_state", "reward_model_params",
                          "reference_params", "kv_cache", "total"}
    mesh = make_mesh(cfg.mesh)
    mcfg = cfg.policy.sized_config(pad_token_id=0, eos_token_id=1)
    model = create_sharded(lambda: Qwen3ForCausalLM(mcfg, rngs=nnx.Rngs(0)), mesh)
    with jax.set_mesh(mesh):
        prog = GRPOTrainer(cfg).build_programs(model, mesh, SamplingConfig(max_new_tokens=32))
        rows = cfg.rollout.batch_size
        cache = jax.eval_shape(lambda: model.init_cache(rows, 64 + 32))
        cache = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                             cache, tree_shardings(cache, cache.logical_axes(), mesh))
    real = {
        "policy_params": per_device_bytes(prog.state["params"]),
        "optimizer_state": per_device_bytes(prog.state["opt_state"]),
        "reference_params": 0 if prog.ref_params is None else per_device_bytes(prog.ref_params),
        "kv_cache": per_device_bytes(cache),
    }
    for k, v in real.items():
        assert parts[k]["bytes"] == v, k
    assert parts["reference_params"]["bytes"] == (parts["policy_params"]["bytes"] if beta else 0)
    # The policy is split 8 ways except what the rules replicate (norms): well under 1/4 of it
    whole = 4 * sum(x.size for x in jax.tree.leaves(prog.state["params"]))
    assert whole / 8 <= parts["policy_params"]["bytes"] < whole / 4
    # The RM (the policy's architecture: runs/rm_tiny is absent) sharded the same way
    assert parts["reward_model_params"]["bytes"] > 0
    assert parts["total"]["bytes"] == sum(p["bytes"] for k, p in parts.items() if k != "total")
    assert memory_by_part(parts).startswith("memory by part (GiB per device): policy_params ")
    # Adam: two moments per parameter, plus a few scalars.
    assert 2 * real["policy_params"] <= real["optimizer_state"] < 2 * real["policy_params"] + 64


def test_dry_run_text_shows_the_memory_by_part():
    from codescaler_jax.training.dry_run import DryRun
    from codescaler_jax.training.report import local_target

    parts = {"policy_params": {"bytes": 2**30}, "kv_cache": {"bytes": 3 * 2**29}}
    text = DryRun({"memory_by_part": parts}, [], [], local_target()).text("t")
    assert "memory by part (GiB per device): policy_params 1, kv_cache 1.5" in text


def test_a_batch_without_valid_code_gets_zero_rewards_without_the_rm(colo):
    batch = _batch()
    keep = [i for i, e in enumerate(extract_batch(batch.responses, mode="train")) if not e.valid]
    bad = RolloutBatch([batch.problems[i] for i in keep], [batch.responses[i] for i in keep],
                       [[1]] * len(keep))
    res = CodeScalerReward(colo)(bad)
    np.testing.assert_array_equal(np.asarray(res.device_rewards), 0.0)
    assert np.isnan(res.scores).all() and len(res.rewards) == len(keep) > 0
