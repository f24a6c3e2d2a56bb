"""The benchmark harness (bench/common.py): interleaved order, the median of per-pair ratios,
the load record and the README-grade rule (refused on a busy machine unless forced)."""

from __future__ import annotations

import json

import pytest

from codescaler_jax.bench import common


def test_sides_run_interleaved_abab_after_warmup():
    calls: list[str] = []
    sides = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    t = common.interleave(sides, rounds=3, warmup=1)
    assert calls == ["a", "b"] + ["a", "b"] * 3  # one warm-up round, then A B A B A B
    assert t["order"] == ["a", "b"] * 3
    for side in t["sides"].values():
        assert len(side["wall_s"]) == len(side["cpu_s"]) == 3
        assert side["min_s"] <= side["median_s"]
    rotated = common.interleave(sides, rounds=2, warmup=0, rotate=True)
    assert rotated["order"] == ["a", "b", "b", "a"]
    with pytest.raises(ValueError):
        common.interleave(sides, rounds=0)


def test_ratio_is_the_median_of_per_pair_ratios_not_a_ratio_of_medians():
    ours = [1.0, 2.0, 4.0]
    ref = [2.0, 2.0, 12.0]  # per pair 2, 1, 3 -> median 2; median(ref)/median(ours) = 1
    assert common.pair_ratios(ours, ref) == [2.0, 1.0, 3.0]
    assert common.median_of_pair_ratios(ours, ref) == 2.0
    assert common.median_of_pair_ratios([1.0, 1.0], [1.0, 3.0]) == 2.0  # even count: mean
    with pytest.raises(ValueError):
        common.median_of_pair_ratios([1.0], [1.0, 2.0])
    timing = {"rounds": 3, "sides": {
        "ours": {"wall_s": ours, "cpu_s": [1.0, 1.0, 1.0]},
        "ref": {"wall_s": ref, "cpu_s": [3.0, 3.0, 3.0]}}}
    c = common.compare(timing, "ours", "ref")
    assert c["ratio_median_of_pairs"] == 2.0 and c["ratio_median_of_pairs_cpu_s"] == 3.0


def _quiet_elsewhere(monkeypatch):
    # No /proc/stat reading: the rule then rests on the (injected) load average alone, so the
    # test does not depend on what else this machine runs.
    monkeypatch.setattr(common, "_busy_cpu_s", lambda: None)


def test_busy_machine_is_refused_unless_forced(tmp_path, monkeypatch, capsys):
    _quiet_elsewhere(monkeypatch)
    monkeypatch.setattr(common.os, "cpu_count", lambda: 2)
    busy = common.LoadMonitor(loadavg=lambda: (3.5, 2.0, 1.0))
    out = tmp_path / "b.json"
    common.write_json("x", {"ratio": 1.0}, out, monitor=busy)
    data = json.loads(out.read_text())
    assert data["readme_grade"] is False
    assert "3.50" in data["readme_grade_note"] and "half of 2 cores" in data["readme_grade_note"]
    assert data["load"]["loadavg_before"] == [3.5, 2.0, 1.0] and data["load"]["load_limit"] == 1
    assert data["ratio"] == 1.0  # the figures are still written, marked
    assert "not README-grade" in capsys.readouterr().err
    common.write_json("x", {}, out, monitor=busy, force=True)
    data = json.loads(out.read_text())
    assert data["readme_grade"] is True and data["load"]["forced"] is True
    assert "--force" in data["readme_grade_note"]


def test_quiet_machine_is_readme_grade(tmp_path, monkeypatch):
    _quiet_elsewhere(monkeypatch)
    monkeypatch.setattr(common.os, "cpu_count", lambda: 2)
    quiet = common.LoadMonitor(loadavg=lambda: (0.4, 0.5, 0.6))
    v = quiet.verdict()
    assert v["readme_grade"] is True and v["readme_grade_note"] is None
    assert v["load"]["loadavg_after"] == [0.4, 0.5, 0.6]
    # Without a monitor nothing is README-grade.
    common.write_json("x", {}, tmp_path / "n.json")
    assert json.loads((tmp_path / "n.json").read_text())["readme_grade"] is False


def test_other_processes_busy_during_the_run_are_refused(monkeypatch):
    monkeypatch.setattr(common.os, "cpu_count", lambda: 2)
    busy = iter([100.0, 100.0 + 50.0])  # 50 machine CPU seconds during the run ...
    monkeypatch.setattr(common, "_busy_cpu_s", lambda: next(busy))
    own = iter([0.0, 1.0])  # ... of which 1 were ours
    monkeypatch.setattr(common, "_own_cpu_s", lambda: next(own))
    clock = iter([0.0, 10.0])  # over 10 s: 4.9 cores busy elsewhere
    monkeypatch.setattr(common.time, "perf_counter", lambda: next(clock))
    v = common.LoadMonitor(loadavg=lambda: (0.1, 0.1, 0.1)).verdict()
    assert v["readme_grade"] is False
    assert v["load"]["other_processes_busy_cores"] == pytest.approx(4.9)
    assert "other processes kept 4.90 cores busy" in v["readme_grade_note"]


def test_every_side_by_side_benchmark_uses_the_harness():
    """Each side-by-side benchmark records the load through LoadMonitor and takes --force."""
    import importlib

    for name in ("model", "train_rm", "sampler", "extract", "best_of_n", "serve", "attention",
                 "scan_layers", "suite"):
        src = importlib.util.find_spec(f"codescaler_jax.bench.{name}").origin
        text = open(src, encoding="utf-8").read()
        assert "LoadMonitor()" in text and "monitor=monitor" in text, name
        assert "add_harness_args(" in text, name
