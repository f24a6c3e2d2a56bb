"""Train a CodeScaler reward model: ``python -m codescaler_jax.train_rm --config FILE``.

    python -m codescaler_jax.train_rm --config configs/rm_tiny.yaml
    python -m codescaler_jax.train_rm --config configs/rm_tiny.yaml --set train.max_steps=20
    python -m codescaler_jax.train_rm --config configs/rm_tiny.yaml --resume
    python -m codescaler_jax.train_rm --config configs/rm_tiny.yaml --overwrite
    python -m codescaler_jax.train_rm --config configs/rm_codescaler_8b.yaml --dry-run

``--dry-run`` builds abstract parameters, lowers and compiles the train step for the configured
mesh and shapes without loading weights or data, and prints per-device memory and the FLOPs
of one step from XLA. ``--topology SLICE`` (implies ``--dry-run``; needs the ``tpu`` extra)
compiles it with the TPU compiler for a real slice (``v5p-16``, ``v6e-8``, ...) on this machine,
no TPU needed: memory per chip against its HBM, fits or not with the headroom, XLA's estimated
step time and the MFU it implies, and where it does not fit the smallest change that does,
compiled to show it. ``--json PATH`` writes the report as JSON (``-``: to stdout).

    python -m codescaler_jax.train_rm --config configs/rm_codescaler_8b.yaml --topology v5p-16

A run directory that already holds a run is refused unless ``--resume`` (continue it; only the
step budget ``train.max_steps`` / ``train.num_epochs`` and bookkeeping keys may differ from its
``config.yaml``) or ``--overwrite`` (delete that run's files and start clean).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from codescaler_jax.cli import guarded
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
        "--overwrite",
        action="store_true",
        help="delete the run already in run_dir (checkpoints, data cache, tb, hf, summary) first",
    )
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
    from codescaler_jax.training.dry_run import add_cli_args

    add_cli_args(p)
    return p.parse_args(argv)


def _dry_run_model_config(cfg):
    """``(Qwen3Config, where it came from)``: ``model.init_from``'s config.json, else the size."""
    m = cfg.model
    mcfg = m.checkpoint_config()
    if mcfg is not None:
        return mcfg, f"{m.init_from}/config.json"
    return m.sized_config(pad_token_id=0), f"model.size={m.size}"


def build_dry_run(cfg, target):
    """The dry-run builder (see ``training.dry_run``): the RM train step on abstract arrays.

    Returns ``(info, [ProgramSpec("train_step")])``; the step's knobs are
    ``train.grad_accum_steps`` and ``model.remat``.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from codescaler_jax.models.qwen3 import Qwen3RewardModel
    from codescaler_jax.models.sharding import make_mesh
    from codescaler_jax.perf import train_flops_per_token
    from codescaler_jax.rm.train_step import BATCH_KEYS
    from codescaler_jax.rm.trainer import jit_train_step, step_options
    from codescaler_jax.training.abstract import abstract_batch, abstract_train_state
    from codescaler_jax.training.dry_run import ProgramSpec
    from codescaler_jax.training.fit import Candidate, Change, Knob, divisor_steps
    from codescaler_jax.training.optim import make_optimizer, make_schedule
    from codescaler_jax.training.report import per_device_bytes

    mcfg, source = _dry_run_model_config(cfg)
    mesh = make_mesh(cfg.mesh, devices=target.devices)
    B, L, accum = cfg.train.global_batch_size, cfg.data.max_length, cfg.train.grad_accum_steps
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if (B // accum) % ways:
        raise ValueError(
            f"train.global_batch_size={B} / train.grad_accum_steps={accum} pairs per micro-batch "
            f"do not split over the mesh's data x fsdp = {ways} devices"
        )
    abstract = nnx.eval_shape(lambda: Qwen3RewardModel(mcfg, rngs=nnx.Rngs(0)))
    with jax.set_mesh(mesh):
        schedule = make_schedule(cfg.optim, 1000)
        tx = make_optimizer(cfg.optim, schedule)
        graphdef, rest, a_state, sh = abstract_train_state(abstract, tx, mesh)
    a_batch = abstract_batch({k: ((B, L), jnp.int32) for k in BATCH_KEYS}, mesh)
    step = jit_train_step(graphdef, rest, tx, schedule, step_options(cfg), sh)

    def lower():
        with jax.set_mesh(mesh):
            return step.lower(a_state, a_batch)

    per_token = train_flops_per_token(
        hidden=mcfg.hidden_size, intermediate=mcfg.intermediate_size,
        layers=mcfg.num_hidden_layers, heads=mcfg.num_attention_heads,
        kv_heads=mcfg.num_key_value_heads, head_dim=mcfg.head_dim, seq_len=L,
    )
    knobs = [Knob("micro-batches", tuple(
        Candidate(Change((f"train.grad_accum_steps={k}",)), temps_scale=accum / k)
        for k in divisor_steps(accum, B, ways)))]
    if not cfg.model.remat:
        # Remat can at best drop the temporaries; the arguments stay.
        knobs.append(Knob("remat", (Candidate(Change(("model.remat=true",)), temps_scale=0.0),)))
    info = {
        "model_from": source,
        "params": int(sum(x.size for x in jax.tree.leaves(a_state["params"]))),
        "param_dtype": mcfg.param_dtype,
        "compute_dtype": mcfg.dtype,
        "remat": mcfg.remat,
        "attention": mcfg.attention,
        "scan_layers": mcfg.scan_layers,
        "mesh": dict(mesh.shape),
        "devices": f"{mesh.size} x {target.devices[0].device_kind}",
        "global_batch_pairs": B,
        "seq_len": L,
        "grad_accum_steps": accum,
    }
    spec = ProgramSpec(
        "train_step", lower, model_flops=2 * B * L * per_token,
        arguments_bytes=per_device_bytes((a_state, a_batch)), knobs=tuple(knobs),
    )
    return info, [spec]


def dry_run_report(result) -> dict:
    """The dry run as JSON: run info, per-program reports, suggestions, and the train step's
    figures under the keys the fake-CPU dry run has always printed."""
    out = result.to_dict()
    step = out["programs"]["train_step"]
    out["per_device_memory"] = {k: step[k] for k in (
        "arguments_gib", "outputs_gib", "aliased_gib", "temporaries_gib", "generated_code_gib",
        "total_gib")}
    out["xla_flops_per_step_per_device"] = step["xla_flops_per_device"]
    out["analytic_flops_per_step_total"] = step["model_flops"]
    out["compile_s"] = step["compile_s"]
    # XLA's cost analysis counts a while loop's body once (scanned layers, micro-batches).
    out["xla_flops_counts_loop_bodies_once"] = bool(step.get("has_loop"))
    return out


def dry_run(cfg, topology: str | None = None, *, suggest_changes: bool = True) -> dict:
    """Lower and compile the train step on abstract arrays for the local devices or TPU slice
    ``topology``; report memory per device, XLA's cost, the analytic MFU and, where the step
    does not fit, the smallest change that does (see ``training.dry_run``)."""
    from codescaler_jax.training.dry_run import resolve_target, run

    result = run(cfg, build_dry_run, resolve_target(topology), suggest_changes=suggest_changes)
    return dry_run_report(result)


@guarded
def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    from codescaler_jax.training.dry_run import cli_main, prepare_platform

    prepare_platform(args)
    from codescaler_jax.rm.config import RMTrainConfig

    overrides = args.overrides + (["data.skip_bad=true"] if args.skip_bad else [])
    cfg = load_config(RMTrainConfig, args.config, overrides)
    if not args.dry_run:
        cfg.check_paths()  # before any data work: a missing file fails now, naming its key
    if args.dry_run and args.topology:
        # An ahead-of-time compile for a slice is one process on this machine: no multi-host.
        return cli_main(args, cfg, build_dry_run, f"train_rm dry run: {args.config}",
                        dry_run_report)
    from codescaler_jax.distributed import initialize

    # Before any other JAX call: on a multi-host launch every process joins one device set.
    try:
        initialize(cfg.distributed)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if args.dry_run:
        return cli_main(args, cfg, build_dry_run, f"train_rm dry run: {args.config}",
                        dry_run_report)

    from codescaler_jax.logging_utils import setup_logging
    from codescaler_jax.rm.trainer import RMTrainer

    trainer = RMTrainer(
        cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress
    )
    trainer.prepare()  # refuse or clean the run directory before the log file is opened there
    log = setup_logging(cfg.run_dir)
    log.info("run directory: %s", Path(cfg.run_dir).absolute())
    summary = trainer.run()
    if summary.get("nothing_to_train"):
        e = summary.get("checkpoint_eval")
        if e and "accuracy" in e:
            log.info(
                "nothing trained; held-out pairwise accuracy recorded at step %d (not "
                "re-measured): %.4f", e["step"], e["accuracy"],
            )
        return 0
    u, f = summary.get("untrained_eval"), summary.get("final_eval")
    if u and f:
        log.info(
            "held-out pairwise accuracy: untrained %.4f -> trained %.4f (%d pairs)",
            u["accuracy"],
            f["accuracy"],
            summary["data"]["eval_pairs_used"],
        )
    log.info("done in %.1f s; summary at %s/summary.json", summary["wall_s"], cfg.run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
