"""Shared benchmark harness: interleaved side-by-side timing, load recording and the
README-grade rule, environment description, JSON output.

Every side-by-side benchmark of ``codescaler_jax.bench`` measures through this module:

- ``interleave(sides, rounds=...)`` runs the sides in rounds A B A B ... (each side once per
  round, after an untimed warm-up of each), so load from other processes hits them alike, and
  records wall and process CPU seconds per call and the order the calls ran in;
- ``median_of_pair_ratios(ours, ref)`` is the figure a benchmark reports: the median over
  rounds of ``ref_i / ours_i`` (> 1: ours is faster), not a ratio of two medians, so a burst
  of load that slows one round slows both of its terms;
- ``LoadMonitor`` records ``os.getloadavg()`` before and after and the cores other processes
  kept busy during the run (``/proc/stat`` minus this process and its reaped children), and
  ``LoadMonitor.verdict(force)`` applies the rule: output is README-grade only when the
  1-minute load before the run and the others' busy cores during it are both at most half the
  cores, or with ``--force``. ``write_json`` stores the verdict as ``readme_grade`` (with the
  ``load`` block); a refused run still writes its JSON, marked ``readme_grade: false`` with
  the refusal message, and prints that message. The load *after* is recorded but not gated:
  a benchmark that uses every core pushes the 1-minute average up by itself.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# A run is README-grade when the machine's other load stays at most this share of the cores.
LOAD_LIMIT_SHARE_OF_CORES = 0.5


def time_call(fn: Callable[[], Any], *, warmup: int = 1, repeat: int = 5) -> dict[str, float]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeat`` times; return seconds (min/median/mean).

    ``fn`` must block until its work is done (e.g. call ``.block_until_ready()``). For one side
    alone; two sides compared go through ``interleave``.
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


# ---- interleaved side-by-side timing -----------------------------------------------------------


def interleave(
    sides: dict[str, Callable[[], Any]], *, rounds: int, warmup: int = 1,
    rotate: bool = False,
) -> dict[str, Any]:
    """Time the zero-argument blocking ``sides`` in rounds (A B A B ... for two sides).

    Each side runs ``warmup`` times untimed (A B per warm-up round), then once per round for
    ``rounds`` rounds. ``rotate`` starts round ``i`` at side ``i % n`` (A B, B A, ...) to
    cancel a first-mover effect. Returns ``{"order": [names in run order], "rounds": rounds,
    "sides": {name: {"wall_s": [...], "cpu_s": [...], "median_s", "min_s", "cpu_median_s"}}}``
    with the per-round lists aligned, so ``result["sides"][a]["wall_s"][i]`` and ``b``'s are
    a pair.
    """
    if rounds < 1:
        raise ValueError(f"interleave: rounds={rounds} must be >= 1")
    names = list(sides)
    for _ in range(warmup):
        for name in names:
            sides[name]()
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    order: list[str] = []
    for i in range(rounds):
        k = i % len(names) if rotate else 0
        for name in names[k:] + names[:k]:
            c0, t0 = time.process_time(), time.perf_counter()
            sides[name]()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            order.append(name)
    return {
        "order": order,
        "rounds": rounds,
        "sides": {
            n: {"wall_s": wall[n], "cpu_s": cpu[n], "median_s": statistics.median(wall[n]),
                "min_s": min(wall[n]), "cpu_median_s": statistics.median(cpu[n])}
            for n in names
        },
    }


def pair_ratios(ours_s: list[float], ref_s: list[float]) -> list[float]:
    """``ref_i / ours_i`` per round (> 1: ours is faster in that round)."""
    if len(ours_s) != len(ref_s) or not ours_s:
        raise ValueError(f"pair_ratios: {len(ours_s)} and {len(ref_s)} times do not pair up")
    return [r / o for o, r in zip(ours_s, ref_s, strict=True)]


def median_of_pair_ratios(ours_s: list[float], ref_s: list[float]) -> float:
    """The median over rounds of ``ref_i / ours_i``: the speed ratio a benchmark reports."""
    return statistics.median(pair_ratios(ours_s, ref_s))


def compare(timing: dict[str, Any], ours: str, ref: str) -> dict[str, Any]:
    """The reported comparison of two sides of an ``interleave`` result: the median of the
    per-round ratios in wall seconds (the headline) and in process CPU seconds."""
    a, b = timing["sides"][ours], timing["sides"][ref]
    return {
        "ours": ours,
        "reference": ref,
        "ratio_median_of_pairs": median_of_pair_ratios(a["wall_s"], b["wall_s"]),
        "ratio_median_of_pairs_cpu_s": median_of_pair_ratios(a["cpu_s"], b["cpu_s"]),
        "pair_ratios": pair_ratios(a["wall_s"], b["wall_s"]),
        "rounds": timing["rounds"],
        "ratio_means": f"{ref} seconds / {ours} seconds per round (> 1: {ours} faster)",
    }


# ---- load and the README-grade rule -----------------------------------------------------------


def _busy_cpu_s() -> float | None:
    """Non-idle CPU seconds of the whole machine since boot (Linux ``/proc/stat``), else None."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    """CPU seconds of this process and of its children that have been waited for."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class LoadMonitor:
    """The machine's load around a benchmark run: start it before the first timed call.

    ``loadavg`` is injectable so that tests can give the rule a busy machine.
    """

    def __init__(self, loadavg: Callable[[], tuple[float, float, float]] = os.getloadavg):
        self._loadavg = loadavg
        self.cpu_count = os.cpu_count() or 1
        self.before = list(loadavg())
        self._t0 = time.perf_counter()
        self._busy0 = _busy_cpu_s()
        self._own0 = _own_cpu_s()

    def verdict(self, force: bool = False) -> dict[str, Any]:
        """The ``load`` block and the README-grade verdict (see the module docstring)."""
        after = list(self._loadavg())
        wall = max(time.perf_counter() - self._t0, 1e-9)
        busy1 = _busy_cpu_s()
        others = None
        if busy1 is not None and self._busy0 is not None:
            others = max(0.0, (busy1 - self._busy0) - (_own_cpu_s() - self._own0)) / wall
        limit = LOAD_LIMIT_SHARE_OF_CORES * self.cpu_count
        too_busy = []
        if self.before[0] > limit:
            too_busy.append(f"1-minute load {self.before[0]:.2f} before the run")
        if others is not None and others > limit:
            too_busy.append(f"other processes kept {others:.2f} cores busy during the run")
        block = {
            "loadavg_before": self.before,
            "loadavg_after": after,
            "other_processes_busy_cores": None if others is None else round(others, 3),
            "cpu_count": self.cpu_count,
            "load_limit": limit,
            "forced": bool(force),
        }
        grade = not too_busy or force
        refusal = None
        if too_busy:
            refusal = (
                f"{'; '.join(too_busy)}: above the limit of {limit:g} (half of {self.cpu_count} "
                "cores); "
                + ("README-grade only because --force was given" if force else
                   "not README-grade; rerun on a quiet machine or pass --force")
            )
        return {"readme_grade": grade, "readme_grade_note": refusal, "load": block}


def add_harness_args(p: argparse.ArgumentParser, *, rounds: int | None = None) -> None:
    """``--force`` (and ``--rounds`` when ``rounds`` is given) on a benchmark's parser."""
    p.add_argument("--force", action="store_true",
                   help="mark the output README-grade even when the machine is busy")
    if rounds is not None:
        p.add_argument("--rounds", type=int, default=rounds,
                       help=f"interleaved rounds per comparison (A B per round; default {rounds})")


# ---- environment and output -----------------------------------------------------------------


def environment() -> dict[str, Any]:
    """Describe the machine the benchmark ran on (host, cores, accelerator)."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
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


def write_json(name: str, payload: dict[str, Any], out: str | os.PathLike | None = None, *,
               monitor: LoadMonitor | None = None, force: bool = False) -> Path:
    """Write ``payload`` plus an ``environment`` block to ``out`` (default: bench_results/).

    With ``monitor`` the ``readme_grade`` verdict and the ``load`` block are added (and a
    refusal is printed to stderr); without one the output is never README-grade.
    """
    path = Path(out) if out else Path("bench_results") / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    if monitor is not None:
        grade = monitor.verdict(force)
    else:
        grade = {"readme_grade": False, "readme_grade_note": "no load recorded"}
    data = {"benchmark": name, **grade, "environment": environment(), **payload}
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    if grade["readme_grade_note"]:
        print(f"{name}: {grade['readme_grade_note']}", file=sys.stderr)
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
