"""Benchmark: reward-server throughput and latency at several batch limits, beside the scorer.

    python -m codescaler_jax.bench.serve                 # random tiny RM
    python -m codescaler_jax.bench.serve --rm runs/rm_tiny --max-batches 1,8,32

For each batch limit B the server (``python -m codescaler_jax.serve --max-batch B``) runs as a
separate process on loopback; ``--clients`` threads each send ``--requests`` OpenRLHF-style
``/get_reward`` requests of ``--items`` responses (HumanEval prompts in ChatML with the canonical
solution as the response) over keep-alive connections. Reported: items/s, request latency p50 /
p99 and the mean batch the server formed. The reference, in this process on the same items: the
`RewardScorer` called directly with ``batch_size=B`` (no HTTP, no batching wait), i.e. what the
device alone sustains at that batch size. The two alternate (scorer, server load, scorer, ...)
for ``--rounds`` rounds; the ratio server / scorer is the median of the per-round ratios.
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


def _start_server(rm: str, max_batch: int, max_length: int) -> tuple[subprocess.Popen, str, int]:
    cmd = [sys.executable, "-m", "codescaler_jax.serve", "--rm", rm, "--port", "0",
           "--max-batch", str(max_batch), "--max-length", str(max_length),
           "--log-level", "WARNING"]
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
    p.add_argument("--out", default=None, help="JSON path (default bench_results/serve.json)")
    add_harness_args(p, rounds=2)
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

    rows = []
    for b in [int(x) for x in args.max_batches.split(",")]:
        # reference: the scorer alone at this batch size, same process, same items; it and
        # the server's load alternate (scorer, server, scorer, ...) for --rounds rounds.
        scorer = RewardScorer.from_pretrained(rm, max_length=args.max_length, batch_size=b)
        probs, codes = [x[0] for x in items], [x[1] for x in items]
        scorer.score(probs, codes)  # compile every bucket used
        direct, walls, lat, fails = [], [], [], []
        proc, host, port = _start_server(rm, b, args.max_length)
        try:
            _load(host, port, payloads, min(args.clients, 4), 2)  # warm the connections
            h0 = _health(host, port)
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                scorer.score(probs, codes)
                direct.append(time.perf_counter() - t0)
                wall, lat_r, fails_r = _load(host, port, payloads, args.clients, args.requests)
                walls.append(wall)
                lat += lat_r
                fails += fails_r
            h1 = _health(host, port)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        del scorer
        wall = sorted(walls)[len(walls) // 2]
        direct_s = sorted(direct)[len(direct) // 2]
        n_items = args.clients * args.requests * args.items
        # per round: server items/s over scorer-alone items/s
        per_round = [(n_items / w) / (len(items) / d) for w, d in zip(walls, direct, strict=True)]
        batches = h1["batches"] - h0["batches"]
        row = {
            "max_batch": b,
            "items": n_items,
            "wall_s": wall,
            "server_items_per_s": n_items / wall,
            "latency_p50_ms": 1e3 * float(np.percentile(lat, 50)),
            "latency_p99_ms": 1e3 * float(np.percentile(lat, 99)),
            "mean_server_batch": (h1["items"] - h0["items"]) / max(batches, 1),
            "failures": len(fails),
            "direct_scorer_items_per_s": len(items) / direct_s,
            "server_over_scorer_median_of_pairs": statistics.median(per_round),
            "rounds": args.rounds,
        }
        rows.append(row)
        print(f"max_batch {b:>3}: server {row['server_items_per_s']:8.1f} items/s "
              f"(p50 {row['latency_p50_ms']:.1f} ms, p99 {row['latency_p99_ms']:.1f} ms, "
              f"mean batch {row['mean_server_batch']:.1f}, {len(fails)} failures) | "
              f"scorer alone {row['direct_scorer_items_per_s']:8.1f} items/s", flush=True)
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
