"""Shared by the multi-host tests (tests/test_multihost.py, tests/test_multihost_grpo.py): waiting
on a group of training subprocesses under one deadline."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest


def wait_all(procs: list[tuple[subprocess.Popen, Path]], timeout_s: float, *,
             ok: bool = True) -> None:
    """Wait for every process (one shared deadline of ``timeout_s``); kill all and fail on
    timeout, or (``ok``) on a failed process, with the tail of each log."""
    deadline = time.monotonic() + timeout_s
    try:
        for p, _ in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for p, _ in procs:
            p.kill()
        for p, _ in procs:
            p.wait()
        tails = "\n".join(f"--- {log}\n{log.read_text()[-3000:]}" for _, log in procs)
        pytest.fail(f"multi-host run timed out after {timeout_s} s\n{tails}")
    bad = [(p, log) for p, log in procs if p.returncode != 0]
    if ok and bad:
        tails = "\n".join(f"--- {log} (rc {p.returncode})\n{log.read_text()[-4000:]}"
                          for p, log in bad)
        pytest.fail(f"a training process failed\n{tails}")
