"""The reward service (extraction -> batched RM -> shaping) and its HTTP front end.

`RewardService` owns the device side: one `RewardScorer` per row bucket (all sharing the same
parameters), so a batch of ``n`` items runs at the smallest bucket ``>= n`` rows and at a
power-of-two length bucket: a handful of compiled shapes, none at request time once warmed up.
A `Batcher` merges items of concurrent requests. Code extraction (training mode: exactly one
fenced block that parses) runs in the request threads. Responses without code get reward 0,
exactly as validity-preserving shaping gives them; ``/get_reward`` does not run the RM on them,
``/score`` reports their raw RM score of ``(problem, "")``, as ``python -m codescaler_jax.score``
does (the reference scores "" for no code).

Memory: with a ``memory_budget_bytes``, every (rows, length) program is compiled ahead of time
and its memory read from XLA before it ever runs; a length bucket then takes at most the rows
that fit the budget per pass (a larger batch is split), and a model whose smallest pass at
``max_length`` does not fit is refused at start-up with what to lower.

`RewardHTTPServer` (``serve --backend stdlib``; the default front end is uvicorn + Starlette,
`codescaler_jax.serving.asgi`, with the same rules) is a standard-library
``ThreadingHTTPServer`` (HTTP/1.1, keep-alive): the Content-Length is checked against the limit
before a byte of the body is read, open connections are capped, each socket has a timeout, and
every refusal is a JSON ``{"error": message}`` with a 4xx/5xx status; no request can stop the
server. Slow clients cannot hold it: a connection must deliver each complete request within
``request_timeout_s`` of opening or of its previous answer (else it is closed), and at the
connection cap a new connection replaces the one that has waited longest for its request, so
``/health`` and fast clients are still served. A client that goes away mid-request costs one log
line.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import sys
import threading
import time
from collections.abc import Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from codescaler_jax.data.tokenizer import bucket_length
from codescaler_jax.errors import InputError
from codescaler_jax.serving.batcher import Batcher, Overloaded
from codescaler_jax.serving.protocol import (
    Item,
    Limits,
    RequestCounts,
    RequestError,
    parse_get_reward,
    parse_score,
)

log = logging.getLogger("codescaler_jax.serve")


def default_memory_budget(mesh) -> tuple[int, str]:
    """``(bytes, where from)``: what one forward pass may use per device beyond the parameters
    when ``--memory-budget-gb`` is not given. An accelerator: 90% of its free memory. CPU
    devices share the host's memory: half of what the host has available, split between them.
    """
    device = mesh.devices.flat[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        free = int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
        return int(0.9 * free), f"90% of the free memory of one {device.device_kind}"
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:
        import os

        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    n = mesh.devices.size
    return int(0.5 * available / n), (
        f"half the host's available memory ({available / 2**30:.1f} GiB)"
        + (f" over {n} devices" if n > 1 else "")
    )


def default_row_buckets(max_batch: int, data_ways: int) -> tuple[int, ...]:
    """Row counts to compile: ``data_ways * 4**k`` below ``max_batch``, then ``max_batch``."""
    if max_batch % data_ways:
        raise InputError(f"max_batch={max_batch} must be a multiple of data ways {data_ways}")
    out, b = [], data_ways
    while b < max_batch:
        out.append(b)
        b *= 4
    out.append(max_batch)
    return tuple(out)


class RewardService:
    """Scores items for the server: extraction, batched RM forward, reward shaping.

    Args:
        scorers: ``{rows: RewardScorer}``; each scorer's ``batch_size`` is its row count.
        max_wait_s: how long a batch may wait to fill (see `Batcher`).
        max_pending: most items waiting for the device at once.
        shaping: a ``codescaler_jax.rm.shaping`` mode (``softplus`` is the reference's).
        prompt_format: how ``/get_reward`` prompts become problems (see `protocol`).
        end_markers: strings stripped from the end of ``/get_reward`` responses.
        pass_overhead_tokens: the fixed cost of one forward pass (launch, reading the weights),
            in tokens of work; decides when a mixed-length batch is split by length bucket.
        memory_budget_bytes: most memory one forward pass may use beyond the parameters (per
            device, as XLA counts it); None: no limit. See `max_rows`.
    """

    def __init__(
        self,
        scorers: dict[int, Any],
        *,
        max_wait_s: float = 0.005,
        max_pending: int = 4096,
        shaping: str = "softplus",
        prompt_format: str = "auto",
        end_markers: Sequence[str] = (),
        request_timeout_s: float = 300.0,
        pass_overhead_tokens: int = 256,
        memory_budget_bytes: int | None = None,
    ):
        from codescaler_jax.rm.shaping import SHAPERS

        if shaping not in SHAPERS:
            raise ValueError(f"unknown shaping {shaping!r}; one of {sorted(SHAPERS)}")
        self.scorers = dict(sorted(scorers.items()))
        self.row_buckets = tuple(self.scorers)
        self.max_batch = self.row_buckets[-1]
        self.shaping = shaping
        self.prompt_format = prompt_format
        self.end_markers = tuple(end_markers)
        self.request_timeout_s = request_timeout_s
        self.pass_overhead_tokens = pass_overhead_tokens
        self.memory_budget_bytes = memory_budget_bytes
        self._max_rows: dict[int, int] = {}
        self._too_big: dict[int, tuple[int, int]] = {}  # length -> (rows, bytes) that did not fit
        self.batcher = Batcher(
            self._score_batch, max_batch=self.max_batch, max_wait_s=max_wait_s,
            max_pending=max_pending,
        )

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        max_batch: int = 32,
        row_buckets: Sequence[int] | None = None,
        max_length: int = 4096,
        min_bucket: int = 64,
        dtype: str | None = None,
        mesh=None,
        tokenizer: str | None = None,
        **kwargs: Any,
    ) -> RewardService:
        """Load the RM once and build a scorer per row bucket on ``mesh`` (default: all
        devices). ``path`` is what `RewardScorer.from_pretrained` takes: an HF RM directory, or a
        train_rm run directory (its ``hf/`` export, else its latest Orbax checkpoint)."""
        from codescaler_jax.rm.scorer import RewardScorer, load_rm

        # Loaded once, shared by the scorers of every row bucket.
        model, tok, mesh = load_rm(path, tokenizer=tokenizer, mesh=mesh, dtype=dtype)
        data_ways = mesh.shape["data"] * mesh.shape["fsdp"]
        rows = tuple(row_buckets) if row_buckets else default_row_buckets(max_batch, data_ways)
        scorers = {
            r: RewardScorer(
                model, tok, mesh=mesh, max_length=max_length, batch_size=r, min_bucket=min_bucket
            )
            for r in rows
        }
        markers = [m for m in (tok.eos_token, tok.pad_token) if m]
        kwargs.setdefault("end_markers", markers)
        return cls(scorers, **kwargs)

    # ---- device side (worker thread only) ----------------------------------------------------

    def _rows(self, n: int) -> int:
        return next(r for r in self.row_buckets if r >= n)

    def _score_batch(self, problems: Sequence[str], codes: Sequence[str]) -> np.ndarray:
        """Scores ``[n]`` of one collected batch, in one forward pass or one per length bucket.

        Items of concurrent requests arrive in no length order, and one pass pads every row to
        the longest. When passes per length bucket cost less (each pass: rows x length tokens of
        work plus ``pass_overhead_tokens``) the batch is split by bucket; every shape is still
        one of the compiled buckets.
        """
        first = self.scorers[self.row_buckets[0]]
        seqs = first.encode(problems, codes)
        lengths = [bucket_length(max(len(s), 1), first.buckets) for s in seqs]
        groups: dict[int, list[int]] = {}
        for i, length in enumerate(lengths):
            groups.setdefault(length, []).append(i)
        everything = list(range(len(seqs)))
        if self._cost(everything, max(lengths)) <= sum(
            self._cost(idx, length) for length, idx in groups.items()
        ):
            groups = {max(lengths): everything}
        out = np.zeros(len(seqs), np.float32)
        for length, idx in groups.items():
            for chunk in self._chunks(idx, length):
                out[chunk] = self.scorers[self._rows(len(chunk))].score_ids(
                    [seqs[i] for i in chunk]
                )
        return out

    def _chunks(self, idx: list[int], length: int) -> list[list[int]]:
        """``idx`` cut into passes of at most `max_rows` ``(length)`` items."""
        cap = self.max_rows(length)
        return [idx[i : i + cap] for i in range(0, len(idx), cap)]

    def _cost(self, idx: list[int], length: int) -> int:
        return sum(
            self._rows(len(c)) * length + self.pass_overhead_tokens
            for c in self._chunks(idx, length)
        )

    def max_rows(self, length: int) -> int:
        """The most rows one pass at length bucket ``length`` may take: the largest row bucket
        whose compiled program fits ``memory_budget_bytes`` (all of them without a budget).
        Compiles (never runs) the programs it checks; they are the ones later passes run.
        Raises `InputError` when even the smallest row bucket does not fit."""
        cap = self._max_rows.get(length)
        if cap is not None:
            return cap
        cap = 0
        for rows in self.row_buckets:
            if self.memory_budget_bytes is not None:
                need = self.scorers[rows].pass_bytes(length)
                if need > self.memory_budget_bytes:
                    self._too_big[length] = (rows, need)
                    break
            cap = rows
        if cap == 0:
            rows, need = self._too_big[length]
            raise InputError(
                f"one forward pass of {rows} rows x {length} tokens needs {need / 2**30:.2f} GiB, "
                f"more than the memory budget of {self.memory_budget_bytes / 2**30:.2f} GiB: "
                f"lower --max-length, or raise --memory-budget-gb"
            )
        if cap < self.max_batch:
            rows, need = self._too_big[length]
            log.info(
                "length %d: at most %d rows per pass (%d rows would need %.2f GiB, over the "
                "%.2f GiB budget); lower --max-length or --max-batch, or raise "
                "--memory-budget-gb, to change this", length, cap, rows, need / 2**30,
                self.memory_budget_bytes / 2**30,
            )
        self._max_rows[length] = cap
        return cap

    def memory_plan(self) -> dict[str, int]:
        """``{length bucket: most rows per pass}`` as far as known (all after `warmup`)."""
        return {str(k): v for k, v in sorted(self._max_rows.items())}

    def warmup(self) -> int:
        """Compile every (row bucket, length bucket) program that fits the memory budget now,
        longest first (a model too large for ``max_length`` is refused before the rest is
        compiled); nothing is run. Returns how many programs were compiled."""
        first = self.scorers[self.row_buckets[0]]
        count = 0
        for length in sorted(first.buckets, reverse=True):
            cap = self.max_rows(length)
            for rows in self.row_buckets:
                if rows <= cap:
                    self.scorers[rows].compiled(length)
                    count += 1
        return count

    def _shape(self, scores: np.ndarray, valid: np.ndarray) -> np.ndarray:
        from codescaler_jax.rm.shaping import shape_rewards_jit

        n = len(scores)
        # Pad to a power of two so the jitted shaper compiles a few shapes, not one per size.
        size = 1 << max(n - 1, 0).bit_length()
        s = np.zeros(size, np.float32)
        v = np.zeros(size, bool)
        s[:n], v[:n] = scores, valid
        return np.asarray(shape_rewards_jit(s, v, mode=self.shaping))[:n]

    # ---- request side (handler threads) ------------------------------------------------------

    def evaluate(self, items: Sequence[Item], *, score_invalid: bool = False) -> dict[str, Any]:
        """Extract, score and shape ``items``.

        Returns ``{"scores": [n] f32, "rewards": [n] f32, "valid": [n] bool, "reasons": [n]
        str}``. Items without valid code are scored as ``(problem, "")`` when
        ``score_invalid``, else not run through the RM (score 0); their reward is 0 either way.
        """
        from codescaler_jax.code.extract import extract_code

        n = len(items)
        codes, valid, reasons = [], np.zeros(n, bool), []
        for i, it in enumerate(items):
            if it.is_code:
                codes.append(it.text)
                valid[i] = True
                reasons.append("given")
                continue
            ext = extract_code(it.text, mode="train")
            codes.append(ext.code)
            valid[i] = ext.valid
            reasons.append(ext.reason)
        idx = np.arange(n) if score_invalid else np.flatnonzero(valid)
        scores = np.zeros(n, np.float32)
        if idx.size:
            scores[idx] = self.batcher.submit(
                [items[i].problem for i in idx], [codes[i] for i in idx],
                timeout=self.request_timeout_s,
            )
        return {
            "scores": scores,
            "rewards": self._shape(scores, valid),
            "valid": valid,
            "reasons": reasons,
        }

    def get_reward(self, data: bytes | dict[str, Any], limits: Limits) -> dict[str, Any]:
        """The OpenRLHF ``/get_reward`` answer: rewards = scores = shaped RM rewards
        (``extra_logs.rm_score`` is 0 for responses without code: they are not run through
        the RM, their reward is 0 whatever their score)."""
        items = parse_get_reward(
            data, limits, prompt_format=self.prompt_format, end_markers=self.end_markers
        )
        res = self.evaluate(items)
        rewards = [float(x) for x in res["rewards"]]
        return {
            "rewards": rewards,
            # OpenRLHF uses "scores" for dynamic filtering and logging; its own RM server
            # returns the rewards there too.
            "scores": rewards,
            "extra_logs": {
                "rm_score": [float(x) for x in res["scores"]],
                "code_valid": [float(x) for x in res["valid"]],
            },
        }

    def score(self, data: bytes | dict[str, Any], limits: Limits) -> dict[str, Any]:
        """The native ``/score`` answer: raw RM scores (of ``(problem, "")`` for a response
        without code, as the ``score`` command gives), rewards, validity, reasons."""
        res = self.evaluate(parse_score(data, limits), score_invalid=True)
        return {
            "scores": [float(s) for s in res["scores"]],
            "rewards": [float(x) for x in res["rewards"]],
            "valid": [bool(v) for v in res["valid"]],
            "reasons": res["reasons"],
        }

    def health(self) -> dict[str, Any]:
        st = self.batcher.stats
        first = self.scorers[self.row_buckets[0]]
        return {
            "status": "ok",
            "row_buckets": list(self.row_buckets),
            "length_buckets": list(first.buckets),
            "max_length": first.max_length,
            "shaping": self.shaping,
            "batches": st.batches,
            "items": st.items,
            "max_batch_seen": st.max_batch_seen,
            "device_busy_s": round(st.busy_s, 3),
            "pending": self.batcher.pending,
            "memory_budget_bytes": self.memory_budget_bytes,
            "max_rows_per_length": self.memory_plan(),
            # {length: [rows, bytes]}: the first row bucket over the budget, per length
            "over_budget": {str(k): list(v) for k, v in sorted(self._too_big.items())},
        }

    def close(self) -> None:
        self.batcher.close()


@dataclasses.dataclass(eq=False)
class _Conn:
    """An open connection: ``busy`` while a complete request is scored and answered; else it
    has been waiting since ``since`` for its next complete request."""

    sock: socket.socket
    host: str
    since: float = dataclasses.field(default_factory=time.monotonic)
    busy: bool = False
    closing: bool = False  # shut down by the server (deadline, eviction): no more log lines


# Clients that finish a request take milliseconds; one that has not after this long may be
# replaced by a new connection when the cap is reached.
EVICT_AFTER_S = 1.0


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: RewardHTTPServer

    def setup(self) -> None:
        self.timeout = self.server.socket_timeout_s  # applied to the socket by StreamRequestHandler
        super().setup()

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except (ConnectionError, TimeoutError) as e:
            # The client went away or stalled mid-request (or the server closed it): one line,
            # not a traceback, and the connection is done.
            self.server.connection_lost(self.request, self.client_address, e)
            self.close_connection = True
        finally:
            self.server.set_busy(self.request, False)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base-class signature
        log.debug("%s " + format, self.client_address[0], *args)

    def _send(self, status: int, payload: dict[str, Any], close: bool = False) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str, close: bool = False) -> None:
        self.server.count_error(status)
        self._send(status, {"error": message}, close=close)

    def _linger(self, max_bytes: int = 1 << 20, seconds: float = 1.0) -> None:
        """After refusing an unread body: stop writing, then read and drop what the client is
        still sending (bounded), so the close does not reset the connection before the client
        has read the answer."""
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(seconds)
            deadline = time.monotonic() + seconds
            left = max_bytes
            while left > 0 and time.monotonic() < deadline:
                chunk = self.connection.recv(min(left, 65536))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass

    def do_GET(self) -> None:
        self.server.set_busy(self.request, True)
        if self.headers.get("Content-Length", "0").strip() not in ("", "0"):
            self.close_connection = True  # a GET body is never read
        if self.path == "/health":
            self._send(200, {**self.server.service.health(), **self.server.counters()})
        elif self.path in ("/get_reward", "/score"):
            self._error(405, f"{self.path} takes POST")
        else:
            self._error(404, f"no such endpoint {self.path!r}; try /get_reward, /score, /health")

    def _read_body(self) -> bytes | None:
        limits = self.server.limits
        if self.headers.get("Transfer-Encoding", "").lower() not in ("", "identity"):
            self._error(411, "chunked bodies are not accepted; send a Content-Length", close=True)
            self._linger()
            return None
        raw = self.headers.get("Content-Length")
        if raw is None:
            self._error(411, "Content-Length is required", close=True)
            self._linger()
            return None
        try:
            length = int(raw)
            if length < 0:
                raise ValueError
        except ValueError:
            self._error(400, f"bad Content-Length {raw!r}", close=True)
            self._linger()
            return None
        if length > limits.max_body_bytes:
            # Refused before reading: the unread body makes the connection unusable, so close it.
            self._error(
                413, f"body of {length} bytes exceeds the limit of {limits.max_body_bytes}",
                close=True,
            )
            self._linger()
            return None
        body = self.rfile.read(length)
        if len(body) < length:
            # The client closed the connection mid-body: nobody to answer.
            self.server.connection_lost(
                self.request, self.client_address,
                ConnectionAbortedError(f"closed after {len(body)} of {length} body bytes"),
            )
            self.close_connection = True
            return None
        return body

    def do_POST(self) -> None:
        # The body is read (or the connection closed) before anything else, so an unread body
        # never ends up parsed as the next request of a keep-alive connection.
        body = self._read_body()
        if body is None:
            return
        self.server.set_busy(self.request, True)  # complete: no read deadline while scoring
        service = self.server.service
        route = {"/get_reward": service.get_reward, "/score": service.score}.get(self.path)
        if route is None:
            self._error(404, f"no such endpoint {self.path!r}; try /get_reward, /score, /health")
            return
        try:
            out = route(body, self.server.limits)
        except RequestError as e:
            self._error(e.status, e.message)
            return
        except Overloaded as e:
            self._error(503, f"server busy: {e}")
            return
        except TimeoutError as e:
            self._error(504, str(e))
            return
        except Exception as e:  # noqa: BLE001 - a failed request must not stop the server
            log.exception("request failed")
            self._error(500, f"internal error: {type(e).__name__}: {e}")
            return
        self.server.count_ok()
        self._send(200, out)


class RewardHTTPServer(ThreadingHTTPServer):
    """HTTP server for a `RewardService` (one thread per connection, capped)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        service: RewardService,
        *,
        limits: Limits | None = None,
        max_connections: int = 256,
        socket_timeout_s: float = 60.0,
        request_timeout_s: float = 30.0,
    ):
        """``socket_timeout_s``: the longest a single read or write may block.
        ``request_timeout_s``: the longest a connection may take to deliver a complete request
        (headers and body), counted from its opening or its previous answer; a slow-drip client
        that sends a byte now and then is closed then, however often it sends."""
        self.service = service
        self.limits = limits or Limits()
        self.max_connections = max_connections
        self.socket_timeout_s = socket_timeout_s
        self.request_timeout_s = request_timeout_s
        self._lock = threading.Lock()
        self._active = 0
        self._conns: dict[socket.socket, _Conn] = {}
        self._counts = RequestCounts()
        self._closed = {"deadline": 0, "evicted": 0, "lost": 0}
        self._stop = threading.Event()
        # listen() backlog: the socketserver default of 5 resets bursts of new connections.
        self.request_queue_size = max(128, max_connections)
        super().__init__(address, _Handler)
        self._reaper = threading.Thread(target=self._reap, name="http-deadline", daemon=True)
        self._reaper.start()

    # ---- connection bookkeeping ----------------------------------------------------------

    def set_busy(self, sock: socket.socket, busy: bool) -> None:
        with self._lock:
            conn = self._conns.get(sock)
            if conn is not None:
                conn.busy = busy
                if not busy:
                    conn.since = time.monotonic()

    def _close(self, conn: _Conn, why: str) -> None:
        """Shut ``conn`` down from another thread: its handler's blocked read returns and the
        handler ends. Caller holds the lock."""
        conn.closing = True
        self._closed[why] += 1
        try:
            conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _reap(self) -> None:
        """Close connections that have not delivered a complete request in time."""
        while not self._stop.wait(min(0.25, self.request_timeout_s / 4)):
            now = time.monotonic()
            with self._lock:
                late = [c for c in self._conns.values() if not c.busy and not c.closing
                        and now - c.since > self.request_timeout_s]
                for c in late:
                    self._close(c, "deadline")
            if late:
                log.info("closed %d connection(s) with no complete request within %.0f s "
                         "(e.g. from %s)", len(late), self.request_timeout_s, late[0].host)

    def connection_lost(self, sock: socket.socket, client_address, error: BaseException) -> None:
        """One log line for a client that went away (none for connections the server closed)."""
        with self._lock:
            conn = self._conns.get(sock)
            if conn is not None and conn.closing:
                return
            self._closed["lost"] += 1
        log.info("client %s: connection lost (%s: %s)", client_address[0],
                 type(error).__name__, error)

    def handle_error(self, request, client_address) -> None:
        """Errors escaping a handler: one line for a lost connection, a traceback for bugs."""
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            self.connection_lost(request, client_address, error)
        else:
            log.exception("error while handling a request from %s", client_address[0])

    def server_close(self) -> None:
        self._stop.set()
        super().server_close()

    def count_ok(self) -> None:
        self._counts.ok()

    def count_error(self, status: int) -> None:
        self._counts.error(status)

    def counters(self) -> dict[str, Any]:
        with self._lock:
            return self._counts.snapshot(self._active, self._closed)

    def process_request(self, request, client_address) -> None:
        with self._lock:
            live = [c for c in self._conns.values() if not c.closing]
            full = len(live) >= self.max_connections
            if full:
                # Replace the connection that has waited longest for its request (slow or idle
                # clients), so a fast client such as a /health probe still gets in.
                now = time.monotonic()
                waiting = [c for c in live if not c.busy and now - c.since > EVICT_AFTER_S]
                if waiting:
                    self._close(min(waiting, key=lambda c: c.since), "evicted")
                    full = False
            if not full:
                self._active += 1
                self._conns[request] = _Conn(request, str(client_address[0]))
        if full:
            body = b'{"error": "too many open connections"}'
            try:
                request.sendall(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                    b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
                    + body
                )
                # Drop what the client already sent (briefly, this is the accept loop): closing
                # with unread data resets the connection, and the client could lose the answer.
                request.shutdown(socket.SHUT_WR)
                request.settimeout(0.05)
                request.recv(65536)
            except OSError:
                pass
            self.shutdown_request(request)
            self.count_error(HTTPStatus.SERVICE_UNAVAILABLE)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._lock:
                self._active -= 1
                self._conns.pop(request, None)
