"""Shared benchmark helpers: timing, environment description, JSON output."""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def time_call(fn: Callable[[], Any], *, warmup: int = 1, repeat: int = 5) -> dict[str, float]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeat`` times; return seconds (min/median/mean).

    ``fn`` must block until its work is done (e.g. call ``.block_until_ready()``).
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {
        "min_s": times[0],
        "median_s": times[len(times) // 2],
        "mean_s": sum(times) / len(times),
        "repeat": repeat,
    }


def environment() -> dict[str, Any]:
    """Describe the machine the benchmark ran on (host, cores, accelerator)."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    try:
        import jax

        devs = jax.devices()
        info["jax"] = jax.__version__
        info["backend"] = jax.default_backend()
        info["devices"] = [d.device_kind for d in devs]
    except Exception as e:  # noqa: BLE001 - the environment block must never break a benchmark
        info["jax_error"] = repr(e)
    return info


def write_json(name: str, payload: dict[str, Any], out: str | os.PathLike | None = None) -> Path:
    """Write ``payload`` plus an ``environment`` block to ``out`` (default: bench_results/)."""
    path = Path(out) if out else Path("bench_results") / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"benchmark": name, "environment": environment(), **payload}
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path


def require_torch(benchmark: str) -> None:
    """Exit with one line when PyTorch is missing: ``benchmark`` measures against
    ``transformers`` on torch, which only the ``test`` extra installs."""
    try:
        found = importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):  # a blocked or half-removed torch
        found = False
    if not found:
        raise SystemExit(
            f"error: {benchmark} compares against PyTorch, which is not installed; "
            "install the test extra: pip install -e '.[test]'"
        )
