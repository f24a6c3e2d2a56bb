"""RM training: exact gradient accumulation, exact resume, TensorBoard scalars, HF export parity."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from codescaler_jax.config import load_config
from codescaler_jax.data.pairs import Pair, read_pairs, write_pairs_jsonl
from codescaler_jax.models.qwen3 import Qwen3Config, Qwen3RewardModel
from codescaler_jax.models.sharding import MeshConfig, create_sharded, make_mesh
from codescaler_jax.rm.config import OptimSection, RMTrainConfig
from codescaler_jax.rm.train_step import (
    StepOptions,
    init_state,
    make_optimizer,
    make_schedule,
    make_train_step,
    split_model,
    state_shardings,
)
from codescaler_jax.rm.trainer import RMTrainer

TINY_OVERRIDES = [
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "model.num_hidden_layers=2",
    "model.num_attention_heads=2",
    "model.num_key_value_heads=1",
    "model.head_dim=16",
    "data.max_length=256",
    "data.min_bucket=128",
    "data.eval_fraction=0.25",
    "data.validation_fraction=0",  # held-out cadence checked here; validation: test_rm_splits
    "optim.warmup_steps=2",
    "optim.learning_rate=3e-3",
    "train.global_batch_size=8",
    "train.eval_batch_size=8",
    "train.max_steps=6",
    "train.eval_every=3",
    "train.save_every=2",
]


def _step_fn(accum, mesh):
    cfg = Qwen3Config.tiny()
    model = create_sharded(lambda: Qwen3RewardModel(cfg, rngs=nnx.Rngs(0)), mesh)
    graphdef, params, rest = split_model(model)
    optim = OptimSection(learning_rate=1e-2, warmup_steps=0, schedule="constant", eps=1e-3)
    sched = make_schedule(optim, 10)
    tx = make_optimizer(optim, sched)
    sh = state_shardings(model, tx, mesh)
    state = init_state(params, tx, sh)
    step = make_train_step(graphdef, rest, tx, sched, StepOptions(grad_accum_steps=accum))
    return jax.jit(step, out_shardings=(sh, None)), state


def _batch(b=8, L=24, seed=0):
    rng = np.random.default_rng(seed)
    lens_c = rng.integers(5, L + 1, size=b)
    lens_r = rng.integers(5, L + 1, size=b)
    out = {}
    for side, lens in (("chosen", lens_c), ("rejected", lens_r)):
        ids = rng.integers(2, 256, size=(b, L)).astype(np.int32)
        mask = (np.arange(L)[None] < lens[:, None]).astype(np.int32)
        out[f"{side}_ids"] = np.where(mask, ids, 0).astype(np.int32)
        out[f"{side}_mask"] = mask
    return out


@pytest.mark.slow  # CI time: the faster tests of this file cover the same path
def test_grad_accumulation_equals_one_big_batch():
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    batch = _batch()
    step1, s1 = _step_fn(1, mesh)
    step4, s4 = _step_fn(4, mesh)
    with jax.set_mesh(mesh):
        new1, m1 = step1(s1, batch)
        new4, m4 = step4(s4, batch)
        jax.block_until_ready((new1, new4))
    assert abs(float(m1["loss_sum"]) - float(m4["loss_sum"])) < 1e-5
    assert abs(float(m1["grad_norm"]) - float(m4["grad_norm"])) < 1e-6
    diffs = jax.tree.map(
        lambda a, b: float(jnp.max(jnp.abs(a - b))), new1["params"], new4["params"]
    )
    assert max(jax.tree.leaves(diffs)) < 1e-6
    # the update really moved the parameters (so the comparison is not vacuous)
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), s1["params"], new1["params"])
    assert max(jax.tree.leaves(moved)) > 1e-3


def test_same_step_on_one_and_eight_devices():
    batch = _batch(seed=1)
    results = []
    for mesh in (
        make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1]),
        make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)),
    ):
        step, state = _step_fn(2, mesh)
        with jax.set_mesh(mesh):
            new, m = step(state, batch)
            jax.block_until_ready(new)
            results.append((jax.device_get(new["params"]), float(m["loss_sum"])))
    assert abs(results[0][1] - results[1][1]) < 1e-5
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), results[0][0], results[1][0])
    assert max(jax.tree.leaves(diffs)) < 1e-5


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    from codescaler_jax.data.problems import humaneval_problems
    from codescaler_jax.data.verified import humaneval_candidates

    probs = humaneval_problems()[:24]
    cands = humaneval_candidates(probs, mutants_per_problem=3)
    pairs = [Pair(p.prompt, c[0], m, p.problem_id) for p, c in zip(probs, cands) for m in c[1:]]
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    write_pairs_jsonl(pairs, path)
    return path


def _cfg(run_dir, pairs_file, extra=()):
    return load_config(
        RMTrainConfig,
        "configs/rm_tiny.yaml",
        [f"run_dir={run_dir}", f"data.source={pairs_file}", *TINY_OVERRIDES, *extra],
    )


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, pairs_file):
    run_dir = tmp_path_factory.mktemp("full")
    trainer = RMTrainer(_cfg(run_dir, pairs_file), progress=False)
    summary = trainer.run()
    return run_dir, trainer, summary


class _Crash(Exception):
    pass


def test_resume_after_a_crash_is_exact(tmp_path, pairs_file, full_run):
    _, full, _ = full_run

    def crash(step, metrics):
        if step == 4:  # after the step-4 checkpoint (save_every=2)
            raise _Crash

    with pytest.raises(_Crash):
        RMTrainer(_cfg(tmp_path, pairs_file), progress=False, on_step=crash).run()
    assert (tmp_path / "checkpoints" / "4").is_dir()
    resumed = RMTrainer(_cfg(tmp_path, pairs_file), resume=True, progress=False)
    resumed.run()
    assert int(resumed.state["step"]) == int(full.state["step"]) == 6
    diffs = jax.tree.map(
        lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
        full.state["params"],
        resumed.state["params"],
    )
    assert max(jax.tree.leaves(diffs)) < 1e-6


def test_tensorboard_holds_every_scalar(full_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _, summary = full_run
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for name in (
        "loss",
        "accuracy",
        "margin",
        "chosen_mean",
        "chosen_std",
        "rejected_mean",
        "rejected_std",
        "learning_rate",
        "grad_norm",
        "tokens_per_s",
        "mfu",
        "time/step_s",
        "time/data_s",
    ):
        assert f"train/{name}" in tags, name
    for name in ("loss", "accuracy", "margin"):
        assert f"eval/{name}" in tags, name
    losses = acc.Scalars("train/loss")
    assert [e.step for e in losses] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(e.value) for e in losses)
    assert [e.step for e in acc.Scalars("eval/accuracy")] == [0, 3, 6]
    assert acc.Scalars("train/learning_rate")[1].value == pytest.approx(3e-3, rel=1e-5)
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 6
    assert summary["untrained_eval"]["step"] == 0


def test_exported_rm_scores_like_ours_in_transformers(full_run):
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        AutoTokenizer,
    )

    from codescaler_jax.data.tokenizer import encode_rm_inputs
    from codescaler_jax.rm.scorer import RewardScorer

    run_dir, trainer, _ = full_run
    held, _ = read_pairs(run_dir / "data" / "eval_pairs.jsonl")
    held = held[:6]
    problems = [p.problem for p in held] * 2
    codes = [p.chosen for p in held] + [p.rejected for p in held]
    ours = RewardScorer.from_pretrained(run_dir, max_length=256, batch_size=8).score(
        problems, codes
    )
    tok = AutoTokenizer.from_pretrained(run_dir / "hf")
    ids = encode_rm_inputs(tok, problems, codes, 256)
    pooling = json.loads((run_dir / "hf" / "config.json").read_text()).get(
        "codescaler_rm_pooling", "last")
    assert pooling == trainer.cfg.model.pooling or (pooling, trainer.cfg.model.pooling) == (
        "last", None)
    if pooling == "last":
        hf = AutoModelForSequenceClassification.from_pretrained(run_dir / "hf").eval()
        with torch.no_grad():
            theirs = np.array([hf(torch.tensor([x])).logits[0, 0].item() for x in ids])
    else:
        # A pooled RM is HF token classification: pool its per-token logits the same way.
        hf = AutoModelForTokenClassification.from_pretrained(run_dir / "hf").eval()
        with torch.no_grad():
            per = [hf(torch.tensor([x])).logits[0, :, 0].numpy() for x in ids]
        theirs = np.array([t.mean() if pooling == "mean" else 0.5 * (t.mean() + t[-1])
                           for t in per])
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    assert np.ptp(theirs) > 1e-3  # scores differ between inputs: a real comparison


def test_unknown_key_fails_fast(tmp_path):
    from codescaler_jax.config import ConfigError

    with pytest.raises(ConfigError, match="train.max_stepz"):
        load_config(RMTrainConfig, "configs/rm_tiny.yaml", ["train.max_stepz=3"])
    cfg = load_config(RMTrainConfig, "configs/rm_tiny.yaml", [])
    assert dataclasses.asdict(cfg)["data"]["source"] == "humaneval"


def test_score_cli_extracts_scores_and_shapes(full_run, tmp_path):
    from codescaler_jax.rm.scorer import RewardScorer
    from codescaler_jax.score import main as score_main

    run_dir, _, _ = full_run
    problem = "Write a function f that returns 1."
    recs = [
        {"problem": problem, "response": "Sure:\n```python\ndef f():\n    return 1\n```\nDone."},
        {"problem": problem, "response": "no code here"},
        {"problem": problem, "response": "```python\nx = 1\n```\n```python\ny = 2\n```"},
        {"problem": problem, "response": "```python\ndef f(:\n```"},
    ]
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(json.dumps(r) for r in recs) + "\n" + '{"problem": 3}\n')
    out = tmp_path / "out.jsonl"
    args = [
        "--rm",
        str(run_dir),
        "--input",
        str(inp),
        "--output",
        str(out),
        "--max-length",
        "256",
        "--batch-size",
        "8",
        "--no-progress",
    ]
    assert score_main(args) == 2  # the bad last line stops the run ...
    assert not out.exists()
    assert score_main([*args, "--skip-bad"]) == 0  # ... or is skipped and counted
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["valid"] for r in rows] == [True, False, False, False]
    assert [r["reason"] for r in rows] == ["ok", "no_block", "multiple_blocks", "syntax_error"]
    assert rows[0]["code"] == "def f():\n    return 1"
    assert all(r["code"] == "" and r["reward"] == 0.0 for r in rows[1:])
    scorer = RewardScorer.from_pretrained(run_dir, max_length=256, batch_size=8)
    expect = scorer.score([problem] * 2, [rows[0]["code"], ""])
    assert rows[0]["score"] == pytest.approx(float(expect[0]), abs=1e-5)
    assert rows[1]["score"] == pytest.approx(float(expect[1]), abs=1e-5)
    assert rows[0]["reward"] == pytest.approx(float(np.logaddexp(0.0, expect[0])), abs=1e-5)


def test_frozen_parameters_do_not_move_and_hold_no_optimizer_state():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    cfg = Qwen3Config.tiny()
    model = create_sharded(lambda: Qwen3RewardModel(cfg, rngs=nnx.Rngs(0)), mesh)
    graphdef, params, rest = split_model(model)
    optim = OptimSection(learning_rate=1e-2, warmup_steps=0, freeze=["model.embed_tokens"])
    sched = make_schedule(optim, 10)
    tx = make_optimizer(optim, sched)
    sh = state_shardings(model, tx, mesh)
    state = init_state(params, tx, sh)
    n_opt = sum(x.size for x in jax.tree.leaves(state["opt_state"]))
    n_embed = params["model"]["embed_tokens"]["embedding"].size
    n_params = sum(x.size for x in jax.tree.leaves(params))
    assert n_opt < 2 * (n_params - n_embed) + 16  # Adam moments only for trainable params
    step = jax.jit(
        make_train_step(graphdef, rest, tx, sched, StepOptions()), out_shardings=(sh, None)
    )
    with jax.set_mesh(mesh):
        new, _ = step(state, _batch(seed=2))
        jax.block_until_ready(new)
    before, after = (
        params["model"]["embed_tokens"]["embedding"],
        new["params"]["model"]["embed_tokens"]["embedding"],
    )
    np.testing.assert_array_equal(np.asarray(before), np.asarray(after))
    assert (
        float(jnp.max(jnp.abs(new["params"]["score"]["kernel"] - params["score"]["kernel"]))) > 1e-4
    )
