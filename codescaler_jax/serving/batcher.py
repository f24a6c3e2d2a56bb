"""Dynamic batching: items from concurrent requests share one RM forward pass.

Request threads call `Batcher.submit` with their (problem, code) items and block. One worker
thread, the only thread that touches the device, takes pending items in arrival order until
``max_batch`` items are collected or ``max_wait_s`` has passed since the oldest pending item
arrived, scores them with a single ``score_fn`` call, and hands each request its slice. A
request larger than ``max_batch`` is spread over several batches. The number of items waiting
is bounded (``max_pending``): past it `submit` raises `Overloaded` at once instead of queueing
without limit.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

ScoreFn = Callable[[Sequence[str], Sequence[str]], np.ndarray]


class Overloaded(RuntimeError):
    """Too many items are already waiting; the caller should retry later (HTTP 503)."""


@dataclasses.dataclass(eq=False)
class _Job:
    problems: Sequence[str]
    codes: Sequence[str]
    scores: np.ndarray
    taken: int = 0  # items handed to a batch so far
    remaining: int = 0  # items not scored yet
    error: BaseException | None = None
    done: threading.Event = dataclasses.field(default_factory=threading.Event)


@dataclasses.dataclass
class BatchStats:
    """Counters for /health: batches run, items scored, the largest batch, device seconds."""

    batches: int = 0
    items: int = 0
    max_batch_seen: int = 0
    busy_s: float = 0.0


class Batcher:
    """Collects items from many threads into batches for one ``score_fn``.

    Args:
        score_fn: ``(problems, codes) -> scores [n] float32``; called from the worker thread only.
        max_batch: most items per ``score_fn`` call.
        max_wait_s: how long the oldest waiting item may wait for the batch to fill.
        max_pending: most items waiting at once (beyond it, `submit` raises `Overloaded`).
    """

    def __init__(
        self,
        score_fn: ScoreFn,
        *,
        max_batch: int,
        max_wait_s: float = 0.005,
        max_pending: int = 4096,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.score_fn = score_fn
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_pending = max_pending
        self.stats = BatchStats()
        self._queue: collections.deque[tuple[_Job, float]] = collections.deque()
        self._pending = 0
        self._cv = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="rm-batcher", daemon=True)
        self._worker.start()

    @property
    def pending(self) -> int:
        return self._pending

    def submit(
        self, problems: Sequence[str], codes: Sequence[str], timeout: float | None = None
    ) -> np.ndarray:
        """Scores ``[n]`` float32 of the items, in order. Blocks until all are scored."""
        n = len(codes)
        if len(problems) != n:
            raise ValueError(f"{len(problems)} problems but {n} codes")
        if n == 0:
            return np.zeros(0, np.float32)
        job = _Job(problems, codes, np.zeros(n, np.float32), remaining=n)
        with self._cv:
            if self._closed:
                raise RuntimeError("batcher is closed")
            if self._pending + n > self.max_pending:
                raise Overloaded(
                    f"{self._pending} items already waiting; limit is {self.max_pending}"
                )
            self._pending += n
            self._queue.append((job, time.monotonic()))
            self._cv.notify()
        if not job.done.wait(timeout):
            raise TimeoutError(f"scoring {n} items took longer than {timeout} s")
        if job.error is not None:
            raise RuntimeError(f"scoring failed: {job.error!r}") from job.error
        return job.scores

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._worker.join(timeout=5)

    def _collect(self) -> list[tuple[_Job, int, int]] | None:
        """Wait for a batch; returns ``[(job, start, end)]`` slices (None when closed)."""
        with self._cv:
            while not self._queue and not self._closed:
                self._cv.wait()
            if not self._queue:
                return None
            deadline = self._queue[0][1] + self.max_wait_s
            while self._pending < self.max_batch and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            slices, room = [], self.max_batch
            while self._queue and room > 0:
                job, _ = self._queue[0]
                take = min(room, len(job.codes) - job.taken)
                slices.append((job, job.taken, job.taken + take))
                job.taken += take
                room -= take
                if job.taken == len(job.codes):
                    self._queue.popleft()
            self._pending -= self.max_batch - room
            return slices

    def _run(self) -> None:
        while True:
            slices = self._collect()
            if slices is None:
                return
            problems = [p for job, a, b in slices for p in job.problems[a:b]]
            codes = [c for job, a, b in slices for c in job.codes[a:b]]
            t0 = time.perf_counter()
            try:
                scores = np.asarray(self.score_fn(problems, codes), np.float32)
                if scores.shape != (len(codes),):
                    raise ValueError(f"score_fn returned shape {scores.shape} for {len(codes)}")
            except Exception as e:  # noqa: BLE001 - reported to every waiting request
                for job, _, _ in slices:
                    job.error = e
                    job.done.set()
                continue
            self.stats.batches += 1
            self.stats.items += len(codes)
            self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(codes))
            self.stats.busy_s += time.perf_counter() - t0
            off = 0
            for job, a, b in slices:
                job.scores[a:b] = scores[off : off + b - a]
                off += b - a
                job.remaining -= b - a
                if job.remaining == 0 and job.error is None:
                    job.done.set()
