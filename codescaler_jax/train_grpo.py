"""GRPO with the CodeScaler reward: ``python -m codescaler_jax.train_grpo --config FILE``.

    python -m codescaler_jax.train_grpo --config configs/grpo_tiny.yaml
    python -m codescaler_jax.train_grpo --config configs/grpo_tiny.yaml --set train.steps=4
    python -m codescaler_jax.train_grpo --config configs/grpo_tiny.yaml --resume
    python -m codescaler_jax.train_grpo --config configs/grpo_codescaler_8b.yaml --dry-run

The loop: rollout (JAX sampler, KV cache) -> reward (registered by name; ``codescaler`` = shaped
RM score) -> group advantages -> clipped policy update. ``--dry-run`` builds the policy
abstractly, lowers and compiles the three device programs of a step (the decode loop, the
actor log-prob pass, the train step) for the configured mesh and shapes without loading weights
or data, and prints XLA's per-device memory and FLOPs for each.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from codescaler_jax.config import ConfigError, load_config


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m codescaler_jax.train_grpo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="YAML config (see configs/grpo_tiny.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.steps=4 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--dry-run", action="store_true",
                   help="compile the step's programs abstractly; print memory and FLOPs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def _compiled_report(compiled) -> dict:
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0] if cost else {}
    gib = lambda x: None if x is None else round(x / 2**30, 3)  # noqa: E731
    fields = {
        "arguments_gib": "argument_size_in_bytes",
        "outputs_gib": "output_size_in_bytes",
        "aliased_gib": "alias_size_in_bytes",
        "temporaries_gib": "temp_size_in_bytes",
    }
    out = {k: gib(getattr(mem, a, None)) for k, a in fields.items()}
    total = sum(getattr(mem, a, 0) or 0 for a in
                ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes"))
    out["total_gib"] = gib(total - (getattr(mem, "alias_size_in_bytes", 0) or 0))
    out["xla_flops_per_device"] = (cost or {}).get("flops")
    return out


def dry_run(cfg) -> dict:
    """Compile rollout, log-prob and update programs on abstract arrays; report memory/FLOPs."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from codescaler_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM
    from codescaler_jax.models.sharding import batch_sharding, make_mesh
    from codescaler_jax.rl.grpo import (
        BATCH_KEYS,
        UpdateOptions,
        make_logprob_fn,
        make_train_step,
        per_update_schedule,
    )
    from codescaler_jax.rl.sampler import JaxSampler, SamplingConfig
    from codescaler_jax.rl.trainer import policy_config
    from codescaler_jax.rm.config import compute_overrides
    from codescaler_jax.rm.train_step import (
        make_optimizer,
        make_schedule,
        split_model,
        state_shardings,
    )

    p, r, a = cfg.policy, cfg.rollout, cfg.algorithm
    if p.init_from and (Path(p.init_from) / "config.json").is_file():
        mcfg = Qwen3Config.from_hf(p.init_from)
        mcfg = dataclasses.replace(mcfg, **compute_overrides(p))
        source = f"{p.init_from}/config.json"
    else:
        mcfg = policy_config(cfg, vocab_min=0, pad_id=0, eos_id=1)
        source = f"policy.size={p.size}"
    mesh = make_mesh(cfg.mesh)
    abstract = nnx.eval_shape(lambda: Qwen3ForCausalLM(mcfg, rngs=nnx.Rngs(0)))
    rows = r.num_prompts * r.num_generations
    P, N = cfg.data.max_prompt_length, r.max_new_tokens
    report: dict = {
        "model_from": source, "mesh": dict(mesh.shape),
        "devices": f"{mesh.size} x {jax.devices()[0].device_kind}",
        "param_dtype": mcfg.param_dtype, "compute_dtype": mcfg.dtype, "remat": mcfg.remat,
        "attention": mcfg.attention,
        "scan_layers": mcfg.scan_layers,
        # XLA's cost analysis counts a while loop's body once (scanned layers, the decode
        # loop, micro-batches), so its FLOPs undercount those programs.
        "xla_flops_counts_loop_bodies_once": True,
        "responses_per_step": rows, "prompt_len": P, "response_len": N,
        "rollout_batch": min(r.batch_size, rows),
    }
    t0 = time.perf_counter()
    scfg = SamplingConfig(max_new_tokens=N, temperature=r.temperature, top_p=r.top_p,
                          top_k=r.top_k, eos_token_ids=(1,), prefill_chunk=r.prefill_chunk)
    sampler = JaxSampler(abstract, scfg, mesh=mesh, batch_size=min(r.batch_size, rows),
                         max_prompt_len=P, min_prompt_bucket=cfg.data.min_prompt_bucket)
    report["rollout_decode_loop"] = _compiled_report(sampler.lower(P).compile())

    opts = UpdateOptions(loss=a.loss_config(), num_minibatches=a.num_minibatches,
                         micro_batches=a.micro_batches, temperature=scfg.logprob_temperature,
                         logprob_chunk=a.logprob_chunk)
    with jax.set_mesh(mesh):
        graphdef, params, rest = split_model(abstract)
        schedule = make_schedule(cfg.optim, cfg.train.steps)
        tx = make_optimizer(cfg.optim, per_update_schedule(schedule, a.num_minibatches))
        sh = state_shardings(abstract, tx, mesh)
        sds = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
        a_state = {
            "params": jax.tree.map(sds, params, sh["params"]),
            "opt_state": jax.tree.map(sds, jax.eval_shape(tx.init, params), sh["opt_state"]),
            "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=sh["step"]),
        }
        bs = batch_sharding(mesh)
        shapes = {"input_ids": ((rows, P + N), jnp.int32),
                  "attention_mask": ((rows, P + N), jnp.int32),
                  "response_mask": ((rows, N), jnp.int32), "advantages": ((rows,), jnp.float32),
                  "old_logp": ((rows, N), jnp.float32)}
        if a.beta > 0:
            shapes["ref_logp"] = ((rows, N), jnp.float32)
        a_batch = {k: jax.ShapeDtypeStruct(s, d, sharding=bs) for k, (s, d) in shapes.items()}
        assert set(BATCH_KEYS) <= set(a_batch)
        logprob = jax.jit(make_logprob_fn(graphdef, rest, opts), static_argnums=(3,))
        report["actor_logprobs"] = _compiled_report(
            logprob.lower(a_state["params"], a_batch["input_ids"], a_batch["attention_mask"],
                          N).compile())
        step = jax.jit(make_train_step(graphdef, rest, tx, schedule, opts),
                       out_shardings=(sh, None), donate_argnums=(0,))
        report["train_step"] = _compiled_report(step.lower(a_state, a_batch).compile())
    report["params"] = int(sum(x.size for x in jax.tree.leaves(params)))
    report["compile_s"] = round(time.perf_counter() - t0, 1)
    return report


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    from codescaler_jax.rl.config import GRPOConfig

    try:
        cfg = load_config(GRPOConfig, args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(json.dumps(dry_run(cfg), indent=2))
        return 0

    from codescaler_jax.logging_utils import setup_logging
    from codescaler_jax.rl.trainer import GRPOTrainer

    log = setup_logging(cfg.run_dir)
    log.info("run directory: %s", Path(cfg.run_dir).absolute())
    try:
        summary = GRPOTrainer(cfg, resume=args.resume, progress=not args.no_progress).run()
    except FileNotFoundError as e:
        log.error("%s", e)
        return 1
    hist = summary["history"]
    if hist:
        log.info("reward mean: first step %.4f -> last step %.4f (%d steps run)",
                 hist[0]["reward_mean"], hist[-1]["reward_mean"], summary["steps_run"])
    log.info("time per step: %s", {k: round(v, 2) for k, v in summary["time_per_phase_s"].items()})
    log.info("done in %.1f s; summary at %s/summary.json", summary["wall_s"], cfg.run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
