"""Reference-compatible bookkeeping: the KL between the sampler's and the learner's log-probs
of the sampled tokens, and ``algorithm.old_logprobs: sampler`` (the sampler's log-probs as the
old log-probs with one mini-batch), padded and packed."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from codescaler_jax.code.extract import extract_batch
from codescaler_jax.config import ConfigError, load_config
from codescaler_jax.generate.sampler import JaxSampler, SamplingConfig
from codescaler_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM
from codescaler_jax.models.sharding import MeshConfig, create_sharded, make_mesh
from codescaler_jax.rl.config import GRPOConfig
from codescaler_jax.rl.grpo import UpdateOptions, make_logprob_fn, sampler_learner_drift
from codescaler_jax.rl.rewards import REWARDS, RewardResult
from codescaler_jax.rl.trainer import build_update_batch
from codescaler_jax.training.state import split_model


def test_sampler_learner_kl_is_zero_for_the_same_policy_and_not_after_a_change():
    mesh = make_mesh(MeshConfig(fsdp=2, tensor=2), devices=jax.devices()[:4])
    cfg = Qwen3Config.tiny(vocab_size=64, num_hidden_layers=1, pad_token_id=0, eos_token_id=1)
    model = create_sharded(lambda: Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0)), mesh)
    scfg = SamplingConfig(max_new_tokens=12, temperature=0.7, top_k=16, top_p=0.9)
    sampler = JaxSampler(model, scfg, mesh=mesh, batch_size=8, max_prompt_len=8,
                         min_prompt_bucket=8)
    rng = np.random.RandomState(0)
    prompts = [rng.randint(2, 64, size=rng.randint(3, 9)).tolist() for _ in range(8)]
    graphdef, params, rest = split_model(model)
    with jax.set_mesh(mesh):
        out = sampler.generate(prompts, jax.random.key(1))
        n = int(out.lengths.max())
        host = build_update_batch(prompts, out, 0, (n,))
        drift = jax.jit(sampler_learner_drift)

        def learner(params, temperature):
            opts = UpdateOptions(temperature=temperature, logprob_chunk=4)
            logp, _ = jax.jit(make_logprob_fn(graphdef, rest, opts), static_argnums=(3,))(
                params, host["input_ids"], host["attention_mask"], n)
            d = drift(out.logprobs[:, :n], logp, host["response_mask"])
            return {k: float(v) for k, v in d.items()}

        same = learner(params, 0.7)
        # The learner at another temperature, or with other parameters than the sampler's.
        other_t = learner(params, 1.0)
        noise = jax.tree.map(lambda x: 0.5 * jnp.std(x) * jax.random.normal(
            jax.random.key(7), x.shape, x.dtype), params)
        stale = learner(jax.tree.map(jnp.add, params, noise), 0.7)
    assert out.lengths.sum() > 40  # enough sampled tokens
    assert 0 <= same["rollout/sampler_learner_kl"] < 1e-4
    assert abs(same["rollout/sampler_learner_kl_k1"]) < 1e-4
    assert same["rollout/sampler_learner_logp_abs_diff_max"] < 1e-3
    for d in (other_t, stale):
        assert d["rollout/sampler_learner_kl"] > 1e-3, d
        assert d["rollout/sampler_learner_logp_abs_diff_max"] > 0.05, d


def test_drift_formulas_on_known_values():
    s = jnp.log(jnp.array([[0.5, 0.25, 0.1]]))
    learner = jnp.log(jnp.array([[0.25, 0.25, 0.9]]))
    mask = jnp.array([[1, 1, 0]])
    d = sampler_learner_drift(s, learner, mask)
    r = np.array([0.5, 1.0])  # learner / sampler on the two response tokens
    np.testing.assert_allclose(d["rollout/sampler_learner_kl"], np.mean((r - 1) - np.log(r)),
                               rtol=1e-6)
    np.testing.assert_allclose(d["rollout/sampler_learner_kl_k1"], np.mean(-np.log(r)),
                               rtol=1e-6)
    np.testing.assert_allclose(d["rollout/sampler_learner_logp_abs_diff_max"], np.log(2),
                               rtol=1e-6)


def test_sampler_old_logprobs_needs_one_minibatch():
    with pytest.raises(ConfigError, match="algorithm.old_logprobs=sampler needs "
                                          "algorithm.num_minibatches=1"):
        load_config(GRPOConfig, "configs/grpo_tiny.yaml", ["algorithm.old_logprobs=sampler"])
    with pytest.raises(ConfigError, match="algorithm.old_logprobs"):
        load_config(GRPOConfig, "configs/grpo_tiny.yaml", ["algorithm.old_logprobs=vllm"])
    cfg = load_config(GRPOConfig, "configs/grpo_tiny.yaml", [
        "algorithm.old_logprobs=sampler", "algorithm.num_minibatches=1"])
    assert cfg.algorithm.old_logprobs == "sampler"
    assert load_config(GRPOConfig, "configs/grpo_tiny.yaml").algorithm.old_logprobs == "recompute"


# ---------------------------------------------------------------- the update, both ways


@REWARDS.register("test_bookkeeping_odd_tokens")
def _odd_tokens(section, mesh):
    """The fraction of odd token ids: different within a group without any code."""

    def fn(batch):
        r = np.array([np.mean(np.asarray(ids) % 2) for ids in batch.response_ids], np.float32)
        return RewardResult(r, extract_batch(batch.responses, mode="train"), None, None, {})

    return fn


def _cfg(*extra):
    return load_config(GRPOConfig, "configs/grpo_tiny.yaml", [
        "reward.name=test_bookkeeping_odd_tokens", "reward.pass_rate=false",
        "policy.hidden_size=32", "policy.intermediate_size=64", "policy.num_hidden_layers=1",
        "policy.num_attention_heads=2", "policy.num_key_value_heads=1",
        "data.max_prompt_length=256", "data.min_prompt_bucket=256", "data.max_problems=40",
        "rollout.num_prompts=2", "rollout.num_generations=4", "rollout.max_new_tokens=16",
        "rollout.batch_size=8", "rollout.min_response_bucket=16", "algorithm.micro_batches=1",
        "algorithm.logprob_chunk=8", "algorithm.num_minibatches=1", "algorithm.beta=0.01",
        # Adam's eps well above the gradients' rounding: its update is then smooth in them
        "optim.learning_rate=1e-2", "optim.warmup_steps=0", "optim.eps=1e-2", *extra])


@functools.cache
def _pieces():
    """Everything of a tiny GRPO run but the loop: one sampler, the programs of the padded
    and of the packed update, the starting state."""
    from codescaler_jax.data.tokenizer import load_tokenizer
    from codescaler_jax.generate.sampler import SAMPLERS
    from codescaler_jax.rl.rewards import build_reward
    from codescaler_jax.rl.trainer import GRPOTrainer

    cfg = _cfg()
    mesh = make_mesh(cfg.mesh)
    trainer = GRPOTrainer(cfg)
    tok = load_tokenizer(cfg.policy.tokenizer)
    problems, prompts = trainer.usable_prompts(tok)
    model = trainer.build_policy(mesh, tok)
    scfg = trainer.sampling_config(tok, model.cfg)
    sampler = SAMPLERS.get("jax")(model, scfg, mesh=mesh, batch_size=8, max_prompt_len=256,
                                  min_prompt_bucket=256)
    with jax.set_mesh(mesh):
        padded = trainer.build_programs(model, mesh, scfg)
        packed = GRPOTrainer(_cfg("algorithm.ppo_max_token_len_per_device=600")).build_programs(
            model, mesh, scfg)
    return dict(mesh=mesh, tok=tok, problems=problems, prompts=prompts, scfg=scfg,
                sampler=sampler, reward=build_reward(cfg.reward, mesh),
                progs={False: padded, True: packed})


def _step(old_logprobs, packed):
    from codescaler_jax.rl.trainer import RolloutStep

    p = _pieces()
    extra = ["algorithm.ppo_max_token_len_per_device=600"] if packed else []
    cfg = _cfg(f"algorithm.old_logprobs={old_logprobs}", *extra)
    prog = p["progs"][packed]
    step = RolloutStep(cfg, prog, p["sampler"], p["reward"], p["tok"], p["scfg"],
                       p["problems"], p["prompts"])
    state = jax.tree.map(jnp.copy, prog.state)  # the train step donates its state
    with jax.set_mesh(p["mesh"]):
        state, last, _, _ = step(state, np.array([3, 11]), jax.random.key(5))
        jax.block_until_ready(state)
    return jax.device_get(state["params"]), last


@pytest.mark.parametrize("packed", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["padded", "packed"])
def test_sampler_old_logprobs_give_the_recompute_update(packed):
    ref_params, ref = _step("recompute", packed)
    params, got = _step("sampler", packed)
    # The recompute path logs the drift (the same policy and temperature: ~0) and entropy;
    # the sampler path has no recompute pass, so neither.
    assert ref["rollout/sampler_learner_kl"] < 1e-4
    assert ref["rollout/sampler_learner_logp_abs_diff_max"] < 1e-3
    assert "entropy" in ref and "entropy" not in got
    assert "rollout/sampler_learner_kl" not in got
    assert ref["advantage/zero_fraction"] < 1  # a real update
    start = jax.device_get(_pieces()["progs"][packed].state["params"])
    moved = max(float(np.abs(a - b).max())
                for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(start)))
    assert moved > 1e-3
    for k in ("pg_loss", "approx_kl", "grad_norm", "kl", "clipfrac_high", "clipfrac_low"):
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-4, atol=1e-7, err_msg=k)
    diff = max(float(np.abs(a - b).max())
               for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)))
    assert diff < 1e-3 * moved, (diff, moved)
    # The update's own approx_kl (k3 of old vs current at the one update's start) is then the
    # sampler-learner drift, ~0 too.
    assert got["approx_kl"] < 1e-4
