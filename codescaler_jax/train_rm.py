"""Train a CodeScaler reward model: ``python -m codescaler_jax.train_rm --config FILE``.

    python -m codescaler_jax.train_rm --config configs/rm_tiny.yaml
    python -m codescaler_jax.train_rm --config configs/rm_tiny.yaml --set train.max_steps=20
    python -m codescaler_jax.train_rm --config configs/rm_tiny.yaml --resume
    python -m codescaler_jax.train_rm --config configs/rm_codescaler_8b.yaml --dry-run

``--dry-run`` builds abstract parameters, lowers and compiles the train step for the configured
mesh and shapes without loading weights or data, and prints per-device memory and the FLOPs
of one step from XLA, so you know before renting a pod whether it fits.
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
        prog="python -m codescaler_jax.train_rm",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="YAML config (see configs/rm_tiny.yaml)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.max_steps=20 (repeatable)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="compile the train step abstractly; print memory and FLOPs; no training",
    )
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip and count bad data records instead of stopping at the first",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def dry_run(cfg) -> dict:
    """Lower and compile the train step on abstract arrays; report XLA's memory and FLOPs."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from codescaler_jax.models.qwen3 import Qwen3Config, Qwen3RewardModel
    from codescaler_jax.models.sharding import batch_sharding, make_mesh
    from codescaler_jax.perf import train_flops_per_token
    from codescaler_jax.rm.config import compute_overrides
    from codescaler_jax.rm.train_step import (
        BATCH_KEYS,
        make_optimizer,
        make_schedule,
        split_model,
        state_shardings,
    )
    from codescaler_jax.rm.trainer import jit_train_step, model_config, step_options

    m = cfg.model
    source = f"model.size={m.size}"
    if m.init_from and (Path(m.init_from) / "config.json").is_file():
        mcfg = Qwen3Config.from_hf(m.init_from)
        mcfg = dataclasses.replace(mcfg, **compute_overrides(m))
        source = f"{m.init_from}/config.json"
    else:
        mcfg = model_config(cfg, vocab_min=0, pad_id=0)
    mesh = make_mesh(cfg.mesh)
    t0 = time.perf_counter()
    abstract = nnx.eval_shape(lambda: Qwen3RewardModel(mcfg, rngs=nnx.Rngs(0)))
    with jax.set_mesh(mesh):
        graphdef, params, rest = split_model(abstract)
        schedule = make_schedule(cfg.optim, 1000)
        tx = make_optimizer(cfg.optim, schedule)
        sh = state_shardings(abstract, tx, mesh)
        sds = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
        a_params = jax.tree.map(sds, params, sh["params"])
        a_opt = jax.tree.map(sds, jax.eval_shape(tx.init, params), sh["opt_state"])
        a_state = {
            "params": a_params,
            "opt_state": a_opt,
            "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=sh["step"]),
        }
        B, L = cfg.train.global_batch_size, cfg.data.max_length
        a_batch = {
            k: jax.ShapeDtypeStruct((B, L), jnp.int32, sharding=batch_sharding(mesh))
            for k in BATCH_KEYS
        }
        step = jit_train_step(graphdef, rest, tx, schedule, step_options(cfg), sh)
        lowered = step.lower(a_state, a_batch)
        compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0] if cost else {}
    n_params = sum(x.size for x in jax.tree.leaves(params))
    analytic = (
        2
        * B
        * L
        * train_flops_per_token(
            hidden=mcfg.hidden_size,
            intermediate=mcfg.intermediate_size,
            layers=mcfg.num_hidden_layers,
            heads=mcfg.num_attention_heads,
            kv_heads=mcfg.num_key_value_heads,
            head_dim=mcfg.head_dim,
            seq_len=L,
        )
    )

    def gib(x):
        return None if x is None else round(x / 2**30, 3)

    per_device = {
        "arguments_gib": gib(getattr(mem, "argument_size_in_bytes", None)),
        "outputs_gib": gib(getattr(mem, "output_size_in_bytes", None)),
        "aliased_gib": gib(getattr(mem, "alias_size_in_bytes", None)),
        "temporaries_gib": gib(getattr(mem, "temp_size_in_bytes", None)),
        "generated_code_gib": gib(getattr(mem, "generated_code_size_in_bytes", None)),
    }
    peak = sum(
        getattr(mem, a, 0) or 0
        for a in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")
    ) - (getattr(mem, "alias_size_in_bytes", 0) or 0)
    per_device["total_gib"] = gib(peak)
    report = {
        "model_from": source,
        "params": int(n_params),
        "param_dtype": mcfg.param_dtype,
        "compute_dtype": mcfg.dtype,
        "remat": mcfg.remat,
        "attention": mcfg.attention,
        "scan_layers": mcfg.scan_layers,
        "mesh": dict(mesh.shape),
        "devices": f"{mesh.size} x {jax.devices()[0].device_kind}",
        "global_batch_pairs": B,
        "seq_len": L,
        "grad_accum_steps": cfg.train.grad_accum_steps,
        "per_device_memory": per_device,
        "xla_flops_per_step_per_device": cost.get("flops"),
        # XLA's cost analysis counts a while loop's body once, not once per trip.
        "xla_flops_counts_loop_bodies_once": bool(
            mcfg.scan_layers or cfg.train.grad_accum_steps > 1
        ),
        "analytic_flops_per_step_total": analytic,
        "compile_s": round(compile_s, 1),
    }
    return report


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    from codescaler_jax.rm.config import RMTrainConfig

    try:
        overrides = args.overrides + (["data.skip_bad=true"] if args.skip_bad else [])
        cfg = load_config(RMTrainConfig, args.config, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from codescaler_jax.distributed import initialize

    # Before any other JAX call: on a multi-host launch every process joins one device set.
    try:
        initialize(cfg.distributed)
    except ValueError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        report = dry_run(cfg)
        print(json.dumps(report, indent=2))
        return 0

    from codescaler_jax.logging_utils import setup_logging
    from codescaler_jax.rm.trainer import RMTrainer

    log = setup_logging(cfg.run_dir)
    log.info("run directory: %s", Path(cfg.run_dir).absolute())
    summary = RMTrainer(cfg, resume=args.resume, progress=not args.no_progress).run()
    u, f = summary.get("untrained_eval"), summary.get("final_eval")
    if u and f:
        log.info(
            "held-out pairwise accuracy: untrained %.4f -> trained %.4f (%d pairs)",
            u["accuracy"],
            f["accuracy"],
            summary["data"]["eval_pairs"],
        )
    log.info("done in %.1f s; summary at %s/summary.json", summary["wall_s"], cfg.run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
