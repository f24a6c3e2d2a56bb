"""Serve a reward model over HTTP: ``python -m codescaler_jax.serve --rm DIR``.

    python -m codescaler_jax.serve --rm runs/rm_tiny --port 5000
    # OpenRLHF: --remote_rm_url http://HOST:5000/get_reward

Endpoints (see ``codescaler_jax.serving.protocol``):

- ``POST /get_reward``: OpenRLHF's remote-RM protocol, ``{"query", "prompts", "labels"}`` in,
  ``{"rewards", "scores", "extra_logs"}`` out; the reward is the reference's validity-preserving
  shaped RM score of the response's extracted code.
- ``POST /score``: ``{"items": [{"problem", "response"|"code"}]}`` in, raw ``scores``,
  ``rewards``, ``valid`` and extraction ``reasons`` out.
- ``GET /health``: batching and request counters.

Items of concurrent requests are batched (``--max-batch``, ``--max-wait-ms``) into a few fixed
shapes (row buckets x power-of-two length buckets), all compiled at start-up unless
``--no-warmup`` (then each on first use). Memory is bounded: every shape is compiled ahead of
time and its memory read from XLA before it runs; a length bucket takes at most the rows whose
pass fits ``--memory-budget-gb`` (default: half the host's available memory on CPU, 90% of the
free device memory on an accelerator) and larger batches are split, so the defaults (4,096
tokens, 32 rows) start on a small machine; when even one row at ``--max-length`` does not fit,
the server refuses to start and says what to lower. ``/health`` shows the resulting plan.

The front end is uvicorn + Starlette (``--backend uvicorn``, the stack of OpenRLHF's own RM
server) or the standard library's threaded ``http.server`` (``--backend stdlib``); both keep the
same endpoints, messages and limits. A connection must send each complete request within
``--request-timeout`` seconds (of opening or of its previous answer), however slowly it drips;
at ``--max-connections`` the connection that has waited longest for its request makes room for
a new one, so ``/health`` stays answerable.
A body over ``--max-body-mb`` is refused from its Content-Length before it is read (uvicorn also
accepts chunked bodies, cut at the limit).

When ready the server prints one JSON line ``{"event": "listening", "url": ...}`` on stdout
(with the real port when ``--port 0``). SIGTERM/SIGINT stop it cleanly.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time

from codescaler_jax.cli import guarded, positive_float, positive_int, shaping_choices
from codescaler_jax.errors import InputError


def _int_list(text: str) -> list[int]:
    """``--row-buckets 4,16,32`` -> ``[4, 16, 32]`` (argparse names the argument on error)."""
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return out


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m codescaler_jax.serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--rm", required=True, help="HF RM directory or train_rm run directory")
    p.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=5000, help="0 picks a free port")
    p.add_argument("--max-batch", type=positive_int, default=32,
                   help="most items per forward pass")
    p.add_argument(
        "--row-buckets", default=None, type=_int_list,
        help="comma-separated batch row counts to compile (default: data_ways*4^k, max-batch)",
    )
    p.add_argument("--max-wait-ms", type=positive_float, default=5.0, help="batch fill wait")
    p.add_argument("--max-length", type=positive_int, default=4096, help="RM input truncation")
    p.add_argument("--min-bucket", type=positive_int, default=64, help="smallest length bucket")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the RM's own)")
    p.add_argument("--shaping", default="softplus", choices=shaping_choices(),
                   help="reward shaping mode (softplus: the reference)")
    p.add_argument(
        "--prompt-format", default="auto", choices=["auto", "chatml", "raw"],
        help="how /get_reward prompts become the RM's problem text",
    )
    p.add_argument("--max-items", type=positive_int, default=256, help="items per request")
    p.add_argument("--max-body-mb", type=positive_float, default=8.0, help="request body limit")
    p.add_argument("--max-chars", type=positive_int, default=200_000,
                   help="longest string accepted")
    p.add_argument("--max-pending", type=positive_int, default=4096,
                   help="items waiting before 503")
    p.add_argument("--max-connections", type=positive_int, default=256,
                   help="open connections cap")
    p.add_argument("--socket-timeout", type=positive_float, default=60.0,
                   help="longest a single socket read or write may block (s)")
    p.add_argument("--request-timeout", type=positive_float, default=30.0,
                   help="longest a connection may take to send a complete request (s)")
    p.add_argument("--memory-budget-gb", type=positive_float, default=None,
                   help="most memory one forward pass may use per device (default: half the "
                   "host's available memory on CPU, 90%% of free device memory otherwise)")
    p.add_argument("--no-warmup", action="store_true",
                   help="compile shapes on first use (the memory check happens then too)")
    p.add_argument(
        "--backend", default="uvicorn", choices=["uvicorn", "stdlib"],
        help="HTTP front end: uvicorn + Starlette (default), or the standard library's "
        "threaded http.server; same endpoints, rules and limits",
    )
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


@guarded
def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    log = logging.getLogger("codescaler_jax.serve")

    from codescaler_jax.models.sharding import make_mesh
    from codescaler_jax.rm.scorer import resolve_rm_path
    from codescaler_jax.serving.protocol import Limits
    from codescaler_jax.serving.server import RewardService, default_memory_budget

    if args.backend == "uvicorn":
        try:
            from codescaler_jax.serving.asgi import RewardASGIServer as server_cls
        except ImportError as e:
            raise InputError(
                f"--backend uvicorn needs {e.name} (pip install -r requirements.txt), "
                "or use --backend stdlib"
            ) from None
    else:
        from codescaler_jax.serving.server import RewardHTTPServer as server_cls

    resolve_rm_path(args.rm)  # a wrong --rm fails now, naming the file, before any loading
    t0 = time.perf_counter()
    mesh = make_mesh()
    if args.memory_budget_gb is not None:
        budget, source = int(args.memory_budget_gb * 2**30), "--memory-budget-gb"
    else:
        budget, source = default_memory_budget(mesh)
    log.info("memory budget per forward pass: %.2f GiB (%s)", budget / 2**30, source)
    service = RewardService.from_pretrained(
        args.rm, max_batch=args.max_batch, row_buckets=args.row_buckets,
        max_length=args.max_length, min_bucket=args.min_bucket, dtype=args.dtype,
        tokenizer=args.tokenizer, mesh=mesh, max_wait_s=args.max_wait_ms / 1000,
        max_pending=args.max_pending, shaping=args.shaping, prompt_format=args.prompt_format,
        memory_budget_bytes=budget,
    )
    log.info("loaded %s in %.1f s; row buckets %s", args.rm, time.perf_counter() - t0,
             service.row_buckets)
    t1 = time.perf_counter()
    if args.no_warmup:
        # Still check now that the longest inputs fit at all (one program, compiled only).
        service.max_rows(args.max_length)
    else:
        n = service.warmup()
        log.info("compiled %d shapes in %.1f s (nothing run); rows per pass by length: %s", n,
                 time.perf_counter() - t1, service.memory_plan())
    limits = Limits(
        max_body_bytes=int(args.max_body_mb * (1 << 20)), max_items=args.max_items,
        max_chars=args.max_chars,
    )
    try:
        server = server_cls(
            (args.host, args.port), service, limits=limits, max_connections=args.max_connections,
            socket_timeout_s=args.socket_timeout, request_timeout_s=args.request_timeout,
        )
    except OSError as e:  # port in use, no permission, unknown host
        service.close()
        raise InputError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None

    def stop(signum, frame):
        # The stdlib server's shutdown() waits for serve_forever to return, so it must not run
        # on this thread. (uvicorn installs its own handlers while serving and calls this one
        # again once it has stopped, which is then harmless.)
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    host, port = server.server_address[:2]
    print(json.dumps({"event": "listening", "url": f"http://{host}:{port}"}), flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        service.close()
        log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
