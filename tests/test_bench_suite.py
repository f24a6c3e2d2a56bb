"""The benchmark suite's plumbing: discovery, and failures and hangs of one benchmark recorded
instead of stopping the suite (the benchmarks themselves are measured, not unit-tested)."""

from __future__ import annotations

import json
from pathlib import Path

from codescaler_jax.bench import suite

BENCH_DIR = Path(suite.__file__).parent


def test_every_benchmark_module_is_discovered():
    on_disk = {p.stem for p in BENCH_DIR.glob("*.py") if not p.stem.startswith("_")}
    found = suite.benchmark_modules()
    assert set(found) == on_disk - {"common", "suite"}
    assert {"model", "train_rm", "sampler", "extract", "best_of_n"} <= set(found)
    assert found == sorted(found)


def test_a_failing_benchmark_is_recorded(tmp_path):
    rec = suite.run_module("suite", ["--no-such-flag"], tmp_path / "x.json", timeout_s=120)
    assert rec["returncode"] == 2
    assert rec["status"] == "exit 2, no JSON written"
    assert "--no-such-flag" in rec["output_tail"]
    assert "result" not in rec


def test_a_hanging_benchmark_is_cut_at_its_timeout(tmp_path):
    rec = suite.run_module("suite", ["--help"], tmp_path / "x.json", timeout_s=0.01)
    assert rec["returncode"] is None and rec["status"].startswith("timeout after")


def test_unknown_names_are_refused(capsys):
    assert suite.main(["--only", "model,nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_the_report_embeds_each_result(tmp_path, monkeypatch):
    def fake_run(name, args, out, timeout_s):
        out.write_text(json.dumps({"benchmark": name, "ratio_ours_over_ref": 1.5}))
        return {
            "command": [name, *args],
            "wall_s": 0.0,
            "returncode": 0,
            "status": "ok",
            "result": json.loads(out.read_text()),
        }

    monkeypatch.setattr(suite, "run_module", fake_run)
    out = tmp_path / "suite.json"
    assert suite.main(["--quick", "--only", "model,rm_step", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["mode"] == "quick" and report["benchmarks_run"] == ["model", "rm_step"]
    assert report["results"]["model"]["command"] == ["model", "--small"]
    assert report["results"]["rm_step"]["command"][:3] == ["suite", "--rm-step-only", "--repeat"]
    assert report["results"]["model"]["result"]["ratio_ours_over_ref"] == 1.5
