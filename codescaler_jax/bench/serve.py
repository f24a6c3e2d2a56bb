"""Benchmark: reward-server throughput and latency at several batch limits, beside the scorer,
for each HTTP backend side by side.

    python -m codescaler_jax.bench.serve                 # random tiny RM, uvicorn vs stdlib
    python -m codescaler_jax.bench.serve --rm runs/rm_tiny --max-batches 1,8,32
    python -m codescaler_jax.bench.serve --backends uvicorn --rounds 1

For each batch limit B the server (``python -m codescaler_jax.serve --max-batch B``) runs as a
separate process on loopback; ``--clients`` threads each send ``--requests`` OpenRLHF-style
``/get_reward`` requests of ``--items`` responses (HumanEval prompts in ChatML with the canonical
solution as the response) over keep-alive connections. Reported: items/s, request latency p50 /
p99 and the mean batch the server formed. The reference, in this process on the same items: the
`RewardScorer` called directly with ``batch_size=B`` (no HTTP, no batching wait), i.e. what the
device alone sustains at that batch size.

Backends (``--backends``, ``serve --backend``): one server process of each runs at a time per
batch limit, and the load alternates between them ``--rounds`` times (A B A B ...), so both see
the same machine; reported per batch limit: each backend's median items/s and p50 / p99 over
the rounds, and the median of the per-round ratios (first backend / second). The scorer alone
is timed once per round before the backends, and ``server_over_scorer_median_of_pairs`` is the
median over rounds of (first backend's items/s / scorer items/s). The load is recorded by the
shared harness (bench/common.py).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from codescaler_jax.bench.common import LoadMonitor, add_harness_args, write_json

CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


def _start_server(
    rm: str, max_batch: int, max_length: int, backend: str = "uvicorn"
) -> tuple[subprocess.Popen, str, int]:
    cmd = [sys.executable, "-m", "codescaler_jax.serve", "--rm", rm, "--port", "0",
           "--max-batch", str(max_batch), "--max-length", str(max_length),
           "--log-level", "WARNING", "--backend", backend]
    repo = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")]))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    try:
        url = json.loads(lines.get(timeout=600))["url"]
    except queue.Empty:
        proc.kill()
        raise RuntimeError("server did not start within 600 s") from None
    host, port = url.removeprefix("http://").split(":")
    return proc, host, int(port)


def _load(host: str, port: int, payloads: list[bytes], clients: int, requests: int):
    """``clients`` threads x ``requests`` POSTs; returns (wall s, latencies s, failures)."""
    lat: list[float] = []
    fails: list[str] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        conn = http.client.HTTPConnection(host, port, timeout=300)
        mine = []
        for r in range(requests):
            body = payloads[(c * requests + r) % len(payloads)]
            t0 = time.perf_counter()
            conn.request("POST", "/get_reward", body=body,
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
            mine.append(time.perf_counter() - t0)
            if resp.status != 200:
                with lock:
                    fails.append(f"HTTP {resp.status}: {data[:200]!r}")
        conn.close()
        with lock:
            lat.extend(mine)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, lat, fails


def _health(host: str, port: int) -> dict[str, Any]:
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("GET", "/health")
    return json.loads(conn.getresponse().read())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m codescaler_jax.bench.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rm", default=None, help="RM directory (default: a random tiny RM)")
    p.add_argument("--max-batches", default="1,8,32", help="server batch limits to measure")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=20, help="requests per client")
    p.add_argument("--items", type=int, default=1, help="responses per request")
    p.add_argument("--max-length", type=int, default=1024, help="RM input truncation")
    p.add_argument("--backends", default="uvicorn,stdlib",
                   help="serve --backend values, measured side by side (the ratio: first / "
                   "second)")
    p.add_argument("--out", default=None, help="JSON path (default bench_results/serve.json)")
    add_harness_args(p, rounds=3)
    args = p.parse_args(argv)
    monitor = LoadMonitor()

    from codescaler_jax.data.problems import humaneval_problems
    from codescaler_jax.rm.scorer import RewardScorer

    tmp = None
    rm = args.rm
    if rm is None:
        from flax import nnx

        from codescaler_jax.bench.best_of_n import random_rm_config
        from codescaler_jax.data.tokenizer import load_tokenizer, qwen3_tokenizer_dir
        from codescaler_jax.models.hf_io import save_hf_model
        from codescaler_jax.models.qwen3 import Qwen3RewardModel

        tmp = tempfile.TemporaryDirectory()
        rm = str(Path(tmp.name) / "rm")
        cfg = random_rm_config("tiny", load_tokenizer("qwen3"), args.max_length)
        save_hf_model(Qwen3RewardModel(cfg, rngs=nnx.Rngs(0)), rm,
                      tokenizer_dir=qwen3_tokenizer_dir())

    problems = humaneval_problems()
    payloads, items = [], []
    for i in range(0, len(problems), args.items):
        group = problems[i : i + args.items]
        prompts = [CHAT.format(q.prompt) for q in group]
        queries = [CHAT.format(q.prompt) + f"```python\n{q.solution.strip()}\n```<|im_end|>"
                   for q in group]
        payloads.append(json.dumps({"query": queries, "prompts": prompts,
                                    "labels": [None] * len(group)}).encode())
        items += [(q.prompt, q.solution.strip()) for q in group]

    backends = [x for x in args.backends.split(",") if x]
    rows = []
    for b in [int(x) for x in args.max_batches.split(",")]:
        # reference: the scorer alone at this batch size, same process, same items; it and
        # the server's load alternate (scorer, server, scorer, ...) for --rounds rounds.
        scorer = RewardScorer.from_pretrained(rm, max_length=args.max_length, batch_size=b)
        probs, codes = [x[0] for x in items], [x[1] for x in items]
        scorer.score(probs, codes)  # compile every bucket used
        direct: list[float] = []
        servers = {}
        try:
            for be in backends:
                servers[be] = _start_server(rm, b, args.max_length, be)
                _load(*servers[be][1:], payloads, min(args.clients, 4), 2)  # warm connections
            runs: dict[str, list[dict[str, float]]] = {be: [] for be in backends}
            for _ in range(args.rounds):  # S A B S A B ...: every side sees the same machine
                t0 = time.perf_counter()
                scorer.score(probs, codes)
                direct.append(time.perf_counter() - t0)
                for be in backends:
                    host, port = servers[be][1:]
                    h0 = _health(host, port)
                    wall, lat, fails = _load(host, port, payloads, args.clients, args.requests)
                    h1 = _health(host, port)
                    runs[be].append({
                        "items_per_s": args.clients * args.requests * args.items / wall,
                        "p50_ms": 1e3 * float(np.percentile(lat, 50)),
                        "p99_ms": 1e3 * float(np.percentile(lat, 99)),
                        "mean_batch": (h1["items"] - h0["items"])
                        / max(h1["batches"] - h0["batches"], 1),
                        "failures": len(fails),
                    })
        finally:
            for proc, _, _ in servers.values():
                proc.terminate()
                proc.wait(timeout=60)
        del scorer
        direct_s = statistics.median(direct)
        n_items = args.clients * args.requests * args.items
        first = runs[backends[0]]
        per_round = [x["items_per_s"] / (len(items) / d) for x, d in zip(first, direct)]
        row: dict[str, Any] = {
            "max_batch": b,
            "items_per_round": n_items,
            "direct_scorer_items_per_s": len(items) / direct_s,
            "server_over_scorer_median_of_pairs": statistics.median(per_round),
            "rounds": args.rounds,
        }
        for be in backends:
            r = runs[be]
            row[be] = {
                "server_items_per_s": float(np.median([x["items_per_s"] for x in r])),
                "latency_p50_ms": float(np.median([x["p50_ms"] for x in r])),
                "latency_p99_ms": float(np.median([x["p99_ms"] for x in r])),
                "mean_server_batch": float(np.median([x["mean_batch"] for x in r])),
                "failures": sum(x["failures"] for x in r),
                "rounds": r,
            }
            print(f"max_batch {b:>3} {be:>8}: server {row[be]['server_items_per_s']:8.1f} "
                  f"items/s (p50 {row[be]['latency_p50_ms']:.1f} ms, p99 "
                  f"{row[be]['latency_p99_ms']:.1f} ms, mean batch "
                  f"{row[be]['mean_server_batch']:.1f}, {row[be]['failures']} failures) | "
                  f"scorer alone {row['direct_scorer_items_per_s']:8.1f} items/s", flush=True)
        if len(backends) == 2:
            x, y = (runs[be] for be in backends)
            ratio = {k: float(np.median([u[k] / v[k] for u, v in zip(x, y)]))
                     for k in ("items_per_s", "p50_ms", "p99_ms")}
            row[f"{backends[0]}_over_{backends[1]}"] = ratio
            print(f"max_batch {b:>3} {backends[0]} / {backends[1]} (median of {args.rounds} "
                  f"paired rounds): items/s {ratio['items_per_s']:.2f}x, p50 "
                  f"{ratio['p50_ms']:.2f}x, p99 {ratio['p99_ms']:.2f}x", flush=True)
        rows.append(row)
    payload = {
        "rm": args.rm or "random tiny (configs/rm_tiny.yaml architecture)",
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "results": rows,
    }
    path = write_json("serve", payload, args.out, monitor=monitor, force=args.force)
    print(f"wrote {path}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
