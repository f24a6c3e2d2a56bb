"""Reward-model forward+backward throughput: our JAX Qwen3 vs transformers (PyTorch), same run.

    python -m codescaler_jax.bench.model [--hidden 512 --layers 8 --seq 512 --batch 8]
    python -m codescaler_jax.bench.model --small          # a quick setting

Both sides build the same architecture (float32, random weights), run
``loss = mean(scores)`` forward and backward over a full ``[batch, seq]`` batch, and report
tokens/s. The two sides run interleaved (ours, torch, ours, torch, ... ``--repeat`` rounds
after ``--warmup`` untimed rounds) and the reported ratio is the median of the per-round ratios
(``codescaler_jax.bench.common``); the load before and after is recorded and the JSON is
README-grade only on a quiet machine (or with ``--force``). The device's matmul peak is
measured in the same process (a large jitted float32 matmul), and model FLOPs per step use
the PaLM-style count

    flops = 6 * N * B * T + 12 * L * B * T^2 * (heads * head_dim)

with N the non-embedding parameter count (the embedding lookup does no matmul), L layers, B
batch, T sequence length (attention counted over the full T x T score matrix, as computed).
MFU = flops / step_time / matmul_peak. Because other processes may share the machine, the
same ratio is also reported in process CPU seconds (``mfu_cpu_time`` = work per CPU-second
of the step / work per CPU-second of the matmul), which competition for cores barely moves;
torch's OpenMP threads spin while waiting, so its CPU-second figure is a lower bound.

Our model is built unrolled (``scan_layers=False``, as ``Qwen3Config.tiny`` and HF's model):
``--scan-layers`` measures the scanned layout, which on XLA:CPU stacks each layer's saved
activations into ``[layers, ...]`` buffers (zero-filled, then written and read by dynamic
slices) and costs a few percent of the step at this size.

The torch side uses torch's default intra-op thread count (``--torch-threads`` to change);
XLA:CPU uses all cores. XLA flags set by this script apply only to its own process (see
``XLA_CPU_FLAGS``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from codescaler_jax.bench.common import (
    LoadMonitor,
    add_harness_args,
    compare,
    interleave,
    require_torch,
    time_call,
    write_json,
)

require_torch("bench.model")  # before any work: the comparison needs torch

# XLA reads XLA_FLAGS once, at backend start: set before jax is imported (this process only).
# Empty on purpose: on the 2-core AMD EPYC dev machine none of --xla_cpu_use_onednn=true,
# --xla_cpu_experimental_xnn_fusion_type=dot[,eltwise,reduce], --xla_cpu_enable_fast_math=true,
# --xla_cpu_use_xnnpack=false, --xla_cpu_experimental_ynn_fusion_type=-dot or
# --xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY changed the CPU
# seconds of a step by more than the noise (a few %). Add flags here to try others. Flags of the
# CPU backend in jax 0.10.2's XLA include xla_cpu_multi_thread_eigen, xla_cpu_use_thunk_runtime,
# xla_cpu_enable_fast_math (changes numerics), xla_cpu_enable_concurrency_optimized_scheduler,
# xla_cpu_scheduler_type, xla_cpu_prefer_vector_width, xla_cpu_use_onednn, xla_cpu_use_xnnpack,
# xla_cpu_experimental_{xnn,ynn,onednn}_fusion_type; there is no intra-op thread-count flag (the
# CPU client uses every core it may run on: pin with taskset to compare at equal threads).
XLA_CPU_FLAGS: list[str] = []


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m codescaler_jax.bench.model", description=__doc__.split("\n")[0]
    )
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--intermediate", type=int, default=None, help="default 3 * hidden")
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeat", type=int, default=5,
                   help="interleaved timed rounds (one step of each side per round)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--matmul-size", type=int, default=None, help="default 2048 CPU, 8192 GPU/TPU")
    p.add_argument("--small", action="store_true",
                   help="hidden 256, 4 layers, 4 heads, 2 KV heads, seq 256, batch 4")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--scan-layers", action="store_true",
                   help="our decoder layers scanned (default: unrolled, like HF's)")
    p.add_argument("--attention", default="auto", help="our attention implementation")
    p.add_argument("--torch-threads", type=int, default=None, help="default: torch's own")
    p.add_argument("--no-xla-flags", action="store_true",
                   help="do not set XLA_CPU_FLAGS (to measure their effect)")
    p.add_argument("--out", default=None)
    add_harness_args(p)
    args = p.parse_args(argv)
    if args.small:
        args.hidden, args.layers, args.heads, args.kv_heads = 256, 4, 4, 2
        args.seq, args.batch = 256, 4
    if args.intermediate is None:
        args.intermediate = 3 * args.hidden
    return args


def model_flops(n_params: int, layers: int, batch: int, seq: int, heads: int,
                head_dim: int) -> float:
    """Forward+backward FLOPs of one step (see the module docstring)."""
    return 6.0 * n_params * batch * seq + 12.0 * layers * batch * seq**2 * heads * head_dim


def _timed(fn: Any, warmup: int, repeat: int) -> dict[str, float]:
    """``time_call`` plus the minimum process CPU time of the timed calls.

    CPU seconds (all threads of this process) barely change when other processes compete
    for the cores, unlike wall time; work / CPU-second is the contention-robust rate.
    """
    cpu: list[float] = []

    def wrapped() -> None:
        c = time.process_time()
        fn()
        cpu.append(time.process_time() - c)

    t = time_call(wrapped, warmup=warmup, repeat=repeat)
    return {**t, "cpu_min_s": min(cpu[warmup:])}


def _matmul_peak(n: int, repeat: int) -> dict[str, float]:
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)
    t = _timed(lambda: f(a, b).block_until_ready(), warmup=2, repeat=repeat)
    return {"n": n, "seconds": t["min_s"], "flops_per_s": 2.0 * n**3 / t["min_s"],
            "flops_per_cpu_s": 2.0 * n**3 / t["cpu_min_s"]}


def _jax_step(cfg: Any, ids: Any, mask: Any) -> tuple[Any, dict[str, Any]]:
    """Our blocking step function (compiled and run once) and its facts."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from codescaler_jax.models.qwen3 import Qwen3RewardModel

    model = Qwen3RewardModel(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)

    # split/merge + jax.jit: the module graph is walked once at trace time. nnx.jit walks it
    # on every call (about 1 ms here): the same for an 8 s step, but not for small ones.
    @jax.jit
    def step(params, ids, mask):
        def loss_fn(params):
            return nnx.merge(graphdef, params)(ids, mask).mean()

        return jax.value_and_grad(loss_fn)(params)

    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    t0 = time.perf_counter()
    jax.block_until_ready(step(params, ids, mask))
    compile_s = time.perf_counter() - t0
    n_params = sum(x.size for x in jax.tree.leaves(params))
    n_embed = cfg.vocab_size * cfg.hidden_size
    return (lambda: jax.block_until_ready(step(params, ids, mask))), {
        "compile_and_first_step_s": compile_s, "params": n_params,
        "non_embedding_params": n_params - n_embed}


def _torch_step(args: argparse.Namespace, ids: Any, mask: Any) -> tuple[Any, dict[str, Any]]:
    """The transformers step function and its facts."""
    import torch
    import transformers

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    hf_cfg = transformers.Qwen3Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, head_dim=args.head_dim, num_labels=1, pad_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.Qwen3ForSequenceClassification(hf_cfg).float().train()
    ids_t, mask_t = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids_t, attention_mask=mask_t).logits.mean()
        loss.backward()

    return step, {"threads": torch.get_num_threads(),
            "attn_implementation": model.config._attn_implementation,
            "torch": torch.__version__, "transformers": transformers.__version__}


def _side(step: dict[str, Any], tokens: int, flops: float, peak: dict[str, Any]) -> dict[str, Any]:
    """Rates of one side from its interleaved times (medians over the rounds)."""
    t, c = step["median_s"], step["cpu_median_s"]
    return {"step": step, "tokens_per_s": tokens / t, "model_flops_per_s": flops / t,
            "mfu": flops / t / peak["flops_per_s"],
            "mfu_cpu_time": flops / c / peak["flops_per_cpu_s"]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _args(argv)
    flags = [] if args.no_xla_flags else XLA_CPU_FLAGS
    if flags:
        os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *flags]).strip()
    monitor = LoadMonitor()
    import jax
    import numpy as np

    from codescaler_jax.models.qwen3 import Qwen3Config

    backend = jax.default_backend()
    cfg = Qwen3Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, head_dim=args.head_dim, tie_word_embeddings=False,
        pad_token_id=0, param_dtype="float32", dtype="float32", scan_layers=args.scan_layers,
        attention=args.attention,
    )
    rng = np.random.RandomState(0)
    ids = rng.randint(1, args.vocab, size=(args.batch, args.seq)).astype(np.int32)
    mask = np.ones_like(ids)
    tokens = args.batch * args.seq

    matmul_n = args.matmul_size or (2048 if backend == "cpu" else 8192)
    peak = _matmul_peak(matmul_n, args.repeat + 2)
    ours_fn, ours = _jax_step(cfg, ids, mask)
    sides = {"ours": ours_fn}
    ref: dict[str, Any] | None = None
    if not args.skip_torch:
        sides["torch"], ref = _torch_step(args, ids, mask)
    timing = interleave(sides, rounds=args.repeat, warmup=args.warmup)
    # Measured again after the model run; the higher of the two is the peak (conservative MFU
    # when other processes share the machine).
    peak_after = _matmul_peak(matmul_n, args.repeat + 2)
    peak = {**max(peak, peak_after, key=lambda r: r["flops_per_s"]),
            "flops_per_s_before_and_after": [peak["flops_per_s"], peak_after["flops_per_s"]],
            "flops_per_cpu_s": max(peak["flops_per_cpu_s"], peak_after["flops_per_cpu_s"])}
    flops = model_flops(ours["non_embedding_params"], args.layers, args.batch, args.seq,
                        args.heads, args.head_dim)
    ours.update(_side(timing["sides"]["ours"], tokens, flops, peak))
    result: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "dtype": "float32",
        "tokens_per_step": tokens,
        "model_flops_per_step": flops,
        "flops_formula": "6 * non_embedding_params * batch * seq + "
                         "12 * layers * batch * seq^2 * heads * head_dim",
        "matmul_peak": peak,
        "xla_flags_set_by_benchmark": flags,
        "jit": "split/merge + jax.jit(value_and_grad)",
        "order": timing["order"],
        "ours": ours,
    }
    if ref is not None:
        ref.update(_side(timing["sides"]["torch"], tokens, flops, peak))
        result["torch"] = ref
        result["comparison"] = compare(timing, "ours", "torch")
        result["ratio_ours_over_torch"] = result["comparison"]["ratio_median_of_pairs"]

    path = write_json("model", result, args.out, monitor=monitor, force=args.force)
    rows = [("ours (jax)", ours)] + ([("torch (hf)", result["torch"])] if "torch" in result else [])
    print(f"device: {backend} {jax.devices()[0].device_kind}  "
          f"matmul peak {peak['flops_per_s'] / 1e9:.1f} GFLOP/s (n={peak['n']})")
    print(f"model: hidden {args.hidden} layers {args.layers} heads {args.heads}/{args.kv_heads} "
          f"seq {args.seq} batch {args.batch} vocab {args.vocab}; "
          f"{flops / 1e9:.1f} GFLOP/step")
    print(f"{'':12s} {'step s':>8s} {'tokens/s':>10s} {'GFLOP/s':>9s} {'MFU':>6s} "
          f"{'cpu s':>7s} {'MFU(cpu s)':>10s}   (medians of {args.repeat} interleaved rounds)")
    for name, r in rows:
        print(f"{name:12s} {r['step']['median_s']:8.3f} {r['tokens_per_s']:10.1f} "
              f"{r['model_flops_per_s'] / 1e9:9.1f} {r['mfu']:6.1%} "
              f"{r['step']['cpu_median_s']:7.2f} {r['mfu_cpu_time']:10.1%}")
    if "ratio_ours_over_torch" in result:
        print(f"ratio ours/torch (median of per-round ratios): "
              f"{result['ratio_ours_over_torch']:.2f}")
    print(f"load average {monitor.before[0]:.1f} -> {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores; wrote {path}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
