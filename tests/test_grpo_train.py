"""The GRPO update and loop: exact micro-batching, 1 vs 8 devices, learning a synthetic reward,
kill-and-resume exactness, the CLI, HF export of the policy.

Loss maths and advantages are tested in test_grpo_loss.py / test_grpo_advantages.py; here the
references are a plain full-logits computation of the same loss and the un-split run.
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from codescaler_jax.code.extract import extract_batch
from codescaler_jax.data.tokenizer import load_tokenizer
from codescaler_jax.generate.sampler import JaxSampler, SamplingConfig
from codescaler_jax.models.hf_io import load_hf_model, save_hf_model
from codescaler_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM, Qwen3RewardModel
from codescaler_jax.models.sharding import MeshConfig, batch_sharding, create_sharded, make_mesh
from codescaler_jax.rl.advantages import compute_advantages
from codescaler_jax.rl.config import GRPOConfig, GRPOOptimSection, RewardSection
from codescaler_jax.rl.grpo import (
    UpdateOptions,
    make_logprob_fn,
    make_minibatch_grads,
    make_train_step,
    per_update_schedule,
)
from codescaler_jax.rl.losses import PolicyLossConfig, policy_loss
from codescaler_jax.rl.rewards import REWARDS, RewardResult, RolloutBatch, build_reward
from codescaler_jax.rl.trainer import GRPOTrainer, build_update_batch
from codescaler_jax.rm.train_step import (
    init_state,
    make_optimizer,
    make_schedule,
    split_model,
    state_shardings,
)

P, N, B = 6, 10, 8


def _mesh(devices=1, **axes):
    return make_mesh(MeshConfig(**axes) if axes else MeshConfig(), devices=jax.devices()[:devices])


def _model(mesh, vocab=64, seed=0, layers=1):
    cfg = Qwen3Config.tiny(vocab_size=vocab, num_hidden_layers=layers, pad_token_id=0,
                           eos_token_id=1)
    return create_sharded(lambda: Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(seed)), mesh)


def _batch(seed=0, vocab=64, beta=False):
    """A random update batch: left-padded prompts, right-padded responses of varied lengths,
    advantages of both signs, and old log-probs off by noise so that clipping happens."""
    rng = np.random.RandomState(seed)
    p_len = rng.randint(2, P + 1, size=B)
    r_len = rng.randint(1, N + 1, size=B)
    p_mask = (np.arange(P)[None] >= P - p_len[:, None]).astype(np.int32)
    r_mask = (np.arange(N)[None] < r_len[:, None]).astype(np.int32)
    ids = rng.randint(2, vocab, size=(B, P + N)).astype(np.int32)
    mask = np.concatenate([p_mask, r_mask], 1)
    batch = {
        "input_ids": np.where(mask == 1, ids, 0).astype(np.int32),
        "attention_mask": mask,
        "response_mask": r_mask,
        "advantages": rng.randn(B).astype(np.float32),
        "old_logp": (np.log(1 / vocab) + 0.3 * rng.randn(B, N)).astype(np.float32),
    }
    if beta:
        batch["ref_logp"] = (np.log(1 / vocab) + 0.3 * rng.randn(B, N)).astype(np.float32)
    return batch


def _reference_loss(model, batch, cfg, temperature):
    """The mini-batch loss from full logits (no chunking, no splitting, local denominator)."""
    logits = model(batch["input_ids"], batch["attention_mask"])[:, P - 1 : -1] / temperature
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), batch["input_ids"][:, P:, None],
                               -1)[..., 0]
    return policy_loss(logp, batch["old_logp"], batch["advantages"], batch["response_mask"],
                       cfg=cfg, ref_logp=batch.get("ref_logp"))[0]


@pytest.mark.parametrize(
    "mode,beta",
    [("token-mean", 0.0), pytest.param("seq-mean-token-mean", 0.1, marks=pytest.mark.slow)],
)
def test_micro_batches_give_the_full_batch_gradient(mode, beta):
    mesh = _mesh()
    model = _model(mesh)
    cfg = PolicyLossConfig(loss_agg_mode=mode, beta=beta)
    batch = {k: jnp.asarray(v) for k, v in _batch(1, beta=beta > 0).items()}
    graphdef, params, rest = split_model(model)
    ref_grad = nnx.jit(nnx.grad(lambda m: _reference_loss(m, batch, cfg, 0.7)))
    ref = nnx.to_pure_dict(ref_grad(model))
    norm = optax_norm(ref)
    assert norm > 1e-3  # a real gradient
    for micro, chunk in ((1, None), (4, 3)):
        opts = UpdateOptions(loss=cfg, micro_batches=micro, temperature=0.7, logprob_chunk=chunk)
        grads, metrics = jax.jit(make_minibatch_grads(graphdef, rest, opts))(params, batch)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6 * max(norm, 1)),
                     grads, ref)
        assert float(metrics["clipfrac_high"].value + metrics["clipfrac_low"].value) > 0


def optax_norm(tree):
    return float(jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(tree))))


def _step_on(mesh, batch, opts):
    """One full train step (2 mini-batch updates) on ``mesh``; returns (params, metrics)."""
    model = _model(mesh, seed=3)
    optim = GRPOOptimSection(learning_rate=1e-2, warmup_steps=0, eps=1e-2)
    with jax.set_mesh(mesh):
        graphdef, params, rest = split_model(model)
        schedule = make_schedule(optim, 10)
        tx = make_optimizer(optim, per_update_schedule(schedule, opts.num_minibatches))
        shardings = state_shardings(model, tx, mesh)
        state = init_state(params, tx, shardings)
        step = jax.jit(make_train_step(graphdef, rest, tx, schedule, opts),
                       out_shardings=(shardings, None))
        data = {k: jax.device_put(v, batch_sharding(mesh)) for k, v in batch.items()}
        state, metrics = step(state, data)
        jax.block_until_ready(state)
    return jax.device_get(state["params"]), jax.device_get(metrics), state["params"]


def test_train_step_is_the_same_on_one_and_eight_devices():
    batch = _batch(2)
    opts = UpdateOptions(micro_batches=2, temperature=0.6, logprob_chunk=4)
    p1, m1, _ = _step_on(_mesh(), batch, opts)
    p8, m8, sharded = _step_on(_mesh(8, data=2, fsdp=2, tensor=2), batch, opts)
    # The 8-device run is really sharded (heads over tensor, embed over fsdp).
    q = sharded["model"]["layers"][0]["self_attn"]["q_proj"]["kernel"]
    assert len({str(s.index) for s in q.addressable_shards}) > 1
    init = jax.device_get(split_model(_model(_mesh(), seed=3))[1])
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), p1, init)
    assert max(jax.tree.leaves(moved)) > 1e-3  # the step changed the parameters
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6), p8, p1)
    for k in m1:
        np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_policy_learns_a_synthetic_reward():
    """Reward = fraction of response tokens equal to TARGET: GRPO must raise it from chance
    (1/32) to a majority within 12 steps."""
    vocab, target, groups, gens, new = 32, 7, 8, 4, 16
    mesh = _mesh()
    model = _model(mesh, vocab=vocab)
    reward_fn = build_reward(RewardSection(name="token_fraction", kwargs={"token_id": target}),
                             mesh)
    sampler = JaxSampler(model, SamplingConfig(max_new_tokens=new, pad_token_id=0), mesh=mesh,
                         batch_size=groups * gens, max_prompt_len=8, min_prompt_bucket=8)
    rng = np.random.RandomState(0)
    prompts = [rng.randint(2, vocab, size=rng.randint(3, 9)).tolist() for _ in range(groups)]
    rows = [p for p in prompts for _ in range(gens)]
    optim = GRPOOptimSection(learning_rate=3e-3, warmup_steps=0)
    opts = UpdateOptions(num_minibatches=2)
    means = []
    with jax.set_mesh(mesh):
        graphdef, params, rest = split_model(model)
        schedule = make_schedule(optim, 100)
        tx = make_optimizer(optim, per_update_schedule(schedule, 2))
        state = init_state(params, tx, state_shardings(model, tx, mesh))
        step = jax.jit(make_train_step(graphdef, rest, tx, schedule, opts), donate_argnums=(0,))
        logprobs = jax.jit(make_logprob_fn(graphdef, rest, opts), static_argnums=(3,))
        for s in range(12):
            sampler.load_params(state["params"])
            out = sampler.generate(rows, jax.random.fold_in(jax.random.key(0), s))
            ids = [list(t[:n]) for t, n in zip(out.tokens, out.lengths)]
            res = reward_fn(RolloutBatch([None] * len(rows), [""] * len(rows), ids))
            means.append(float(res.rewards.mean()))
            batch = {k: jnp.asarray(v) for k, v in build_update_batch(rows, out, 0, (new,)).items()}
            batch["advantages"] = compute_advantages(jnp.asarray(res.rewards),
                                                     num_generations=gens)
            batch["old_logp"] = logprobs(state["params"], batch["input_ids"],
                                         batch["attention_mask"], new)[0]
            state, _ = step(state, batch)
    assert means[0] < 0.1
    assert min(means[-2:]) > 0.5, means


# ---- the loop: trainer, CLI, resume ----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_rm_dir(tmp_path_factory):
    """A random tiny RM with the Qwen3 tokenizer, written with our own HF export."""
    from codescaler_jax.data.tokenizer import qwen3_tokenizer_dir

    cfg = Qwen3Config.tiny(vocab_size=151936, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                           pad_token_id=151643, eos_token_id=151645)
    path = tmp_path_factory.mktemp("rm")
    save_hf_model(Qwen3RewardModel(cfg, rngs=nnx.Rngs(0)), path,
                  tokenizer_dir=qwen3_tokenizer_dir())
    return path


@REWARDS.register("test_odd_tokens")
def _odd_tokens(section, mesh):
    """A reward the trainer has never heard of (registered here): the fraction of odd token
    ids, which differs between the responses of a group even when none holds code."""

    def fn(batch):
        r = np.array([np.mean(np.asarray(ids) % 2) for ids in batch.response_ids], np.float32)
        ex = extract_batch(batch.responses, mode="train")
        return RewardResult(r, ex, None, None, {})

    return fn


def _loop_overrides(run_dir, rm_dir, steps):
    # beta > 0: a frozen reference policy is held (and rebuilt, not restored, on resume).
    # A mix of the CodeScaler RM reward (constant within a group for a random policy, which
    # writes no code: the RM sees an empty answer) and a registered token-level reward, so
    # that every step has non-zero advantages and really updates the policy.
    return [
        f"run_dir={run_dir}", f"reward.rm_path={rm_dir}", "reward.name=mix",
        "reward.kwargs={weights: {codescaler: 1.0, test_odd_tokens: 1.0}}",
        "reward.pass_rate=false", "reward.rm_max_length=128", "reward.rm_batch_size=8",
        "policy.hidden_size=32", "policy.intermediate_size=64", "policy.num_hidden_layers=1",
        "policy.num_attention_heads=2", "policy.num_key_value_heads=1",
        "data.max_prompt_length=256", "data.min_prompt_bucket=256", "data.max_problems=40",
        "rollout.num_prompts=2", "rollout.num_generations=4", "rollout.max_new_tokens=16",
        "rollout.batch_size=8", "rollout.min_response_bucket=16", "algorithm.micro_batches=2",
        "algorithm.logprob_chunk=8", "algorithm.beta=0.01", f"train.steps={steps}",
        "train.save_every=2", "train.samples_every=2", "optim.learning_rate=1e-2",
        "optim.warmup_steps=1",
    ]


def _cfg(overrides):
    from codescaler_jax.config import load_config

    return load_config(GRPOConfig, "configs/grpo_tiny.yaml", overrides)


def test_kill_and_resume_continues_exactly(tmp_path, tiny_rm_dir):
    mesh = _mesh()
    full_run = GRPOTrainer(_cfg(_loop_overrides(tmp_path / "full", tiny_rm_dir, 4)),
                           progress=False, mesh=mesh)
    full = full_run.run()
    # A job killed right after its step-2 checkpoint leaves what the full run had on disk
    # then: the same directory without the later checkpoint, export and summary.
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    for later in ("checkpoints/4", "hf", "summary.json"):
        path = tmp_path / "cut" / later
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    resumed = GRPOTrainer(_cfg(_loop_overrides(tmp_path / "cut", tiny_rm_dir, 4)),
                          resume=True, progress=False, mesh=mesh)
    second = resumed.run()
    assert second["first_step"] == 2 and second["steps_run"] == 2

    assert second["history"] == full["history"]  # same prompts, samples and rewards
    assert full["last"]["advantage/zero_fraction"] < 1
    final = jax.device_get(resumed.state["params"])
    jax.tree.map(np.testing.assert_array_equal, final, jax.device_get(full_run.state["params"]))
    # The policy moved, and the HF export holds the final parameters.
    start = jax.device_get(split_model(full_run.build_policy(mesh, load_tokenizer("qwen3")))[1])
    moved = [float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(final),
                                                        jax.tree.leaves(start))]
    assert max(moved) > 1e-3
    # The export is layout-free HF tensors; load it in the run's (tiny: unrolled) layout.
    exported = load_hf_model(tmp_path / "cut" / "hf", Qwen3ForCausalLM, scan_layers=False)
    exported = jax.device_get(nnx.to_pure_dict(nnx.state(exported, nnx.Param)))
    jax.tree.map(np.testing.assert_array_equal, exported, final)
    for name in ("reward/mean", "reward/std", "valid_code_fraction", "response_length/mean",
                 "clip_fraction", "approx_kl", "entropy", "grad_norm", "learning_rate",
                 "time/rollout_s", "time/reward_s", "time/update_s", "rollout/tokens_per_s",
                 "codescaler/reward_mean", "test_odd_tokens/reward_mean", "kl", "kl_loss",
                 "rollout/sampler_learner_kl", "rollout/sampler_learner_logp_abs_diff_max"):
        assert name in full["last"], name
    # The sampler's log-probs against the learner's recomputed ones, per step: the same
    # parameters and temperature, so ~0 (tests/test_grpo_bookkeeping.py: non-zero otherwise).
    kls = [h["sampler_learner_kl"] for h in full["history"]]
    assert len(kls) == 4 and all(0 <= k < 1e-4 for k in kls), kls


@pytest.mark.slow
def test_cli_runs_the_tiny_config_on_eight_devices(tmp_path, tiny_rm_dir):
    """``python -m codescaler_jax.train_grpo`` end to end: 8-way fsdp mesh, sandbox pass rate,
    TensorBoard scalars and rollout text, checkpoints, HF export."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from codescaler_jax.train_grpo import main

    over = [o for o in _loop_overrides(tmp_path, tiny_rm_dir, 2) if "pass_rate" not in o]
    assert main(["--config", "configs/grpo_tiny.yaml", "--no-progress",
                 *[a for o in over for a in ("--set", o)]]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps_run"] == 2 and "pass_rate" in summary["last"]
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert {"train/reward/mean", "train/pass_rate", "train/time/update_s",
            "train/rollout/sampler_learner_kl"} <= set(acc.Tags()["scalars"])
    assert acc.Tags()["tensors"]  # rollout text samples
    assert (tmp_path / "hf" / "config.json").is_file()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]


def test_missing_reward_model_says_how_to_make_one(tmp_path):
    from codescaler_jax.rl.rewards import load_scorer

    with pytest.raises(FileNotFoundError, match="train_rm"):
        load_scorer(RewardSection(rm_path=str(tmp_path / "nope")), _mesh())


def test_config_validation_names_the_key():
    from codescaler_jax.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="num_minibatches"):
        load_config(GRPOConfig, "configs/grpo_tiny.yaml", ["algorithm.num_minibatches=3"])
    with pytest.raises(ConfigError, match="loss_agg_mode"):
        load_config(GRPOConfig, "configs/grpo_tiny.yaml", ["algorithm.loss_agg_mode=mean"])
    with pytest.raises(ConfigError, match="reward.name"):
        load_config(GRPOConfig, "configs/grpo_tiny.yaml", ["reward.name=exec"])
    with pytest.raises(ConfigError, match="rollout.engine"):
        load_config(GRPOConfig, "configs/grpo_tiny.yaml", ["rollout.engine=vllm"])
    with pytest.raises(ConfigError, match="rollout.nope"):
        load_config(GRPOConfig, "configs/grpo_tiny.yaml", ["rollout.nope=1"])


@pytest.mark.slow  # CI time: the faster tests of this file cover the same path
def test_dry_run_compiles_rollout_logprob_and_update():
    from codescaler_jax.train_grpo import dry_run

    cfg = _cfg(["policy.num_hidden_layers=1", "rollout.max_new_tokens=32",
                "data.max_prompt_length=64", "data.min_prompt_bucket=64"])
    report = dry_run(cfg)
    for program in ("rollout_decode_loop", "actor_logprobs", "train_step"):
        assert report[program]["total_gib"] > 0 and report[program]["xla_flops_per_device"] > 0
    assert report["responses_per_step"] == 16 and report["response_len"] == 32
    # The train step does more arithmetic than the log-prob pass over the same rows.
    assert (report["train_step"]["xla_flops_per_device"]
            > report["actor_logprobs"]["xla_flops_per_device"])


@pytest.mark.slow
def test_dry_run_of_the_8b_recipe():
    from codescaler_jax.config import load_config
    from codescaler_jax.train_grpo import dry_run

    report = dry_run(load_config(GRPOConfig, "configs/grpo_codescaler_8b.yaml"))
    assert report["params"] == 8_190_735_360  # Qwen3-8B, untied head
    assert report["responses_per_step"] == 1024 and report["response_len"] == 16384
