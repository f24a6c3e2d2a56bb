"""Scanned vs unrolled decoder layers: compile time, program size and step time by depth.

    python -m codescaler_jax.bench.scan_layers [--depths 2,4,8,16 --hidden 256 --seq 256]

For each depth, both layouts (``Qwen3Config.scan_layers`` True / False) build the same RM
(float32, remat on, random weights) and its full train step (Bradley-Terry loss, AdamW, as
``rm.train_step``) on one device. Reported per layout and depth: trace + lower seconds, XLA
compile seconds, the size of the lowered StableHLO and of the compiled HLO text (characters),
compiled temporaries, and the median step time, the two layouts' steps interleaved (scan,
unrolled, scan, ... ``--repeat`` rounds) with the median of the per-round ratios. The two
layouts run the same arithmetic, so
step times should match; the scanned program should stay the same size at every depth while
the unrolled one grows linearly. Figures depend on the machine's load, which is recorded.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from codescaler_jax.bench.common import add_harness_args


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m codescaler_jax.bench.scan_layers", description=__doc__.split("\n")[0]
    )
    p.add_argument("--depths", default="2,4,8,16", help="comma-separated layer counts")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--pairs", type=int, default=2, help="pairs per step (2x rows)")
    p.add_argument("--repeat", type=int, default=3, help="interleaved rounds per depth")
    p.add_argument("--out", default=None)
    add_harness_args(p)
    return p.parse_args(argv)


def measure(depth: int, scan: bool, a: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    """Compile one layout at one depth: its row (see the module docstring) and its blocking
    step function (timed by ``main``, interleaved with the other layout's)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from codescaler_jax.models.qwen3 import Qwen3Config, Qwen3RewardModel
    from codescaler_jax.models.sharding import MeshConfig, create_sharded, make_mesh
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

    cfg = Qwen3Config.tiny(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=3 * a.hidden,
        num_hidden_layers=depth, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
        head_dim=a.head_dim, max_position_embeddings=max(a.seq, 512), remat=True,
        scan_layers=scan,
    )
    mesh = make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])
    model = create_sharded(lambda: Qwen3RewardModel(cfg, rngs=nnx.Rngs(0)), mesh)
    graphdef, params, rest = split_model(model)
    optim = OptimSection(learning_rate=1e-5, warmup_steps=0, schedule="constant")
    sched = make_schedule(optim, 10)
    tx = make_optimizer(optim, sched)
    sh = state_shardings(model, tx, mesh)
    state = init_state(params, tx, sh)
    rng = np.random.default_rng(0)
    b, t = a.pairs, a.seq
    ids = jnp.asarray(rng.integers(1, a.vocab, size=(2 * b, t)), jnp.int32)
    mask = jnp.ones_like(ids)
    batch = {"chosen_ids": ids[:b], "chosen_mask": mask[:b],
             "rejected_ids": ids[b:], "rejected_mask": mask[b:]}
    step = jax.jit(make_train_step(graphdef, rest, tx, sched, StepOptions()),
                   out_shardings=(sh, None))
    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        lowered = step.lower(state, batch)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()

    def run() -> None:
        with jax.set_mesh(mesh):
            jax.block_until_ready(compiled(state, batch))

    mem = compiled.memory_analysis()
    return {
        "layers": depth,
        "scan_layers": scan,
        "lower_s": round(t1 - t0, 3),
        "compile_s": round(t2 - t1, 3),
        "lowered_hlo_chars": len(lowered.as_text()),
        "compiled_hlo_chars": len(compiled.as_text()),
        "temp_mib": round(mem.temp_size_in_bytes / 2**20, 2) if mem is not None else None,
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }, run


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = _args(argv)
    from codescaler_jax.bench.common import LoadMonitor, compare, interleave, write_json

    monitor = LoadMonitor()
    depths = [int(d) for d in a.depths.split(",")]
    rows, ratios = [], {}
    for d in depths:
        (r_scan, f_scan), (r_unr, f_unr) = measure(d, True, a), measure(d, False, a)
        timing = interleave({"scan": f_scan, "unrolled": f_unr}, rounds=a.repeat, warmup=1)
        for r, name in ((r_scan, "scan"), (r_unr, "unrolled")):
            r["step_median_s"] = round(timing["sides"][name]["median_s"], 4)
            r["step_s_all"] = timing["sides"][name]["wall_s"]
        # > 1: the scanned step is faster (median of the per-round unrolled/scan ratios)
        ratios[str(d)] = compare(timing, "scan", "unrolled")["ratio_median_of_pairs"]
        rows += [r_scan, r_unr]
    result = {
        "config": {k: v for k, v in vars(a).items() if k != "out"},
        "rows": rows,
        "step_unrolled_over_scan_median_of_pairs": ratios,
        "note": "RM train step (fwd + bwd + AdamW), float32, remat, one device",
    }
    path = write_json("scan_layers", result, a.out, monitor=monitor, force=a.force)
    print(f"{'layers':>6} {'layout':>8} {'lower s':>8} {'compile s':>9} {'HLO chars':>10} "
          f"{'compiled':>9} {'step s':>7} load")
    for r in rows:
        print(f"{r['layers']:>6} {'scan' if r['scan_layers'] else 'unrolled':>8} "
              f"{r['lower_s']:>8.2f} {r['compile_s']:>9.2f} {r['lowered_hlo_chars']:>10} "
              f"{r['compiled_hlo_chars']:>9} {r['step_median_s']:>7.3f} {r['load_avg_1m']}")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
