"""GRPO with the CodeScaler reward: ``python -m codescaler_jax.train_grpo --config FILE``.

    python -m codescaler_jax.train_grpo --config configs/grpo_tiny.yaml
    python -m codescaler_jax.train_grpo --config configs/grpo_tiny.yaml --set train.steps=4
    python -m codescaler_jax.train_grpo --config configs/grpo_tiny.yaml --resume
    python -m codescaler_jax.train_grpo --config configs/grpo_tiny.yaml --overwrite
    python -m codescaler_jax.train_grpo --config configs/grpo_codescaler_8b.yaml --dry-run

The loop: rollout (JAX sampler, KV cache) -> reward (registered by name; ``codescaler`` = shaped
RM score) -> group advantages -> clipped policy update. ``--dry-run`` builds the policy
abstractly, lowers and compiles the device programs of a step (the rollout's prefill + decode
loop, the co-located RM's scoring pass, the actor log-prob pass, the train step) for the
configured mesh and shapes without loading weights or data, and prints XLA's per-device memory
and FLOPs for each. ``--topology SLICE`` (implies ``--dry-run``; needs the ``tpu`` extra)
compiles them with the TPU compiler for a real slice (``v5p-16``, ``v6e-8``, ...), no TPU
needed, and reports each against the chip's HBM (counting what stays resident in between) with
the smallest change that makes a misfit fit. ``--json PATH`` writes the report as JSON.

    python -m codescaler_jax.train_grpo --config configs/grpo_codescaler_8b.yaml --topology v5p-16

Multi-host: launch one process per host (``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
``JAX_PROCESS_ID``, SLURM, Open MPI or a Cloud TPU VM; the ``distributed:`` section), as for
``train_rm``; each process samples, scores and sandboxes its own prompts (``rl/trainer.py``).

A run directory that already holds a run is refused unless ``--resume`` (only ``train.steps``
and bookkeeping keys may differ from its ``config.yaml``) or ``--overwrite`` (start clean).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from codescaler_jax.cli import guarded
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
    p.add_argument("--overwrite", action="store_true",
                   help="delete the run already in run_dir (checkpoints, tb, hf, summary) first")
    p.add_argument("--dry-run", action="store_true",
                   help="compile the step's programs abstractly; print memory and FLOPs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    from codescaler_jax.training.dry_run import add_cli_args

    add_cli_args(p)
    return p.parse_args(argv)


def _policy_model_config(cfg):
    """``(Qwen3Config, where it came from)`` of the policy: ``init_from``'s config.json or size."""
    p = cfg.policy
    mcfg = p.checkpoint_config()
    if mcfg is not None:
        return mcfg, f"{p.init_from}/config.json"
    return p.sized_config(pad_token_id=0, eos_token_id=1), f"policy.size={p.size}"


def _reward_model_config(cfg, policy_cfg):
    """``(Qwen3Config, where it came from)`` of the co-located RM, or ``(None, why)``.

    ``reward.rm_path``'s config.json (or its ``hf/`` export); without one, the policy's
    architecture (CodeScaler-8B is a Qwen3-8B, as is the recipe's policy)."""
    import dataclasses

    from codescaler_jax.models.qwen3 import Qwen3Config

    r = cfg.reward
    names = set(r.kwargs.get("weights", {})) if r.name == "mix" else {r.name}
    if "codescaler" not in names:
        return None, f"reward.name={r.name} uses no reward model"
    dtype = r.rm_dtype or policy_cfg.dtype
    for d in (Path(r.rm_path or "."), Path(r.rm_path or ".") / "hf"):
        if r.rm_path and (d / "config.json").is_file():
            mcfg = Qwen3Config.from_hf(d)
            return dataclasses.replace(mcfg, param_dtype=dtype, dtype=dtype, remat=False), str(d)
    mcfg = dataclasses.replace(policy_cfg, param_dtype=dtype, dtype=dtype, remat=False)
    return mcfg, f"policy architecture (reward.rm_path={r.rm_path!r} has no config.json)"


def build_dry_run(cfg, target):
    """The dry-run builder (see ``training.dry_run``): every device program of a GRPO step.

    Programs: ``rollout_decode_loop`` (the sampler's prefill + decode loop over one rollout
    batch), ``reward_scores`` (the co-located RM's forward over one RM batch, when the reward
    uses an RM), ``actor_logprobs`` (the old log-probs of all responses) and ``train_step``
    (the mini-batch updates). Co-location: while one program runs, the others' long-lived
    buffers stay in HBM (the optimizer state, the RM's parameters, the reference policy when
    ``beta > 0``); each program's report counts them as ``resident``. ``memory_by_part`` in
    the info: the per-device bytes of the policy parameters, its optimizer state, the RM
    parameters, the reference parameters and the decode loop's KV cache, from the abstract
    arrays and their shardings (nothing compiled; the programs' figures add XLA's temporaries).
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from codescaler_jax.generate.sampler import JaxSampler, SamplingConfig
    from codescaler_jax.models.qwen3 import Qwen3ForCausalLM, Qwen3RewardModel
    from codescaler_jax.models.sharding import make_mesh, tree_shardings
    from codescaler_jax.perf import train_flops_per_token
    from codescaler_jax.rl.grpo import (
        BATCH_KEYS,
        UpdateOptions,
        make_logprob_fn,
        make_train_step,
        per_update_schedule,
    )
    from codescaler_jax.training.abstract import (
        abstract_batch,
        abstract_params,
        abstract_train_state,
    )
    from codescaler_jax.training.dry_run import ProgramSpec
    from codescaler_jax.training.fit import Candidate, Change, Knob, divisor_steps
    from codescaler_jax.training.optim import make_optimizer, make_schedule
    from codescaler_jax.training.report import gib, per_device_bytes

    p, r, a, rw = cfg.policy, cfg.rollout, cfg.algorithm, cfg.reward
    mcfg, source = _policy_model_config(cfg)
    rm_cfg, rm_source = _reward_model_config(cfg, mcfg)
    mesh = make_mesh(cfg.mesh, devices=target.devices)
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    rows = r.num_prompts * r.num_generations
    P, N = cfg.data.max_prompt_length, r.max_new_tokens
    roll_rows = min(r.batch_size, rows)
    mb_rows = rows // a.num_minibatches
    if (mb_rows // a.micro_batches) % ways:
        raise ValueError(
            f"a micro-batch of {mb_rows // a.micro_batches} responses (rollout rows / "
            f"algorithm.num_minibatches / algorithm.micro_batches) does not split over the "
            f"mesh's data x fsdp = {ways} devices")
    if rm_cfg is not None and rw.rm_batch_size % ways:
        raise ValueError(f"reward.rm_batch_size={rw.rm_batch_size} does not split over the "
                         f"mesh's data x fsdp = {ways} devices")
    abstract = nnx.eval_shape(lambda: Qwen3ForCausalLM(mcfg, rngs=nnx.Rngs(0)))
    scfg = SamplingConfig(max_new_tokens=N, temperature=r.temperature, top_p=r.top_p,
                          top_k=r.top_k, eos_token_ids=(1,), prefill_chunk=r.prefill_chunk)
    sampler = JaxSampler(abstract, scfg, mesh=mesh, batch_size=roll_rows, max_prompt_len=P,
                         min_prompt_bucket=cfg.data.min_prompt_bucket)
    opts = UpdateOptions(loss=a.loss_config(), num_minibatches=a.num_minibatches,
                         micro_batches=a.micro_batches, temperature=scfg.logprob_temperature,
                         logprob_chunk=a.logprob_chunk)
    with jax.set_mesh(mesh):
        schedule = make_schedule(cfg.optim, cfg.train.steps)
        tx = make_optimizer(cfg.optim, per_update_schedule(schedule, a.num_minibatches))
        graphdef, rest, a_state, sh = abstract_train_state(abstract, tx, mesh)
    shapes = {"input_ids": ((rows, P + N), jnp.int32),
              "attention_mask": ((rows, P + N), jnp.int32),
              "response_mask": ((rows, N), jnp.int32), "advantages": ((rows,), jnp.float32),
              "old_logp": ((rows, N), jnp.float32)}
    if a.beta > 0:
        shapes["ref_logp"] = ((rows, N), jnp.float32)
    a_batch = abstract_batch(shapes, mesh)
    assert set(BATCH_KEYS) <= set(a_batch)
    logprob = jax.jit(make_logprob_fn(graphdef, rest, opts), static_argnums=(3,))
    step = jax.jit(make_train_step(graphdef, rest, tx, schedule, opts),
                   out_shardings=(sh, None), donate_argnums=(0,))

    state_b = per_device_bytes(a_state)
    params_b = per_device_bytes(a_state["params"])
    ref_b = params_b if a.beta > 0 else 0  # the trainer's copy: sharded like the policy
    rm = None
    rm_b = 0
    if rm_cfg is not None:
        rm_abstract = nnx.eval_shape(lambda: Qwen3RewardModel(rm_cfg, rngs=nnx.Rngs(0)))
        rm_graphdef, rm_params, rm_rest = abstract_params(rm_abstract, mesh)
        rm_b = per_device_bytes(rm_params)
        rm_ids = abstract_batch({"ids": ((rw.rm_batch_size, rw.rm_max_length), jnp.int32)},
                                mesh)["ids"]
        rm = jax.jit(lambda prm, ids, mask: nnx.merge(rm_graphdef, prm, rm_rest)(ids, mask))
    # The decode loop's KV cache: rollout rows x (prompt + response) slots, batch over
    # data/fsdp and KV heads over tensor (the sampler's cache shardings).
    a_cache = jax.eval_shape(lambda: abstract.init_cache(roll_rows, P + N))
    cache_sh = tree_shardings(a_cache, a_cache.logical_axes(), mesh)
    cache_b = per_device_bytes(jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), a_cache, cache_sh))
    parts = {"policy_params": params_b, "optimizer_state": per_device_bytes(a_state["opt_state"]),
             "reward_model_params": rm_b, "reference_params": ref_b, "kv_cache": cache_b}
    parts["total"] = sum(parts.values())

    def fwd_flops(c, seq_len):
        return train_flops_per_token(
            hidden=c.hidden_size, intermediate=c.intermediate_size,
            layers=c.num_hidden_layers, heads=c.num_attention_heads,
            kv_heads=c.num_key_value_heads, head_dim=c.head_dim, seq_len=seq_len,
            vocab_out=0, backward=False)

    head = 2.0 * mcfg.hidden_size * mcfg.vocab_size  # LM head FLOPs per scored position
    logprob_flops = rows * ((P + N) * fwd_flops(mcfg, P + N) + N * head)

    def in_mesh(fn):
        def lower():
            with jax.set_mesh(mesh):
                return fn()
        return lower

    micro = Knob("micro-batches", tuple(
        Candidate(Change((f"algorithm.micro_batches={k}",)), temps_scale=a.micro_batches / k)
        for k in divisor_steps(a.micro_batches, mb_rows, ways)))

    def fewer_rows(key, current):
        vals = [b for b in range(current - 1, 0, -1) if b % ways == 0 and current % b == 0]
        return Knob("micro-batches", tuple(
            Candidate(Change((f"{key}={b}",)), temps_scale=b / current) for b in vals))

    specs = [ProgramSpec(
        "rollout_decode_loop", in_mesh(lambda: sampler.lower(P)),
        model_flops=roll_rows * ((P + N) * fwd_flops(mcfg, P + N) + N * head),
        resident_bytes=state_b - params_b + rm_b + ref_b, arguments_bytes=params_b,
        knobs=(fewer_rows("rollout.batch_size", roll_rows),),
    )]
    if rm is not None:
        specs.append(ProgramSpec(
            "reward_scores", in_mesh(lambda: rm.lower(rm_params, rm_ids, rm_ids)),
            model_flops=rw.rm_batch_size * rw.rm_max_length * (
                fwd_flops(rm_cfg, rw.rm_max_length) + 2.0 * rm_cfg.hidden_size),
            resident_bytes=state_b + ref_b, arguments_bytes=rm_b,
            knobs=(fewer_rows("reward.rm_batch_size", rw.rm_batch_size),),
        ))
    specs.append(ProgramSpec(
        "actor_logprobs", in_mesh(lambda: logprob.lower(
            a_state["params"], a_batch["input_ids"], a_batch["attention_mask"], N)),
        model_flops=logprob_flops, resident_bytes=state_b - params_b + rm_b + ref_b,
        arguments_bytes=params_b, knobs=(micro,),
    ))
    remat = () if p.remat else (Knob("remat", (
        Candidate(Change(("policy.remat=true",)), temps_scale=0.0),)),)
    specs.append(ProgramSpec(
        "train_step", in_mesh(lambda: step.lower(a_state, a_batch)),
        model_flops=3.0 * logprob_flops, resident_bytes=rm_b + ref_b,
        arguments_bytes=per_device_bytes((a_state, a_batch)), knobs=(micro, *remat),
    ))
    info = {
        "model_from": source, "reward_model_from": rm_source, "mesh": dict(mesh.shape),
        "devices": f"{mesh.size} x {target.devices[0].device_kind}",
        "param_dtype": mcfg.param_dtype, "compute_dtype": mcfg.dtype, "remat": mcfg.remat,
        "attention": mcfg.attention, "scan_layers": mcfg.scan_layers,
        "responses_per_step": rows, "prompt_len": P, "response_len": N,
        "rollout_batch": roll_rows,
        "params": int(sum(x.size for x in jax.tree.leaves(a_state["params"]))),
        "memory_by_part": {k: {"bytes": int(v), "gib": gib(v)} for k, v in parts.items()},
    }
    return info, specs


def dry_run_report(result) -> dict:
    """The dry run as JSON: run info, ``programs`` (each program's report), suggestions, and
    each program's report also at the top level under its name (the keys of the old report)."""
    out = result.to_dict()
    out.update(out["programs"])
    out["compile_s"] = round(sum(p.compile_s for p in result.programs), 1)
    return out


def dry_run(cfg, topology: str | None = None, *, suggest_changes: bool = True) -> dict:
    """Compile the rollout, RM-scoring, log-prob and update programs on abstract arrays for the
    local devices or TPU slice ``topology`` and report each (see ``training.dry_run``)."""
    from codescaler_jax.training.dry_run import resolve_target, run

    result = run(cfg, build_dry_run, resolve_target(topology), suggest_changes=suggest_changes)
    return dry_run_report(result)


@guarded
def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    from codescaler_jax.training.dry_run import cli_main, prepare_platform

    prepare_platform(args)
    from codescaler_jax.rl.config import GRPOConfig

    cfg = load_config(GRPOConfig, args.config, args.overrides)
    if not args.dry_run:
        cfg.check_paths()  # before any model or data work, naming the key
    if args.dry_run:
        return cli_main(args, cfg, build_dry_run, f"train_grpo dry run: {args.config}",
                        dry_run_report)
    from codescaler_jax.distributed import initialize

    # Before any other JAX call: on a multi-host launch every process joins one device set.
    try:
        initialize(cfg.distributed)
    except ValueError as e:
        raise ConfigError(str(e)) from e

    from codescaler_jax.logging_utils import setup_logging
    from codescaler_jax.rl.trainer import GRPOTrainer

    trainer = GRPOTrainer(cfg, resume=args.resume, overwrite=args.overwrite,
                          progress=not args.no_progress)
    trainer.prepare()  # refuse or clean the run directory before the log file is opened there
    log = setup_logging(cfg.run_dir)
    log.info("run directory: %s", Path(cfg.run_dir).absolute())
    summary = trainer.run()
    if summary.get("nothing_to_train"):
        return 0
    hist = summary["history"]
    if hist:
        log.info("reward mean: first step %.4f -> last step %.4f (%d steps run)",
                 hist[0]["reward_mean"], hist[-1]["reward_mean"], summary["steps_run"])
    log.info("time per step: %s", {k: round(v, 2) for k, v in summary["time_per_phase_s"].items()})
    log.info("done in %.1f s; summary at %s/summary.json", summary["wall_s"], cfg.run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
