"""The reward service (extraction -> batched RM -> shaping) and its HTTP front end.

`RewardService` owns the device side: one `RewardScorer` per row bucket (all sharing the same
parameters), so a batch of ``n`` items runs at the smallest bucket ``>= n`` rows and at a
power-of-two length bucket: a handful of compiled shapes, none at request time once warmed up.
A `Batcher` merges items of concurrent requests. Code extraction (training mode: exactly one
fenced block that parses) runs in the request threads; responses without code never reach the
RM and get reward 0, exactly as validity-preserving shaping gives them.

`RewardHTTPServer` is a standard-library ``ThreadingHTTPServer`` (HTTP/1.1, keep-alive): the
Content-Length is checked against the limit before a byte of the body is read, open connections
are capped, each socket has a timeout, and every refusal is a JSON ``{"error": message}`` with a
4xx/5xx status; no request can stop the server.
"""

from __future__ import annotations

import json
import logging
import socket
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
    RequestError,
    parse_get_reward,
    parse_json_body,
    parse_score,
)

log = logging.getLogger("codescaler_jax.serve")


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
        over = self.pass_overhead_tokens
        one_pass = self._rows(len(seqs)) * max(lengths) + over
        per_bucket = sum(self._rows(len(idx)) * length + over for length, idx in groups.items())
        if per_bucket >= one_pass:
            return self.scorers[self._rows(len(seqs))].score_ids(seqs)
        out = np.zeros(len(seqs), np.float32)
        for idx in groups.values():
            out[idx] = self.scorers[self._rows(len(idx))].score_ids([seqs[i] for i in idx])
        return out

    def warmup(self) -> int:
        """Compile every (row bucket, length bucket) shape now; returns how many."""
        count = 0
        for rows, scorer in self.scorers.items():
            for length in scorer.buckets:
                scorer.score_ids([[0] * length] * rows)
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

    def evaluate(self, items: Sequence[Item]) -> dict[str, Any]:
        """Extract, score and shape ``items``.

        Returns ``{"scores": [n] f32 (0 where no code), "rewards": [n] f32, "valid": [n] bool,
        "reasons": [n] str}``.
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
        idx = np.flatnonzero(valid)
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

    def get_reward(self, data: dict[str, Any], limits: Limits) -> dict[str, Any]:
        """The OpenRLHF ``/get_reward`` answer: rewards = scores = shaped RM rewards."""
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

    def score(self, data: dict[str, Any], limits: Limits) -> dict[str, Any]:
        """The native ``/score`` answer: raw RM scores (null without code), rewards, validity."""
        res = self.evaluate(parse_score(data, limits))
        return {
            "scores": [float(s) if v else None for s, v in zip(res["scores"], res["valid"])],
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
        }

    def close(self) -> None:
        self.batcher.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: RewardHTTPServer

    def setup(self) -> None:
        self.timeout = self.server.socket_timeout_s  # applied to the socket by StreamRequestHandler
        super().setup()

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
        return self.rfile.read(length)

    def do_POST(self) -> None:
        # The body is read (or the connection closed) before anything else, so an unread body
        # never ends up parsed as the next request of a keep-alive connection.
        body = self._read_body()
        if body is None:
            return
        service = self.server.service
        route = {"/get_reward": service.get_reward, "/score": service.score}.get(self.path)
        if route is None:
            self._error(404, f"no such endpoint {self.path!r}; try /get_reward, /score, /health")
            return
        try:
            out = route(parse_json_body(body), self.server.limits)
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
    ):
        self.service = service
        self.limits = limits or Limits()
        self.max_connections = max_connections
        self.socket_timeout_s = socket_timeout_s
        self._lock = threading.Lock()
        self._active = 0
        self._ok = 0
        self._errors: dict[int, int] = {}
        self._started = time.time()
        # listen() backlog: the socketserver default of 5 resets bursts of new connections.
        self.request_queue_size = max(128, max_connections)
        super().__init__(address, _Handler)

    def count_ok(self) -> None:
        with self._lock:
            self._ok += 1

    def count_error(self, status: int) -> None:
        with self._lock:
            self._errors[status] = self._errors.get(status, 0) + 1

    def counters(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests_ok": self._ok,
                "requests_refused": {str(k): v for k, v in sorted(self._errors.items())},
                "connections": self._active,
                "uptime_s": round(time.time() - self._started, 1),
            }

    def process_request(self, request, client_address) -> None:
        with self._lock:
            full = self._active >= self.max_connections
            if not full:
                self._active += 1
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
