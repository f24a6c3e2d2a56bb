"""The benchmark suite: every benchmark of the project on whatever backend is present, one report.

    python -m codescaler_jax.bench.suite --quick          # CPU: small shapes, ~10-20 minutes
    python -m codescaler_jax.bench.suite                  # accelerator: each benchmark's defaults
    python -m codescaler_jax.bench.suite --only rm_step,sampler --out bench_results/suite.json

Each benchmark module of ``codescaler_jax.bench`` (found by listing the package, so a new one
joins without editing this file) runs in its own subprocess, with a timeout, writing its own
JSON, which the report embeds whole: a crash or hang of one benchmark is recorded and the rest
still run, and each gets a fresh accelerator (a TPU is held by one process at a time; nothing
here touches the device until they have all finished). ``--quick`` passes the small settings
listed in ``QUICK_ARGS``; a module without an entry there runs with its defaults.

Beside those, the suite measures the RM train step on a Qwen3-0.6B-shaped model in bfloat16
(``rm_step``): parameters and compute in bf16 as in ``configs/rm_codescaler_8b.yaml``, the
project's jit train step (Bradley-Terry loss, clipping, AdamW) on a mesh over every device,
MFU = matmul FLOPs of the step (``codescaler_jax.perf``) / step time / bf16 matmul peak
measured in the same process on the same devices. The reference, where it can run on the same
hardware (the JAX backend is the CPU, where the installed torch runs): the same step in
``transformers`` (PyTorch) in bf16, interleaved step by step. ``--quick`` keeps the 0.6B width
(hidden 1024, 16/8 heads of 128, MLP 3072, the 151936-token vocabulary) but uses 2 of the 28
layers and 128-token sequences, and the report says so.
"""

from __future__ import annotations

import argparse
import json
import os
import pkgutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import codescaler_jax.bench as bench_pkg
from codescaler_jax.bench.common import (
    LoadMonitor,
    add_harness_args,
    compare,
    interleave,
    write_json,
)

NOT_BENCHMARKS = {"common", "suite"}
# Small settings for a CPU run; the full run passes no arguments (each module's defaults).
QUICK_ARGS: dict[str, list[str]] = {
    "model": ["--small"],
    "train_rm": ["--small"],
    "sampler": [
        "--shapes",
        "grpo_tiny_policy",
        "--new-tokens",
        "32",
        "--repeat",
        "2",
        "--grpo-steps",
        "2",
    ],
    "extract": ["--n", "60", "--repeat", "3", "--workers", "1"],
    "best_of_n": ["--limit", "24", "--workers", "1"],
    "serve": ["--max-batches", "1,8", "--clients", "8", "--requests", "4"],
    "attention": ["--lengths", "512,2048", "--repeat", "2", "--decode-lengths", "2048"],
    "scan_layers": ["--depths", "2,8", "--hidden", "64", "--head-dim", "16", "--seq", "64",
                    "--repeat", "2"],
}
RM_STEP = "rm_step"


def benchmark_modules() -> list[str]:
    """Names of the benchmark modules in ``codescaler_jax.bench`` (sorted)."""
    return sorted(
        m.name
        for m in pkgutil.iter_modules(bench_pkg.__path__)
        if m.name not in NOT_BENCHMARKS and not m.name.startswith("_")
    )


def _headline(result: dict[str, Any], limit: int = 3) -> str:
    """A few ratio / MFU figures (else throughputs) from a benchmark's JSON, for the console.

    Looks one level into dicts and into the first element of lists of dicts (e.g. the first
    row of a table of settings)."""
    found: dict[str, list[str]] = {"ratio": [], "rate": []}

    def walk(d: dict[str, Any], prefix: str, depth: int) -> None:
        for k, v in d.items():
            if isinstance(v, list) and v and isinstance(v[0], dict) and depth < 1:
                walk(v[0], f"{prefix}{k}[0].", depth + 1)
            elif isinstance(v, dict) and depth < 1:
                walk(v, f"{prefix}{k}.", depth + 1)
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                if any(s in k for s in ("ratio", "speedup", "mfu")):
                    found["ratio"].append(f"{prefix}{k}={v:.3g}")
                elif k.endswith("per_s"):
                    found["rate"].append(f"{prefix}{k}={v:.3g}")

    walk({k: v for k, v in result.items() if k not in ("environment", "config")}, "", 0)
    return ", ".join((found["ratio"] or found["rate"])[:limit])


def run_module(name: str, args: list[str], out: Path, timeout_s: float) -> dict[str, Any]:
    """Run ``python -m codescaler_jax.bench.<name> <args> --out <out>``; the record of it."""
    cmd = [sys.executable, "-m", f"codescaler_jax.bench.{name}", *args, "--out", str(out)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as e:
        rc = None
        tail = (
            (e.stdout or b"").decode(errors="replace")
            if isinstance(e.stdout, bytes)
            else (e.stdout or "")
        )[-3000:]
    record: dict[str, Any] = {
        "command": cmd[1:-2],
        "wall_s": round(time.perf_counter() - t0, 1),
        "returncode": rc,
    }
    if rc is None:
        record["status"] = f"timeout after {timeout_s:.0f} s"
    elif out.is_file():
        record["status"] = "ok" if rc == 0 else f"exit {rc}"
        record["result"] = json.loads(out.read_text())
    else:
        record["status"] = f"exit {rc}, no JSON written"
    if record["status"] != "ok":
        record["output_tail"] = tail
    return record


# ---- the bf16 RM train step on a Qwen3-0.6B shape ------------------------------------------


def rm_step_benchmark(
    *,
    quick: bool,
    repeat: int,
    skip_torch: bool,
    seq: int | None = None,
    pairs: int | None = None,
    layers: int | None = None,
) -> dict[str, Any]:
    """MFU of the project's bf16 RM train step on a Qwen3-0.6B-shaped model (and torch's)."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from codescaler_jax.models.qwen3 import Qwen3Config, Qwen3RewardModel
    from codescaler_jax.models.sharding import MeshConfig, batch_sharding, create_sharded, make_mesh
    from codescaler_jax.perf import measure_matmul_peak, train_flops_per_token
    from codescaler_jax.rm.config import OptimSection
    from codescaler_jax.rm.train_step import (
        StepOptions,
        init_state,
        make_optimizer,
        make_schedule,
        make_train_step,
        split_model,
        state_shardings,
    )

    backend = jax.default_backend()
    n_dev = jax.device_count()
    full = Qwen3Config.qwen3_0_6b()
    L = seq or (128 if quick else 2048)
    B = pairs or (2 if quick else 4 * n_dev)
    n_layers = layers or (2 if quick else full.num_hidden_layers)
    cfg = dataclasses.replace(
        full,
        num_hidden_layers=n_layers,
        param_dtype="bfloat16",
        dtype="bfloat16",
        remat=not quick,
        pad_token_id=0,
    )
    rng = np.random.default_rng(0)
    lens = rng.integers(L // 2, L + 1, size=2 * B)
    lens[:2] = L
    mask = (np.arange(L)[None] < lens[:, None]).astype(np.int32)
    ids = np.where(mask, rng.integers(1, cfg.vocab_size, size=(2 * B, L)), 0).astype(np.int32)
    batch_np = {
        "chosen_ids": ids[:B],
        "chosen_mask": mask[:B],
        "rejected_ids": ids[B:],
        "rejected_mask": mask[B:],
    }
    optim = OptimSection(
        learning_rate=1e-5,
        warmup_steps=0,
        schedule="constant",
        weight_decay=0.01,
        max_grad_norm=1.0,
    )
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
    t0 = time.perf_counter()
    model = create_sharded(lambda: Qwen3RewardModel(cfg, rngs=nnx.Rngs(0)), mesh)
    with jax.set_mesh(mesh):
        graphdef, params, rest = split_model(model)
        sched = make_schedule(optim, 100)
        tx = make_optimizer(optim, sched)
        sh = state_shardings(model, tx, mesh)
        del model
        state = init_state(params, tx, sh)
        batch = {k: jax.device_put(v, batch_sharding(mesh)) for k, v in batch_np.items()}
        step = jax.jit(
            make_train_step(graphdef, rest, tx, sched, StepOptions()),
            out_shardings=(sh, None),
            donate_argnums=(0,),
        )
        compiled = step.lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
        cost = compiled.cost_analysis()
        cost = (cost[0] if cost else {}) if isinstance(cost, list) else (cost or {})
        state, m = compiled(state, batch)  # first run (allocation) untimed
        jax.block_until_ready(m)

        torch_step, torch_note = None, None
        if skip_torch:
            torch_note = "skipped (--skip-torch)"
        elif backend != "cpu":
            torch_note = (
                f"not run: the JAX backend is {backend}; the installed torch is the "
                "CPU build, so it would not run on the same hardware"
            )
        else:
            torch_step = _torch_bf16_step(cfg, ids, mask, B)

        def ours_step() -> None:
            nonlocal state, m
            state, m = compiled(state, batch)
            jax.block_until_ready(m)

        sides = {"ours": ours_step} if torch_step is None else {"ours": ours_step,
                                                                "torch": torch_step}
        timing = interleave(sides, rounds=repeat, warmup=0)  # both sides ran once already
        losses_finite = bool(np.isfinite(float(m["loss_sum"])))

    peak_n = 2048 if backend == "cpu" else 8192
    peak = measure_matmul_peak(jnp.bfloat16, n=peak_n, repeat=5)
    tokens = 2 * B * L
    fpt = train_flops_per_token(
        hidden=cfg.hidden_size,
        intermediate=cfg.intermediate_size,
        layers=n_layers,
        heads=cfg.num_attention_heads,
        kv_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        seq_len=L,
    )
    flops = fpt * tokens

    def side(times: list[float]) -> dict[str, Any]:
        t = float(np.median(times))  # interleaved rounds (common.interleave)
        return {
            "step_s_median": t,
            "step_s_all": times,
            "tokens_per_s": tokens / t,
            "model_flops_per_s": flops / t,
            "mfu": flops / t / peak,
        }

    shape = {
        "hidden": cfg.hidden_size,
        "intermediate": cfg.intermediate_size,
        "layers": n_layers,
        "layers_of_qwen3_0_6b": full.num_hidden_layers,
        "heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "vocab": cfg.vocab_size,
        "seq_len": L,
        "pairs": B,
        "rows": 2 * B,
        "param_dtype": cfg.param_dtype,
        "dtype": cfg.dtype,
        "remat": cfg.remat,
    }
    out: dict[str, Any] = {
        "what": "RM train step (BT loss, grad clip, AdamW) on a Qwen3-0.6B shape, bfloat16",
        "quick_mode_note": (
            f"--quick: {n_layers} of {full.num_hidden_layers} layers, {L}-token sequences, "
            f"{B} pairs; width, heads and vocabulary as Qwen3-0.6B"
            if quick
            else None
        ),
        "shape": shape,
        "backend": backend,
        "devices": f"{n_dev} x {jax.devices()[0].device_kind}",
        "mesh": dict(mesh.shape),
        "tokens_per_step": tokens,
        "model_flops_per_step": flops,
        "flops_count": "matmul FLOPs, 6 x non-embedding params per token + causal attention "
        "(codescaler_jax.perf.train_flops_per_token)",
        "xla_cost_analysis_flops": cost.get("flops"),
        "matmul_peak_bf16_flops_per_s": peak,
        "matmul_peak_note": f"best of 5 jitted [{peak_n}, {peak_n}] bf16 matmuls per device, "
        "all devices together, measured in this process",
        "compile_s": round(compile_s, 2),
        "loss_finite": losses_finite,
        "ours": side(timing["sides"]["ours"]["wall_s"]),
        "order": timing["order"],
    }
    if "torch" in timing["sides"]:
        out["torch_bf16"] = side(timing["sides"]["torch"]["wall_s"])
        out["comparison"] = compare(timing, "ours", "torch")
        out["ratio_ours_over_torch"] = out["comparison"]["ratio_median_of_pairs"]
        import torch

        out["torch_threads"] = torch.get_num_threads()
    else:
        out["torch_bf16"] = torch_note
    return out


def _torch_bf16_step(cfg, ids, mask, n_pairs: int):
    """The same BT step in ``transformers`` (bf16 parameters and compute), run once."""
    import torch
    from transformers import Qwen3Config as HFConfig
    from transformers import Qwen3ForSequenceClassification

    torch.manual_seed(0)
    hf = Qwen3ForSequenceClassification(
        HFConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_key_value_heads,
            head_dim=cfg.head_dim,
            num_labels=1,
            pad_token_id=0,
            rms_norm_eps=cfg.rms_norm_eps,
            attn_implementation="sdpa",
        )
    ).to(torch.bfloat16)
    hf.train()
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-5, weight_decay=0.01)
    t_ids = torch.tensor(ids, dtype=torch.long)
    t_mask = torch.tensor(mask)

    def step() -> None:
        s = hf(input_ids=t_ids, attention_mask=t_mask).logits[:, 0].float()
        loss = -torch.nn.functional.logsigmoid(s[:n_pairs] - s[n_pairs:]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()

    step()  # warm-up
    return step


# ---- the command line ------------------------------------------------------------------------


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m codescaler_jax.bench.suite",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="small settings (CPU)")
    p.add_argument("--only", default=None, help=f"comma-separated names (modules, {RM_STEP})")
    p.add_argument("--skip", default="", help="comma-separated names to leave out")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per benchmark")
    p.add_argument(
        "--repeat", type=int, default=None, help=f"{RM_STEP} timed steps (default 3 quick, 10 full)"
    )
    p.add_argument("--skip-torch", action="store_true", help=f"no torch reference in {RM_STEP}")
    p.add_argument("--rm-seq", type=int, default=None, help=f"{RM_STEP} sequence length")
    p.add_argument("--rm-pairs", type=int, default=None, help=f"{RM_STEP} pairs per step")
    p.add_argument("--rm-layers", type=int, default=None, help=f"{RM_STEP} decoder layers")
    p.add_argument("--out", default=None, help="report path (default bench_results/suite.json)")
    add_harness_args(p)
    # Internal: the suite runs its own rm_step in a subprocess too (fresh device, timeout).
    p.add_argument("--rm-step-only", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    repeat = args.repeat or (3 if args.quick else 10)
    monitor = LoadMonitor()
    if args.rm_step_only:
        res = rm_step_benchmark(
            quick=args.quick,
            repeat=repeat,
            skip_torch=args.skip_torch,
            seq=args.rm_seq,
            pairs=args.rm_pairs,
            layers=args.rm_layers,
        )
        write_json(RM_STEP, res, args.out, monitor=monitor, force=args.force)
        return 0

    names = [*benchmark_modules(), RM_STEP]
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            print(f"unknown benchmark(s) {unknown}; known: {names}", file=sys.stderr)
            return 2
        names = [n for n in names if n in wanted]
    names = [n for n in names if n not in set(args.skip.split(","))]

    records: dict[str, Any] = {}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_suite_") as tmp:
        for name in names:
            out = Path(tmp) / f"{name}.json"
            if name == RM_STEP:
                extra = ["--rm-step-only", "--repeat", str(repeat)]
                extra += ["--quick"] if args.quick else []
                extra += ["--skip-torch"] if args.skip_torch else []
                extra += ["--force"] if args.force else []
                for flag, value in (
                    ("--rm-seq", args.rm_seq),
                    ("--rm-pairs", args.rm_pairs),
                    ("--rm-layers", args.rm_layers),
                ):
                    if value is not None:
                        extra += [flag, str(value)]
                rec = run_module("suite", extra, out, args.timeout)
            else:
                rec = run_module(
                    name,
                    [*(QUICK_ARGS.get(name, []) if args.quick else []),
                     *(["--force"] if args.force else [])],
                    out,
                    args.timeout,
                )
                if args.quick and name not in QUICK_ARGS:
                    rec["note"] = "no quick settings known for this module: its defaults ran"
            records[name] = rec
            print(
                f"{name:<12} {rec['status']:<24} {rec['wall_s']:>8.1f} s  "
                f"{_headline(rec.get('result', {}))}",
                flush=True,
            )

    payload = {
        "mode": "quick" if args.quick else "full",
        "benchmarks_run": names,
        "wall_s": round(time.perf_counter() - t_start, 1),
        "load_average_1min_at_end": os.getloadavg()[0],
        # README-grade only if every benchmark's own output is (each judged its own run)
        "all_results_readme_grade": all(
            r.get("result", {}).get("readme_grade", False) for r in records.values()
        ),
        "results": records,
    }
    path = write_json("suite", payload, args.out, monitor=monitor, force=args.force)
    print(f"wrote {path}")
    return 0 if all(r["status"] == "ok" for r in records.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
