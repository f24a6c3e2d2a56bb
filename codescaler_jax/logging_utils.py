"""Run monitoring: TensorBoard scalars/text (tensorboardX, no TensorFlow), console lines.

Only process 0 writes TensorBoard files; other processes get a writer that does nothing, so
callers never branch on the process index.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import jax


def setup_logging(
    run_dir: str | Path | None = None, name: str = "codescaler_jax"
) -> logging.Logger:
    """Console + file logger whose lines carry the JAX process index (``[p0]``)."""
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.handlers.clear()
    logger.propagate = False
    fmt = logging.Formatter(
        f"%(asctime)s [p{jax.process_index()}] %(levelname)s %(message)s", "%H:%M:%S"
    )
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(fmt)
    logger.addHandler(h)
    if run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(Path(run_dir) / f"log.p{jax.process_index()}.txt")
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    return logger


class Writer:
    """TensorBoard writer (scalars, text) that is a no-op off process 0 or when disabled.

    Events are written synchronously (tensorboardX's ``EventsWriter``, no background queue), so
    after ``flush()`` every event logged so far is on disk: a checkpoint taken right after a
    flush never runs ahead of TensorBoard (``SummaryWriter.flush`` leaves queued events behind).
    """

    _opened = 0  # makes file names unique when two writers open one directory in one second

    def __init__(self, logdir: str | Path | None):
        self._w = None
        if logdir is not None and jax.process_index() == 0:
            import os

            from tensorboardX.event_file_writer import EventsWriter

            Path(logdir).mkdir(parents=True, exist_ok=True)
            Writer._opened += 1
            self._w = EventsWriter(
                str(Path(logdir) / "events"), filename_suffix=f".{os.getpid()}.{Writer._opened}"
            )

    def _write(self, step: int, summary) -> None:
        import time

        from tensorboardX.proto import event_pb2

        self._w.write_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

    def scalars(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        if self._w is None:
            return
        from tensorboardX.summary import scalar

        for k, v in values.items():
            self._write(step, scalar(prefix + k, float(v)))

    def text(self, step: int, tag: str, text: str) -> None:
        if self._w is not None:
            from tensorboardX.summary import text as text_summary

            self._write(step, text_summary(tag, text))

    def flush(self) -> None:
        if self._w is not None:
            self._w.flush()

    def close(self) -> None:
        if self._w is not None:
            self._w.flush()
            self._w.close()
            self._w = None
