"""The reward server on uvicorn + Starlette: the same endpoints, rules and limits as the
standard-library `RewardHTTPServer`, on the stack OpenRLHF's own remote-RM server uses.

One asyncio event loop owns every connection, so a slow client costs a timer, not a thread; the
scoring itself (extraction, then waiting for the `Batcher`) runs in a thread pool, and the loop
stays free for ``/health``. The limits live in two places:

- the connection (`_GuardedProtocol`, uvicorn's httptools protocol with bookkeeping added):
  the open-connection cap, where a new connection replaces the one that has waited longest for
  its request (else a JSON 503), and the whole-request deadline: a connection must deliver each
  complete request (headers and body) within ``request_timeout_s`` of opening or of its
  previous answer, however slowly it drips. uvicorn itself has no header timeout.
- the request (`build_app`, a Starlette app): the Content-Length checked against the limit
  before the app reads a byte of the body; a chunked body cut at the limit; JSON ``{"error":
  message}`` for every refusal; one log line for a client that leaves mid-body.

A refused body is never read: after the answer the server half-closes, drops at most 1 MiB of
what the client still sends for at most 1 s, then closes, so the client reads its answer
instead of a reset. This relies on uvicorn's protocol internals (``on_message_complete``,
``on_response_complete``, ``cycle``): `requirements.txt` pins the uvicorn it was written
against, and the loopback tests exercise every one of these paths.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import socket
import threading
import time
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from codescaler_jax.serving.batcher import Overloaded
from codescaler_jax.serving.protocol import Limits, RequestCounts, RequestError

log = logging.getLogger("codescaler_jax.serve")

# Clients that finish a request take milliseconds; one that has not after this long may be
# replaced by a new connection when the cap is reached (as in the stdlib server).
EVICT_AFTER_S = 1.0
# After refusing an unread body: how much of it, and for how long, to read and drop before
# closing (closing with unread data resets the connection, and the client loses the answer).
DRAIN_BYTES = 1 << 20
DRAIN_S = 1.0
_FULL_BODY = b'{"error": "too many open connections"}'
_FULL = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(_FULL_BODY), _FULL_BODY)
)


class _Guard:
    """The server's view of its connections: cap, eviction, deadlines, counters. Touched from
    the event loop only, except `counters` and the request counts (under a lock)."""

    def __init__(self, max_connections: int, request_timeout_s: float):
        self.max_connections = max_connections
        self.request_timeout_s = request_timeout_s
        self.conns: set[_GuardedProtocol] = set()
        self.by_client: dict[Any, _GuardedProtocol] = {}
        self._lock = threading.Lock()
        self._counts = RequestCounts()
        self.closed = {"deadline": 0, "evicted": 0, "lost": 0}

    def admit(self, conn: _GuardedProtocol) -> bool:
        live = [c for c in self.conns if not c.closing]
        if len(live) >= self.max_connections:
            now = time.monotonic()
            waiting = [c for c in live if not c.busy and now - c.since > EVICT_AFTER_S]
            if not waiting:
                return False
            self.close(min(waiting, key=lambda c: c.since), "evicted")
        self.conns.add(conn)
        self.by_client[conn.client] = conn
        return True

    def close(self, conn: _GuardedProtocol, why: str) -> None:
        conn.closing = True
        self.closed[why] += 1
        conn.transport.close()

    def discard(self, conn: _GuardedProtocol) -> None:
        self.conns.discard(conn)
        if self.by_client.get(conn.client) is conn:
            del self.by_client[conn.client]

    def lost(self, client: Any, why: str) -> None:
        """One log line for a client that went away (none for connections the server closed)."""
        conn = self.by_client.get(client)
        if conn is not None and conn.closing:
            return
        self.closed["lost"] += 1
        log.info("client %s: connection lost (%s)", client[0] if client else "?", why)

    def count_ok(self) -> None:
        self._counts.ok()

    def count_error(self, status: int) -> None:
        self._counts.error(status)

    def counters(self) -> dict[str, Any]:
        with self._lock:
            return self._counts.snapshot(len(self.conns), self.closed)


class _GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus the connection cap and the whole-request deadline.

    ``busy``: a complete request is being scored and answered (no deadline, never evicted);
    otherwise the connection has waited since ``since`` for its next complete request.
    """

    guard: _Guard  # set on the per-server subclass made by `RewardASGIServer`

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.since = time.monotonic()
        self.busy = False
        self.closing = False
        self.draining: int | None = None  # bytes still dropped before closing; None: serving
        self.eof = False
        self.refused_body = False  # the app answered without reading an over-limit body
        self._timer: asyncio.TimerHandle | None = None
        if not self.guard.admit(self):
            self.guard.count_error(503)
            transport.write(_FULL)
            self._drain_and_close()
            return
        self._arm()

    def _arm(self) -> None:
        self._timer = self.loop.call_later(self.guard.request_timeout_s, self._deadline)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _deadline(self) -> None:
        self._timer = None
        if not self.busy and not self.closing:
            log.info("closed a connection from %s with no complete request within %.0f s",
                     self.client[0] if self.client else "?", self.guard.request_timeout_s)
            self.guard.close(self, "deadline")

    def _drain_and_close(self) -> None:
        """Stop writing, drop what the client still sends (bounded), then close."""
        self.closing = True
        self.draining = DRAIN_BYTES
        self._disarm()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.transport.resume_reading()
        self.loop.call_later(DRAIN_S, self.transport.close)

    def data_received(self, data: bytes) -> None:
        if self.draining is not None:
            self.draining -= len(data)
            if self.draining <= 0:
                self.transport.close()
            return
        super().data_received(data)

    def eof_received(self) -> bool | None:
        self.eof = True
        cycle = self.cycle
        if self.draining is not None or cycle is None or cycle.response_complete:
            return None  # close now
        if cycle.more_body:
            # The client stopped sending mid-request: it cannot finish it, so the app's read
            # ends now (one log line there), not at the deadline.
            cycle.disconnected = True
            cycle.message_event.set()
            return None
        return True  # a half-closed client still gets its answer; closed after it

    def send_400_response(self, msg: str) -> None:
        """A request httptools cannot parse (a bad Content-Length, say): a JSON 400 like every
        other refusal, then close (the stream is out of step)."""
        self.guard.count_error(400)
        body = json.dumps({"error": f"malformed HTTP request: {msg}"}).encode()
        self.transport.write(
            b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
            b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
        )
        self._drain_and_close()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if self.cycle is not None and not self.cycle.response_complete:
            # Complete and not answered yet: no deadline while it is scored. (The end of a
            # body the app did not need, e.g. for a 404, arrives after the answer.)
            self.busy = True
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if self.refused_body and self.cycle is not None and self.cycle.more_body:
            # An over-limit body is not read, not even to skip it: this connection is done.
            # (Other early answers, a 404, let the parser skip the rest of a body within the
            # limit, under the request deadline, and the connection stays open.)
            self._drain_and_close()
        elif self.eof:
            self.transport.close()
        else:
            self.busy = False
            self.since = time.monotonic()
            self._disarm()
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)
        self.guard.discard(self)


class _Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


async def _read_body(request: Request, limits: Limits, guard: _Guard) -> bytes | None:
    """The body, checked against ``limits.max_body_bytes`` before a byte is read (from the
    Content-Length) or as it streams in (chunked); None when the client went away."""
    def refuse(status: int, message: str) -> _Refused:
        conn = guard.by_client.get(request.scope.get("client"))
        if conn is not None:
            conn.refused_body = True
        return _Refused(status, message)

    raw = request.headers.get("content-length")
    chunked = "chunked" in request.headers.get("transfer-encoding", "").lower()
    if raw is None and not chunked:
        raise _Refused(411, "Content-Length is required (or a chunked body)")
    length = None
    if raw is not None:
        length = int(raw)  # httptools has refused a malformed one already
        if length > limits.max_body_bytes:
            raise refuse(
                413, f"body of {length} bytes exceeds the limit of {limits.max_body_bytes}")
    parts, got = [], 0
    try:
        async for chunk in request.stream():
            got += len(chunk)
            if got > limits.max_body_bytes:
                raise refuse(413, f"body exceeds the limit of {limits.max_body_bytes} bytes")
            parts.append(chunk)
    except ClientDisconnect:
        of = f" of {length}" if length is not None else ""
        guard.lost(request.scope.get("client"), f"closed after {got}{of} body bytes")
        return None
    return b"".join(parts)


def build_app(
    service: Any, limits: Limits, guard: _Guard, pool: concurrent.futures.Executor
) -> Starlette:
    """The Starlette app for a `RewardService`: ``POST /get_reward``, ``POST /score``, ``GET
    /health``; every refusal is ``{"error": message}`` with its status."""

    def error(status: int, message: str) -> JSONResponse:
        guard.count_error(status)
        return JSONResponse({"error": message}, status_code=status)

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({**service.health(), **guard.counters()})

    async def post(request: Request) -> JSONResponse | None:
        route = service.get_reward if request.url.path == "/get_reward" else service.score
        try:
            body = await _read_body(request, limits, guard)
        except _Refused as e:
            return error(e.status, e.message)
        if body is None:
            return None  # nobody to answer
        try:
            # Parsing, extraction and the wait for the batcher block: off the event loop.
            out = await asyncio.get_running_loop().run_in_executor(pool, route, body, limits)
        except RequestError as e:
            return error(e.status, e.message)
        except Overloaded as e:
            return error(503, f"server busy: {e}")
        except TimeoutError as e:
            return error(504, str(e))
        except Exception as e:  # noqa: BLE001 - a failed request must not stop the server
            log.exception("request failed")
            return error(500, f"internal error: {type(e).__name__}: {e}")
        guard.count_ok()
        return JSONResponse(out)

    async def not_found(request: Request, exc: HTTPException) -> JSONResponse:
        return error(404, f"no such endpoint {request.url.path!r}; try /get_reward, /score, "
                     "/health")

    async def not_allowed(request: Request, exc: HTTPException) -> JSONResponse:
        takes = "GET" if request.url.path == "/health" else "POST"
        return error(405, f"{request.url.path} takes {takes}")

    async def endpoint(request: Request) -> JSONResponse:
        resp = await post(request)
        # A response is required by ASGI servers unless the client is gone; uvicorn drops
        # this one when it is.
        return resp if resp is not None else JSONResponse({}, status_code=400)

    return Starlette(
        routes=[
            Route("/get_reward", endpoint, methods=["POST"]),
            Route("/score", endpoint, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
        ],
        exception_handlers={404: not_found, 405: not_allowed},
    )


class RewardASGIServer:
    """A `RewardService` served by uvicorn (httptools parser) with the limits above.

    Same constructor and ``serve_forever`` / ``shutdown`` / ``server_close`` / ``server_address``
    as `RewardHTTPServer`, so ``serve.py`` and the tests drive either. ``socket_timeout_s`` is
    accepted for that symmetry: no read blocks a thread here, and the whole-request deadline
    bounds every read.
    """

    def __init__(
        self,
        address: tuple[str, int],
        service: Any,
        *,
        limits: Limits | None = None,
        max_connections: int = 256,
        socket_timeout_s: float = 60.0,
        request_timeout_s: float = 30.0,
    ):
        self.service = service
        self.limits = limits or Limits()
        self.guard = _Guard(max_connections, request_timeout_s)
        # One thread per request in flight: each waits for its batch, and concurrent requests
        # must all be waiting for the batcher to merge them.
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_connections, thread_name_prefix="request"
        )
        # Bound here, so a busy port fails in the constructor, as the stdlib server does.
        self._sock = socket.create_server(address, backlog=max(128, max_connections))
        self.server_address = self._sock.getsockname()
        protocol = type("GuardedProtocol", (_GuardedProtocol,), {"guard": self.guard})
        config = uvicorn.Config(
            build_app(service, self.limits, self.guard, self._pool),
            http=protocol, ws="none", lifespan="off", log_config=None, access_log=False,
            timeout_keep_alive=int(max(request_timeout_s, 1)), timeout_graceful_shutdown=10,
            backlog=max(128, max_connections),
        )
        self._server = uvicorn.Server(config)

    def serve_forever(self, poll_interval: float = 0.2) -> None:
        """Serve until `shutdown`; SIGTERM/SIGINT stop it as well (uvicorn's handlers)."""
        self._server.run(sockets=[self._sock])

    def shutdown(self) -> None:
        self._server.should_exit = True

    def server_close(self) -> None:
        self._sock.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
