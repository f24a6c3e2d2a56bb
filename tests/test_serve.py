"""The HTTP reward server as a real process on loopback, talked to by a real HTTP client.

The server runs in a subprocess on one CPU device (the fake-device flag is removed from its
environment); the expected answers are computed here, offline, with a `RewardScorer` on the test
session's 8 fake devices, the extractor, and softplus written out in numpy.
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from tiny_rm import save_tiny_rm

from codescaler_jax.serving.batcher import Batcher, Overloaded
from codescaler_jax.serving.protocol import (
    Limits,
    RequestError,
    parse_get_reward,
    problem_from_prompt,
    response_from_query,
)

REPO = Path(__file__).resolve().parents[1]
MAX_LENGTH = 128
MAX_ITEMS = 16
MAX_BODY = 64 * 1024
MAX_CHARS = 4000

# ---- pure pieces ----------------------------------------------------------------------------


def test_problem_and_response_split():
    prompt = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nAdd two numbers.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert problem_from_prompt(prompt) == "Add two numbers."
    assert problem_from_prompt(prompt, "raw") == prompt
    assert problem_from_prompt("Add two numbers.") == "Add two numbers."
    with pytest.raises(RequestError):
        problem_from_prompt("plain", "chatml")
    query = prompt + "```python\nx = 1\n```<|im_end|><|endoftext|><|endoftext|>"
    ends = ("<|im_end|>", "<|endoftext|>")
    assert response_from_query(query, prompt, ends) == "```python\nx = 1\n```"
    assert response_from_query("<s>" + query, prompt, ends) == "```python\nx = 1\n```"
    assert response_from_query("unrelated", prompt, ends) is None


def test_get_reward_validation():
    lim = Limits(max_items=2, max_chars=10)
    ok = parse_get_reward({"query": ["pq"], "prompts": ["p"], "labels": ["x"]}, lim)
    assert ok[0].problem == "p" and ok[0].text == "q"
    # no "prompts" (older OpenRLHF): split the ChatML query at its last assistant header
    chat = "<|im_start|>user\nP<|im_end|>\n<|im_start|>assistant\n"
    old_style = parse_get_reward({"query": [chat + "R<|im_end|>"]}, Limits(),
                                 end_markers=("<|im_end|>",))
    assert (old_style[0].problem, old_style[0].text) == ("P", "R")
    cases = [
        ({"query": ["pq"]}, 400, "missing field 'prompts'"),
        ({"prompts": ["p"]}, 400, "missing field 'query'"),
        ({"query": "pq", "prompts": ["p"]}, 400, "must be a list"),
        ({"query": ["pq", 3], "prompts": ["p", "p"]}, 400, r"query\[1\] must be a string"),
        ({"query": ["pq"], "prompts": ["p", "p"]}, 400, "'prompts' has 2 items"),
        ({"query": ["a"] * 3, "prompts": ["a"] * 3}, 413, "limit is 2"),
        ({"query": ["p" * 11], "prompts": ["p"]}, 413, "11 characters"),
        ({"query": ["xq"], "prompts": ["p"]}, 400, r"query\[0\] does not contain prompts\[0\]"),
        ({"query": ["pq"], "prompts": ["p"], "labels": [1, 2]}, 400, "labels"),
    ]
    for data, status, msg in cases:
        with pytest.raises(RequestError, match=msg) as e:
            parse_get_reward(data, lim)
        assert e.value.status == status


def test_batcher_merges_splits_and_reports_errors():
    calls = []

    def score_fn(problems, codes):
        calls.append(len(codes))
        time.sleep(0.01)
        return np.array([float(c) for c in codes], np.float32)

    b = Batcher(score_fn, max_batch=4, max_wait_s=0.05, max_pending=20)
    # one request larger than max_batch is split over several batches, order kept
    out = b.submit(["p"] * 10, [str(i) for i in range(10)])
    np.testing.assert_array_equal(out, np.arange(10))
    assert max(calls) <= 4
    # concurrent single-item requests share batches
    calls.clear()
    results = {}

    def one(i):
        results[i] = float(b.submit(["p"], [str(i)])[0])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: float(i) for i in range(8)}
    assert len(calls) < 8 and sum(calls) == 8
    with pytest.raises(Overloaded):
        b.submit(["p"] * 21, ["1"] * 21)
    b.close()

    def broken(problems, codes):
        raise ValueError("device on fire")

    b = Batcher(broken, max_batch=4)
    with pytest.raises(RuntimeError, match="device on fire"):
        b.submit(["p"], ["1"])
    b.close()


class _FakeScorer:
    """Stands in for RewardScorer: the score of a code is its length; calls are recorded."""

    buckets = (64, 128, 256)
    max_length = 256

    def __init__(self, rows, calls):
        self.rows, self.calls = rows, calls

    def encode(self, problems, codes):
        return [[0] * len(c) for c in codes]

    def score_ids(self, seqs):
        assert len(seqs) <= self.rows
        longest = max(len(s) for s in seqs)
        self.calls.append((self.rows, next(b for b in self.buckets if b >= longest)))
        return np.array([len(s) for s in seqs], np.float32)


def test_mixed_length_batches_split_by_bucket_when_cheaper():
    from codescaler_jax.serving.server import RewardService

    calls = []
    svc = RewardService({r: _FakeScorer(r, calls) for r in (1, 4, 8)}, pass_overhead_tokens=100)
    # 7 short items and 1 long one: one [8, 256] pass (2048 + 100) costs more than [8, 64] +
    # [1, 256] (512 + 100 + 256 + 100)
    codes = ["x" * 10] * 3 + ["y" * 200] + ["x" * 10] * 4
    out = svc._score_batch(["p"] * 8, codes)
    np.testing.assert_array_equal(out, [len(c) for c in codes])
    assert sorted(calls) == [(1, 256), (8, 64)]
    # with a large per-pass overhead one [4, 128] pass (512 + 1000) beats [1, 64] + [1, 128]
    # (64 + 1000 + 128 + 1000)
    calls.clear()
    svc.pass_overhead_tokens = 1000
    out = svc._score_batch(["p"] * 2, ["a" * 10, "b" * 100])
    np.testing.assert_array_equal(out, [10, 100])
    assert calls == [(4, 128)]
    svc.close()


BACKENDS = ("uvicorn", "stdlib")


def _server_cls(backend):
    if backend == "uvicorn":
        from codescaler_jax.serving.asgi import RewardASGIServer

        return RewardASGIServer
    from codescaler_jax.serving.server import RewardHTTPServer

    return RewardHTTPServer


def _in_process(backend, svc, **kwargs):
    """An in-process server of ``backend`` over ``svc``, serving from a thread. Both listen
    once constructed: connections wait in the backlog until the thread serves them (no
    readiness probe, which would hold one of the connections a cap test counts)."""
    srv = _server_cls(backend)(("127.0.0.1", 0), svc, **kwargs)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    host, port = srv.server_address[:2]
    return srv, host, port


def _request_health(host, port):
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request("GET", "/health")
    out = json.loads(conn.getresponse().read())
    conn.close()
    return out


def _stop(srv, svc):
    srv.shutdown()
    srv.server_close()
    svc.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_connection_cap_in_process(backend):
    """Past ``max_connections`` open connections a new one gets 503 and is closed; the held
    connection keeps working (an in-process server over the fake scorer)."""
    from codescaler_jax.serving.server import RewardService

    svc = RewardService({4: _FakeScorer(4, [])})
    srv, host, port = _in_process(backend, svc, max_connections=1)
    try:
        held = http.client.HTTPConnection(host, port, timeout=10)
        status, out = _post(held, "/score", {"items": [{"problem": "p", "code": "abc"}]})
        assert status == 200 and out["scores"] == [3.0]
        status, resp = _raw_request({"host": host, "port": port},
                                    b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 503 and b"too many open connections" in resp
        status, out = _post(held, "/score", {"items": [{"problem": "p", "code": "abcd"}]})
        assert status == 200 and out["scores"] == [4.0]
        held.close()
    finally:
        _stop(srv, svc)


def test_uvicorn_streamed_bodies_are_cut_at_the_limit_and_early_answers_keep_the_connection():
    """uvicorn accepts chunked bodies, refused (413) as soon as they pass the limit; a 404
    answered before its (small) body arrived leaves the connection usable; a request httptools
    cannot parse is a JSON 400. (A client that half-closes after its request still gets its
    answer: `_raw_request` does that.)"""
    from codescaler_jax.serving.server import RewardService

    svc = RewardService({4: _FakeScorer(4, [])})
    srv, host, port = _in_process("uvicorn", svc, limits=Limits(max_body_bytes=1000))
    addr = {"host": host, "port": port}
    head = b"POST /score HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    try:
        body = json.dumps({"items": [{"problem": "p", "code": "abcd"}]}).encode()
        status, resp = _raw_request(addr, head + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        assert status == 200 and b'"scores":[4.0]' in resp
        status, resp = _raw_request(addr, head + (b"200\r\n" + b" " * 512 + b"\r\n") * 4
                                    + b"0\r\n\r\n")
        assert status == 413 and b"exceeds the limit of 1000" in resp
        conn = http.client.HTTPConnection(host, port, timeout=10)
        for _ in range(3):
            # headers and body in two writes: the 404 may be sent before the body arrives
            conn.putrequest("POST", "/nowhere")
            conn.putheader("Content-Length", "300")
            conn.endheaders()
            time.sleep(0.02)
            conn.send(b" " * 300)
            resp = conn.getresponse()
            assert resp.status == 404 and "no such endpoint" in json.loads(resp.read())["error"]
        status, out = _post(conn, "/score", {"items": [{"problem": "p", "code": "abc"}]})
        assert status == 200 and out["scores"] == [3.0]
        # what httptools cannot parse is a JSON 400 too
        status, resp = _raw_request(addr, b"POST /score HTTP/1.1\r\nHost: x\r\n"
                                    b"Content-Length: abc\r\n\r\n{}")
        assert status == 400 and b"malformed HTTP request" in resp
        health = _request_health(host, port)
        assert health["requests_refused"] == {"400": 1, "404": 3, "413": 1}, health
    finally:
        _stop(srv, svc)


# ---- the real server ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    return save_tiny_rm(tmp_path_factory.mktemp("rm") / "tiny_rm")


@pytest.fixture(scope="module",
                params=["uvicorn", pytest.param("stdlib", marks=pytest.mark.slow)])
def server(rm_dir, request):
    """The real server of each backend (the default, uvicorn, in the fast suite)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(
        f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f
    )
    cmd = [
        sys.executable, "-m", "codescaler_jax.serve", "--rm", str(rm_dir), "--port", "0",
        "--max-batch", "8", "--max-length", str(MAX_LENGTH), "--max-items", str(MAX_ITEMS),
        "--max-body-mb", str(MAX_BODY / (1 << 20)), "--max-chars", str(MAX_CHARS),
        "--max-wait-ms", "5", "--log-level", "WARNING", "--backend", request.param,
    ]
    # the repository root on the path: the package need not be installed
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stdout], daemon=True).start()
    try:
        line = lines.get(timeout=180)
    except queue.Empty:
        proc.kill()
        pytest.fail("server did not start within 180 s")
    url = json.loads(line)["url"]
    host, port = url.removeprefix("http://").split(":")
    yield {"host": host, "port": int(port), "pid": proc.pid, "backend": request.param}
    proc.terminate()
    assert proc.wait(timeout=30) == 0  # SIGTERM is a clean shutdown


def _post(conn, path, payload, raw=None):
    body = raw if raw is not None else json.dumps(payload).encode()
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read())


PROBLEMS = [f"Write a function f{k} that returns {k}." for k in range(6)]
CODES = [
    "def f(): return 1", "def f():\n    return 2", "x = [i * i for i in range(10)]",
    "import math\nprint(math.pi)", "class A:\n    pass", "def g(a, b):\n    return a + b",
]
CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


def _offline(rm_dir):
    """Expected raw score of every (problem, code) combination, computed in this process."""
    from codescaler_jax.rm.scorer import RewardScorer

    scorer = RewardScorer.from_pretrained(rm_dir, max_length=MAX_LENGTH, batch_size=8)
    pairs = [(p, c) for p in PROBLEMS for c in CODES]
    s = scorer.score([p for p, _ in pairs], [c for _, c in pairs])
    return {pc: float(v) for pc, v in zip(pairs, s)}


def _softplus(x):
    return float(np.log1p(np.exp(x)))


def test_concurrent_clients_get_offline_scores(server, rm_dir, record_property):
    expected = _offline(rm_dir)
    n_clients, n_requests = 32, 50
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()

    def client(cid):
        rng = np.random.default_rng(cid)
        conn = http.client.HTTPConnection(server["host"], server["port"], timeout=120)
        mine = []
        for r in range(n_requests):
            k = int(rng.integers(1, 4))
            picks = [(PROBLEMS[rng.integers(6)], CODES[rng.integers(6)]) for _ in range(k)]
            t0 = time.perf_counter()
            if r % 2 == 0:
                status, out = _post(conn, "/score", {"items": [
                    {"problem": p, "code": c} for p, c in picks]})
                want = [expected[pc] for pc in picks]
                got = out.get("scores")
            else:
                # OpenRLHF form; one response per request has no code block (reward 0)
                queries = [CHAT.format(p) + f"```python\n{c}\n```<|im_end|>" for p, c in picks]
                prompts = [CHAT.format(p) for p, _ in picks]
                queries.append(CHAT.format(picks[0][0]) + "I cannot solve this.<|im_end|>")
                prompts.append(CHAT.format(picks[0][0]))
                status, out = _post(conn, "/get_reward", {
                    "query": queries, "prompts": prompts, "labels": [None] * len(queries)})
                want = [_softplus(expected[pc]) for pc in picks] + [0.0]
                got = out.get("rewards")
                if status == 200 and out["scores"] != out["rewards"]:
                    mine.append(f"client {cid} req {r}: scores != rewards")
            mine_lat = time.perf_counter() - t0
            if status != 200:
                failures.append(f"client {cid} req {r}: HTTP {status} {out}")
                continue
            if not np.allclose(got, want, rtol=1e-5, atol=1e-5):
                mine.append(f"client {cid} req {r}: got {got} want {want}")
            with lock:
                latencies.append(mine_lat)
        conn.close()
        with lock:
            failures.extend(mine)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    wall = time.perf_counter() - t0
    assert not any(t.is_alive() for t in threads), "clients did not finish"
    assert not failures, failures[:5]
    assert len(latencies) == n_clients * n_requests
    p50, p99 = np.percentile(latencies, [50, 99])
    print(f"\n{len(latencies)} requests from {n_clients} clients in {wall:.1f} s: "
          f"p50 {1e3 * p50:.1f} ms, p99 {1e3 * p99:.1f} ms")
    record_property("latency_p50_ms", round(1e3 * float(p50), 2))
    record_property("latency_p99_ms", round(1e3 * float(p99), 2))

    conn = http.client.HTTPConnection(server["host"], server["port"], timeout=30)
    conn.request("GET", "/health")
    health = json.loads(conn.getresponse().read())
    # requests were merged: fewer forward passes than requests that reached the RM
    assert health["items"] / health["batches"] > 1.0, health
    assert health["max_batch_seen"] <= 8


def _raw_request(server, data: bytes) -> tuple[int, bytes]:
    chunks = []
    with socket.create_connection((server["host"], server["port"]), timeout=30) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may answer and close before the request is sent: read the answer
        while True:
            try:
                c = s.recv(65536)
            except ConnectionResetError:
                break
            if not c:
                break
            chunks.append(c)
    resp = b"".join(chunks)
    return int(resp.split(b" ", 2)[1]), resp


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_malformed_and_oversized_requests(server):
    conn = http.client.HTTPConnection(server["host"], server["port"], timeout=30)
    bad = [
        ("/score", b"{not json", 400, "not valid JSON"),
        ("/score", b"\xff\xfe", 400, "not UTF-8"),
        ("/score", b"[1, 2]", 400, "JSON object"),
        ("/score", b'{"items": [{"problem": "p"}]}', 400, "exactly one of"),
        ("/score", b'{"items": [{"problem": 1, "code": "x"}]}', 400, "problem must be a string"),
        ("/get_reward", b'{"query": ["a"]}', 400, "missing field 'prompts'"),
        ("/get_reward", json.dumps({"query": ["q"] * (MAX_ITEMS + 1),
                                    "prompts": ["q"] * (MAX_ITEMS + 1)}).encode(), 413, "limit"),
        ("/score", json.dumps({"items": [{"problem": "p", "code": "x" * (MAX_CHARS + 1)}]})
         .encode(), 413, "characters"),
        ("/nowhere", b"{}", 404, "no such endpoint"),
    ]
    for path, body, status, msg in bad:
        got, out = _post(conn, path, None, raw=body)
        assert got == status and msg in out["error"], (path, body[:40], got, out)
    conn.request("GET", "/score")
    resp = conn.getresponse()
    assert resp.status == 405 and "POST" in json.loads(resp.read())["error"]

    rss0 = _rss_kb(server["pid"])
    # A 10 GB Content-Length is refused from the header alone; the body is never read.
    head = (b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 10000000000\r\n\r\n")
    t0 = time.perf_counter()
    status, resp = _raw_request(server, head + b"{" * 1000)
    assert status == 413 and b"exceeds the limit" in resp
    assert time.perf_counter() - t0 < 10
    # A real body just over the limit: refused, and the server does not grow by its size.
    status, _ = _raw_request(
        server, head.replace(b"10000000000", str(MAX_BODY + 1).encode()) + b" " * (MAX_BODY + 1)
    )
    assert status == 413
    status, resp = _raw_request(server, b"POST /score HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 411
    chunked = b"POST /score HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    status, resp = _raw_request(server, chunked + b"0\r\n\r\n")
    if server["backend"] == "stdlib":
        assert status == 411  # chunked bodies are refused
    else:
        assert status == 400 and b"not valid JSON" in resp  # accepted: an empty body
        # a streamed body is cut at the limit
        piece = b"4000\r\n" + b" " * 0x4000 + b"\r\n"
        status, resp = _raw_request(server, chunked + piece * (MAX_BODY // 0x4000 + 1))
        assert status == 413 and b"exceeds the limit" in resp
    assert _rss_kb(server["pid"]) - rss0 < 50 * 1024  # well under 50 MB of growth

    # the server still answers correctly afterwards, on a fresh and on the old connection
    for c in (conn, http.client.HTTPConnection(server["host"], server["port"], timeout=30)):
        status, out = _post(c, "/score", {"items": [{"problem": "p", "code": "x = 1"}]})
        assert status == 200 and out["valid"] == [True] and isinstance(out["scores"][0], float)
    conn.request("GET", "/health")
    health = json.loads(conn.getresponse().read())
    assert health["status"] == "ok" and health["requests_refused"]["413"] >= 4
