"""The SFT loop: token-mean negative log-likelihood of the response tokens, nothing else.

``train_sft(cfg)`` does what ``python -m codescaler_jax.train_sft`` does: claim the run
directory, build the examples (``sft/data.py``), build the policy (random init of
``policy.size`` or ``policy.init_from``), train ``train.steps`` steps, and write:

- ``config.yaml``; ``tb/`` (TensorBoard: loss, learning rate, grad norm, tokens/s);
- ``checkpoints/`` (Orbax: the final train state); ``hf/`` (the policy in Hugging Face
  format: what ``policy.init_from`` of ``configs/grpo_tiny.yaml`` points at);
- ``data/examples.jsonl`` (the examples' text) and ``data/problems.jsonl`` (the problems they
  come from: GRPO's ``data.source``);
- ``summary.json`` (loss curve, data statistics, wall time).

The shared pieces are GRPO's and the RM's: the optimizer and schedule, the sharded train
state, the run-directory rules and the log-prob pass of the GRPO update
(``rl.grpo.response_token_stats``, the same batch layout: left-padded prompt then
right-padded response), so the warm start is trained on exactly what GRPO later samples.
Deterministic for a seed (data, init, shuffling).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from codescaler_jax.config import save_config, to_dict
from codescaler_jax.data.tokenizer import load_tokenizer, resolve_tokenizer_path
from codescaler_jax.generate.sampler import left_pad
from codescaler_jax.logging_utils import Writer
from codescaler_jax.models.config import compute_overrides
from codescaler_jax.models.qwen3 import Qwen3ForCausalLM
from codescaler_jax.models.sharding import batch_sharding, create_sharded, make_mesh
from codescaler_jax.rl.grpo import response_token_stats
from codescaler_jax.sft.config import SFTConfig
from codescaler_jax.sft.data import SFTExample, build_examples, write_examples, write_problems
from codescaler_jax.training.checkpoint import RunCheckpoints
from codescaler_jax.training.optim import make_optimizer, make_schedule
from codescaler_jax.training.run_dir import SFT_RESUME, claim_run_dir
from codescaler_jax.training.state import init_state, split_model, state_shardings

log = logging.getLogger("codescaler_jax")

def build_policy(cfg: SFTConfig, tokenizer, mesh) -> Qwen3ForCausalLM:
    """The policy to fine-tune: ``policy.init_from`` or a seeded random init."""
    from codescaler_jax.rl.config import GRPOConfig
    from codescaler_jax.rl.trainer import policy_config

    p = cfg.policy
    if p.init_from:
        from codescaler_jax.models.hf_io import load_hf_model

        return load_hf_model(p.init_from, Qwen3ForCausalLM, mesh=mesh, **compute_overrides(p))
    mcfg = policy_config(GRPOConfig(policy=p), len(tokenizer), tokenizer.pad_token_id,
                         tokenizer.eos_token_id)
    return create_sharded(lambda: Qwen3ForCausalLM(mcfg, rngs=nnx.Rngs(cfg.train.seed)), mesh)


def batch_arrays(examples: list[SFTExample], prompt_len: int, response_len: int,
                 pad_id: int) -> dict[str, np.ndarray]:
    """``input_ids``/``attention_mask [B, P + N]`` and ``response_mask [B, N]``: the layout of
    ``rl.trainer.build_update_batch`` (prompt left-padded to P, response right-padded to N)."""
    p_ids, p_mask = left_pad([e.prompt_ids for e in examples], prompt_len, pad_id)
    r_ids = np.full((len(examples), response_len), pad_id, np.int32)
    r_mask = np.zeros((len(examples), response_len), np.int32)
    for i, e in enumerate(examples):
        r_ids[i, : len(e.response_ids)] = e.response_ids
        r_mask[i, : len(e.response_ids)] = 1
    return {"input_ids": np.concatenate([p_ids, r_ids], 1),
            "attention_mask": np.concatenate([p_mask, r_mask], 1), "response_mask": r_mask}


def make_sft_step(graphdef: nnx.GraphDef, rest: nnx.State, tx: optax.GradientTransformation,
                  schedule: optax.Schedule, chunk: int | None):
    """``step(state, batch) -> (state, metrics)``: one AdamW update on the token-mean NLL."""

    def loss_fn(params, batch):
        model = nnx.merge(graphdef, params, rest)
        n = batch["response_mask"].shape[1]
        logp, _ = response_token_stats(model, batch["input_ids"], batch["attention_mask"], n,
                                       chunk=chunk)
        m = batch["response_mask"].astype(jnp.float32)
        return -(logp * m).sum() / jnp.maximum(m.sum(), 1.0)

    def step(state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], batch)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
                   "learning_rate": schedule(state["step"])}
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    return step


def epoch_order(n: int, steps: int, batch_size: int, seed: int) -> list[np.ndarray]:
    """Example indices of each step: a fresh seeded permutation per epoch, the last partial
    batch of an epoch topped up from the next one (every batch is full: one shape)."""
    order: list[int] = []
    epoch = 0
    while len(order) < steps * batch_size:
        order.extend(np.random.default_rng([seed, epoch]).permutation(n).tolist())
        epoch += 1
    return [np.asarray(order[s * batch_size : (s + 1) * batch_size]) for s in range(steps)]


def train_sft(cfg: SFTConfig, *, overwrite: bool = False, progress: bool = True,
              mesh: Mesh | None = None) -> dict[str, Any]:
    """Run SFT as configured; returns the summary (also written to ``summary.json``).
    ``mesh``: run on this mesh instead of ``make_mesh(cfg.mesh)`` over all devices."""
    t_start = time.perf_counter()
    run_dir = Path(cfg.run_dir)
    claim_run_dir(run_dir, cfg, resume=False, overwrite=overwrite, policy=SFT_RESUME)
    save_config(cfg, run_dir / "config.yaml")
    tokenizer = load_tokenizer(cfg.policy.tokenizer)
    examples, used, stats = build_examples(cfg.data, tokenizer, seed=cfg.train.seed,
                                           progress=progress)
    if not examples:
        raise ValueError("no SFT examples: every response is longer than "
                         f"data.max_response_tokens={cfg.data.max_response_tokens}")
    write_examples(examples, run_dir / "data" / "examples.jsonl")
    write_problems(used, run_dir / "data" / "problems.jsonl")
    log.info("SFT data: %s", stats)
    prompt_len = -(-stats["max_prompt_tokens"] // 64) * 64
    response_len = cfg.data.max_response_tokens
    mesh = mesh if mesh is not None else make_mesh(cfg.mesh)
    pad_id = int(tokenizer.pad_token_id)
    writer = Writer(run_dir / "tb")
    history: list[dict[str, float]] = []
    model = build_policy(cfg, tokenizer, mesh)
    with jax.set_mesh(mesh):
        graphdef, params, rest = split_model(model)
        schedule = make_schedule(cfg.optim, cfg.train.steps)
        tx = make_optimizer(cfg.optim, schedule)
        shardings = state_shardings(model, tx, mesh)
        del model
        state = init_state(params, tx, shardings)
        step_fn = jax.jit(make_sft_step(graphdef, rest, tx, schedule, cfg.train.logprob_chunk),
                          out_shardings=(shardings, None), donate_argnums=(0,))
        data_sharding = batch_sharding(mesh)
        batches = epoch_order(len(examples), cfg.train.steps, cfg.train.batch_size,
                              cfg.train.seed)
        t_loop = time.perf_counter()
        for s, idx in enumerate(batches):
            host = batch_arrays([examples[i] for i in idx], prompt_len, response_len, pad_id)
            batch = {k: jax.device_put(v, data_sharding) for k, v in host.items()}
            state, metrics = step_fn(state, batch)
            done = s + 1
            if done % cfg.train.log_every == 0 or done == cfg.train.steps:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                m["response_tokens_per_s"] = (
                    host["response_mask"].sum() * cfg.train.log_every
                    / max(time.perf_counter() - t_loop, 1e-9))
                t_loop = time.perf_counter()
                writer.scalars(done, m, "train/")
                history.append({"step": done, "loss": m["loss"]})
                if progress:
                    log.info("sft step %d/%d loss %.4f", done, cfg.train.steps, m["loss"])
        writer.close()
        with RunCheckpoints(run_dir, keep=1) as ckpt:  # finished and closed on every way out
            ckpt.save(cfg.train.steps, state, {"step": cfg.train.steps})
        if cfg.train.export_hf:
            from codescaler_jax.models.hf_io import save_hf_model

            save_hf_model(nnx.merge(graphdef, state["params"], rest), run_dir / "hf",
                          tokenizer_dir=resolve_tokenizer_path(cfg.policy.tokenizer))
    summary = {"steps": cfg.train.steps, "history": history, "data": stats,
               "final_loss": history[-1]["loss"] if history else None,
               "prompt_len": prompt_len, "response_len": response_len,
               "wall_s": time.perf_counter() - t_start, "config": to_dict(cfg)}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
