"""Attention forward + backward on one device: dense ``xla``, blockwise ``chunked`` and
``jax.nn.dot_product_attention``, side by side at growing sequence lengths.

    python -m codescaler_jax.bench.attention                       # T = 512 .. 8192, CPU
    python -m codescaler_jax.bench.attention --lengths 256,512 --repeat 1 --decode-lengths ""
    python -m codescaler_jax.bench.attention --blocks 256x256,512x512,1024x512   # tune chunked

Each side computes ``grad(sum(attention(q, k, v) * w))`` with respect to q, k and v (causal,
grouped-query heads, every key valid), jitted. Per length the report gives, per side, the
compiled temporaries (``memory_analysis().temp_size_in_bytes``, XLA's own number for the
program) and tokens/s (``batch * T / step seconds``, the minimum over ``--repeat`` timed calls,
plus the process CPU seconds of the fastest call). The sides run interleaved (A B C A B C ...)
so that load from other processes hits them alike, and ``os.getloadavg()`` is recorded before
and after. A side whose program needs more than ``--max-temp-gib`` of temporaries is compiled
(to report its memory) but not run.

``jax_nn`` is ``jax.nn.dot_product_attention(..., is_causal=True, implementation="xla")``:
jax's own dense path, the same work as our ``xla`` in another layout.

``--decode-lengths`` also times one decode step (1 query over a cache of S slots, forward
only, the cache index traced as in the sampler) for ``xla`` and ``chunked``.

The ``summary`` gives, per length, xla's time over chunked's (wall and CPU seconds), and the
shortest length from which ``chunked`` wins at every measured length above it: that is where
``auto`` switches on CPU (``models.attention.CPU_CHUNKED_MIN_KV_LEN``).
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from typing import Any

from codescaler_jax.bench.common import LoadMonitor, add_harness_args


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m codescaler_jax.bench.attention", description=__doc__.split("\n")[0]
    )
    p.add_argument("--lengths", default="512,1024,2048,4096,8192")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--blocks", default="256x256",
                   help="chunked block sizes block_qxblock_kv, comma-separated (one side each)")
    p.add_argument("--repeat", type=int, default=3, help="timed calls per side and length")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--max-temp-gib", type=float, default=5.0,
                   help="compile but do not run a side needing more temporaries than this")
    p.add_argument("--decode-lengths", default="2048,8192,32768",
                   help="cache lengths for the decode-step comparison ('' to skip)")
    p.add_argument("--no-jax-nn", action="store_true", help="skip jax.nn.dot_product_attention")
    p.add_argument("--out", default=None)
    add_harness_args(p)
    return p.parse_args(argv)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _sides(args: argparse.Namespace) -> dict[str, Any]:
    """name -> attention function ``(q, k, v, kv_valid) -> out``."""
    import jax

    from codescaler_jax.models.attention import chunked_attention, dot_product_attention

    sides: dict[str, Any] = {
        "xla": lambda q, k, v, valid: dot_product_attention(
            q, k, v, kv_valid=valid, implementation="xla"),
    }
    for spec in args.blocks.split(","):
        bq, bk = (int(x) for x in spec.lower().split("x"))
        name = "chunked" if len(args.blocks.split(",")) == 1 else f"chunked_{bq}x{bk}"
        sides[name] = functools.partial(chunked_attention, block_q=bq, block_kv=bk)
    if not args.no_jax_nn:
        sides["jax_nn"] = lambda q, k, v, valid: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="xla")
    return sides


def _loss(attn, valid, w, q, k, v):
    import jax.numpy as jnp

    return jnp.sum(attn(q, k, v, valid).astype(jnp.float32) * w)


def _decode_step(impl, block_kv, q, k, v, valid, index):
    from codescaler_jax.models.attention import dot_product_attention

    return dot_product_attention(q, k, v, kv_valid=valid, q_offset=index, implementation=impl,
                                 block_kv=block_kv)


def _blocking(fn, *args):
    import jax

    return jax.block_until_ready(fn(*args))


def _timed_interleaved(fns: dict[str, Any], warmup: int, repeat: int) -> dict[str, dict]:
    """Wall and CPU seconds of each zero-argument blocking ``fn``, in rounds A B C, A B C ...
    (``common.interleave``); per side the per-round lists and their minimum / median."""
    from codescaler_jax.bench.common import interleave

    if not fns:
        return {}
    timing = interleave(fns, rounds=repeat, warmup=warmup)
    out = {}
    for name, t in timing["sides"].items():
        best = min(range(repeat), key=lambda i: t["wall_s"][i])
        out[name] = {"min_s": t["min_s"], "median_s": t["median_s"],
                     "cpu_s_of_min": t["cpu_s"][best], "wall_s": t["wall_s"],
                     "cpu_s": t["cpu_s"], "repeat": repeat}
    return out


def _train_lengths(args: argparse.Namespace, sides: dict[str, Any]) -> list[dict[str, Any]]:
    import jax
    import jax.numpy as jnp

    dtype = jnp.dtype(args.dtype)
    b, n, kh, d = args.batch, args.heads, args.kv_heads, args.head_dim
    rows = []
    for t in _ints(args.lengths):
        keys = jax.random.split(jax.random.key(t), 4)
        q = jax.random.normal(keys[0], (b, t, n, d), dtype)
        k = jax.random.normal(keys[1], (b, t, kh, d), dtype)
        v = jax.random.normal(keys[2], (b, t, kh, d), dtype)
        w = jax.random.normal(keys[3], (b, t, n, d), dtype)
        valid = jnp.ones((b, t), bool)
        row: dict[str, Any] = {"seq_len": t, "tokens_per_step": b * t, "sides": {}}
        runnable = {}
        for name, attn in sides.items():
            loss = functools.partial(_loss, attn, valid, w)
            step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
            t0 = time.perf_counter()
            compiled = step.lower(q, k, v).compile()
            temp = compiled.memory_analysis().temp_size_in_bytes
            info = {"compile_s": round(time.perf_counter() - t0, 2),
                    "temp_gib": round(temp / 2**30, 4)}
            if temp > args.max_temp_gib * 2**30:
                info["skipped"] = f"needs {temp / 2**30:.2f} GiB > --max-temp-gib"
            else:
                runnable[name] = functools.partial(_blocking, compiled, q, k, v)
            row["sides"][name] = info
        for name, t_ in _timed_interleaved(runnable, args.warmup, args.repeat).items():
            row["sides"][name].update(t_, tokens_per_s=round(b * t / t_["min_s"], 1))
        rows.append(row)
        print(_row_line(row), flush=True)
    return rows


def _decode_lengths(args: argparse.Namespace) -> list[dict[str, Any]]:
    import jax
    import jax.numpy as jnp

    from codescaler_jax.models.attention import CHUNKED_BLOCK_KV

    dtype = jnp.dtype(args.dtype)
    b, n, kh, d = args.batch, args.heads, args.kv_heads, args.head_dim
    bk = int(args.blocks.split(",")[0].lower().split("x")[1]) if args.blocks else CHUNKED_BLOCK_KV
    rows = []
    for s in _ints(args.decode_lengths):
        keys = jax.random.split(jax.random.key(s), 3)
        q = jax.random.normal(keys[0], (b, 1, n, d), dtype)
        k = jax.random.normal(keys[1], (b, s, kh, d), dtype)
        v = jax.random.normal(keys[2], (b, s, kh, d), dtype)
        index = jnp.int32(s - 1)  # the last slot: the whole cache is visible
        valid = jnp.ones((b, s), bool)
        fns, row = {}, {"cache_len": s, "sides": {}}
        for impl in ("xla", "chunked"):
            step = jax.jit(functools.partial(_decode_step, impl, bk))
            compiled = step.lower(q, k, v, valid, index).compile()
            row["sides"][impl] = {
                "temp_gib": round(compiled.memory_analysis().temp_size_in_bytes / 2**30, 4)}
            fns[impl] = functools.partial(_blocking, compiled, q, k, v, valid, index)
        for name, t_ in _timed_interleaved(fns, max(args.warmup, 1), max(args.repeat, 5)).items():
            row["sides"][name].update(t_)
        rows.append(row)
        print(f"decode S={s}: " + ", ".join(
            f"{k} {v_['min_s'] * 1e3:.2f} ms" for k, v_ in row["sides"].items()), flush=True)
    return rows


def _row_line(row: dict[str, Any]) -> str:
    parts = []
    for name, info in row["sides"].items():
        rate = info.get("tokens_per_s")
        parts.append(f"{name} {rate:,.0f} tok/s {info['temp_gib']:.3f} GiB" if rate else
                     f"{name} skipped ({info['temp_gib']:.2f} GiB)")
    return f"T={row['seq_len']}: " + "; ".join(parts)


def summarize(rows: list[dict[str, Any]], chunked: str = "chunked") -> dict[str, Any]:
    """Per length the xla/chunked time ratio (> 1: chunked faster; the median of the per-round
    ratios of the interleaved calls), in wall seconds and in process CPU seconds, and for each
    the shortest length from which chunked is at least as fast as xla at every longer measured
    length (None if it never is). CPU seconds move far
    less than wall time when other processes share the cores."""
    out: dict[str, Any] = {}
    from codescaler_jax.bench.common import median_of_pair_ratios

    for key, label in (("wall_s", "wall"), ("cpu_s", "cpu")):
        ratios: dict[int, float | None] = {}
        for row in rows:
            c, x = row["sides"].get(chunked, {}), row["sides"].get("xla", {})
            if key in c and key in x:
                ratios[row["seq_len"]] = round(median_of_pair_ratios(c[key], x[key]), 3)
            elif key in c:
                ratios[row["seq_len"]] = None  # xla too big to run: chunked wins by default
        switch = None
        for t in sorted(ratios, reverse=True):
            r = ratios[t]
            if r is not None and r < 1.0:
                break
            switch = t
        out[f"xla_over_chunked_{label}_s"] = {str(t): r for t, r in ratios.items()}
        out[f"chunked_wins_from_seq_len_{label}"] = switch
    return out


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    import jax

    from codescaler_jax.bench.common import write_json

    monitor = LoadMonitor()
    load_before = monitor.before
    sides = _sides(args)
    rows = _train_lengths(args, sides)
    decode = _decode_lengths(args) if args.decode_lengths else []
    load_after = os.getloadavg()
    chunked_names = [s for s in sides if s.startswith("chunked")]
    payload = {
        "what": "attention forward + backward (grad wrt q, k, v), causal, GQA",
        "shapes": {"batch": args.batch, "heads": args.heads, "kv_heads": args.kv_heads,
                   "head_dim": args.head_dim, "dtype": args.dtype},
        "backend": jax.default_backend(),
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "lengths": rows,
        "decode_step": decode,
        "summary": {name: summarize(rows, name) for name in chunked_names},
    }
    path = write_json("attention", payload, args.out, monitor=monitor, force=args.force)
    print(f"summary: {payload['summary']}\nload {load_before} -> {load_after}\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
