"""Reward-model forward+backward throughput: our JAX Qwen3 vs transformers (PyTorch), same run.

    python -m codescaler_jax.bench.model [--hidden 512 --layers 8 --seq 512 --batch 8]
    python -m codescaler_jax.bench.model --small          # a quick setting

Both sides build the same architecture (float32, random weights), run
``loss = mean(scores)`` forward and backward over a full ``[batch, seq]`` batch, and report
tokens/s. The device's matmul peak is measured in the same process (a large jitted float32
matmul), and model FLOPs per step use the PaLM-style count

    flops = 6 * N * B * T + 12 * L * B * T^2 * (heads * head_dim)

with N the non-embedding parameter count (the embedding lookup does no matmul), L layers, B
batch, T sequence length (attention counted over the full T x T score matrix, as computed).
MFU = flops / step_time / matmul_peak. Because other processes may share the machine, the
same ratio is also reported in process CPU seconds (``mfu_cpu_time`` = work per CPU-second
of the step / work per CPU-second of the matmul), which competition for cores barely moves;
torch's OpenMP threads spin while waiting, so its CPU-second figure is a lower bound.

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

from codescaler_jax.bench.common import require_torch

require_torch("bench.model")  # before any work: the comparison needs torch

# XLA reads XLA_FLAGS once, at backend start: set before jax is imported (this process only).
# Empty on purpose: on the 2-core AMD EPYC dev machine none of --xla_cpu_use_onednn=true,
# --xla_cpu_experimental_xnn_fusion_type=dot[,eltwise,reduce], --xla_cpu_enable_fast_math=true,
# --xla_cpu_use_xnnpack=false, --xla_cpu_experimental_ynn_fusion_type=-dot or
# --xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY changed the CPU
# seconds of a step by more than the noise (a few %). Add flags here to try others.
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
    p.add_argument("--repeat", type=int, default=3, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--matmul-size", type=int, default=None, help="default 2048 CPU, 8192 GPU/TPU")
    p.add_argument("--small", action="store_true",
                   help="hidden 256, 4 layers, 4 heads, 2 KV heads, seq 256, batch 4")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--torch-threads", type=int, default=None, help="default: torch's own")
    p.add_argument("--no-xla-flags", action="store_true",
                   help="do not set XLA_CPU_FLAGS (to measure their effect)")
    p.add_argument("--out", default=None)
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
    from codescaler_jax.bench.common import time_call

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


def _bench_jax(cfg: Any, ids: Any, mask: Any, warmup: int, repeat: int) -> dict[str, Any]:
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
    t = _timed(lambda: jax.block_until_ready(step(params, ids, mask)), warmup, repeat)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    n_embed = cfg.vocab_size * cfg.hidden_size
    return {"step": t, "compile_and_first_step_s": compile_s, "params": n_params,
            "non_embedding_params": n_params - n_embed}


def _bench_torch(args: argparse.Namespace, ids: Any, mask: Any, warmup: int,
                 repeat: int) -> dict[str, Any]:
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

    t = _timed(step, warmup, repeat)
    return {"step": t, "threads": torch.get_num_threads(),
            "attn_implementation": model.config._attn_implementation,
            "torch": torch.__version__, "transformers": transformers.__version__}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _args(argv)
    flags = [] if args.no_xla_flags else XLA_CPU_FLAGS
    if flags:
        os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *flags]).strip()
    load_before = os.getloadavg()
    import jax
    import numpy as np

    from codescaler_jax.bench.common import write_json
    from codescaler_jax.models.qwen3 import Qwen3Config

    backend = jax.default_backend()
    cfg = Qwen3Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, head_dim=args.head_dim, tie_word_embeddings=False,
        pad_token_id=0, param_dtype="float32", dtype="float32",
    )
    rng = np.random.RandomState(0)
    ids = rng.randint(1, args.vocab, size=(args.batch, args.seq)).astype(np.int32)
    mask = np.ones_like(ids)
    tokens = args.batch * args.seq

    matmul_n = args.matmul_size or (2048 if backend == "cpu" else 8192)
    peak = _matmul_peak(matmul_n, args.repeat + 2)
    ours = _bench_jax(cfg, ids, mask, args.warmup, args.repeat)
    # Measured again after the model run; the higher of the two is the peak (conservative MFU
    # when other processes share the machine).
    peak_after = _matmul_peak(matmul_n, args.repeat + 2)
    peak = {**max(peak, peak_after, key=lambda r: r["flops_per_s"]),
            "flops_per_s_before_and_after": [peak["flops_per_s"], peak_after["flops_per_s"]],
            "flops_per_cpu_s": max(peak["flops_per_cpu_s"], peak_after["flops_per_cpu_s"])}
    flops = model_flops(ours["non_embedding_params"], args.layers, args.batch, args.seq,
                        args.heads, args.head_dim)
    ours_s = ours["step"]["min_s"]
    ours.update(tokens_per_s=tokens / ours_s, model_flops_per_s=flops / ours_s,
                mfu=flops / ours_s / peak["flops_per_s"],
                mfu_cpu_time=flops / ours["step"]["cpu_min_s"] / peak["flops_per_cpu_s"])
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
        "ours": ours,
    }
    if not args.skip_torch:
        ref = _bench_torch(args, ids, mask, args.warmup, args.repeat)
        ref_s = ref["step"]["min_s"]
        ref.update(tokens_per_s=tokens / ref_s, model_flops_per_s=flops / ref_s,
                   mfu=flops / ref_s / peak["flops_per_s"],
                   mfu_cpu_time=flops / ref["step"]["cpu_min_s"] / peak["flops_per_cpu_s"])
        result["torch"] = ref
        result["ratio_ours_over_torch"] = ours["tokens_per_s"] / ref["tokens_per_s"]

    # Other processes on the machine skew both sides; the 1-minute load average says how much.
    result["load_average_1min"] = {"before": load_before[0], "after": os.getloadavg()[0],
                                   "cpu_count": os.cpu_count()}
    path = write_json("model", result, args.out)
    rows = [("ours (jax)", ours)] + ([("torch (hf)", result["torch"])] if "torch" in result else [])
    print(f"device: {backend} {jax.devices()[0].device_kind}  "
          f"matmul peak {peak['flops_per_s'] / 1e9:.1f} GFLOP/s (n={peak['n']})")
    print(f"model: hidden {args.hidden} layers {args.layers} heads {args.heads}/{args.kv_heads} "
          f"seq {args.seq} batch {args.batch} vocab {args.vocab}; "
          f"{flops / 1e9:.1f} GFLOP/step")
    print(f"{'':12s} {'step s':>8s} {'tokens/s':>10s} {'GFLOP/s':>9s} {'MFU':>6s} "
          f"{'cpu s':>7s} {'MFU(cpu s)':>10s}")
    for name, r in rows:
        print(f"{name:12s} {r['step']['min_s']:8.3f} {r['tokens_per_s']:10.1f} "
              f"{r['model_flops_per_s'] / 1e9:9.1f} {r['mfu']:6.1%} "
              f"{r['step']['cpu_min_s']:7.2f} {r['mfu_cpu_time']:10.1%}")
    if "ratio_ours_over_torch" in result:
        print(f"ratio ours/torch: {result['ratio_ours_over_torch']:.2f}")
    print(f"load average {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores; wrote {path}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
