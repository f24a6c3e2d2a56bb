"""Commands under bad input and faults (issue 11, part B): each case reproduced, then fixed.

Each test names its case (B1 ... B9). Commands run in-process through their ``main(argv)`` where
that shows the behaviour, and as child processes where the case is about a process (peak
memory, a real SIGKILL, a server under slow clients).
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# ---- B9: README and --help ---------------------------------------------------------------------

CLI_MODULES = [
    "codescaler_jax.train_rm",
    "codescaler_jax.train_grpo",
    "codescaler_jax.score",
    "codescaler_jax.extract",
    "codescaler_jax.serve",
    "codescaler_jax.best_of_n",
    "codescaler_jax.eval.codegen",
    "codescaler_jax.eval.rm_bench",
    *(
        f"codescaler_jax.bench.{p.stem}"
        for p in sorted((REPO / "codescaler_jax" / "bench").glob("*.py"))
        if p.stem not in ("__init__", "common") and "__main__" in p.read_text()
    ),
]


@pytest.mark.parametrize("module", CLI_MODULES)
def test_b9_help_names_the_command(module, capsys):
    """``python -m X --help`` says ``usage: python -m X`` (not ``usage: model.py``)."""
    mod = importlib.import_module(module)
    with pytest.raises(SystemExit) as e:
        mod.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m {module}"), out[:80]


def test_b9_readme_points_inside_the_repository_and_creates_one_venv():
    text = (REPO / "README.md").read_text()
    assert "shared/reference" not in text and "steering repo" not in text
    # every backticked relative path into a top-level folder of the repository exists
    for path in re.findall(r"`((?:codescaler_jax|configs|launch|tests)/[\w./-]+)`", text):
        assert (REPO / path.rstrip("/")).exists() or "*" in path, path
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", quick, re.S)
    assert len(commands) >= 2  # install + tests, install + train_rm (then more examples)
    # the first creates the venv; the second reuses it and creates one only where none exists
    assert commands[0].startswith("python3.11 -m venv .venv && ")
    assert commands[1].startswith("test -d .venv || python3.11 -m venv .venv; ")
    assert "pytest" in commands[0] and "train_rm --config configs/rm_tiny.yaml" in commands[1]
    for cfg in (REPO / "configs").glob("*.yaml"):
        assert "shared/reference" not in cfg.read_text(), cfg


# ---- shared fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    from tiny_rm import save_tiny_rm

    return save_tiny_rm(tmp_path_factory.mktemp("rm") / "tiny_rm")


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


GOOD = {"problem": "Return 1.", "response": "```python\ndef f():\n    return 1\n```"}


# ---- B6: partial outputs and file modes --------------------------------------------------------


def test_b6_score_leaves_no_partial_file_and_keeps_the_old_output(rm_dir, tmp_path, capsys):
    from codescaler_jax.score import main as score_main

    inp = _write_jsonl(tmp_path / "in.jsonl", [GOOD, GOOD, '{"problem": 3}'])
    out = tmp_path / "out.jsonl"
    out.write_text("an earlier result\n")
    args = ["--rm", str(rm_dir), "--input", str(inp), "--output", str(out), "--max-length",
            "128", "--batch-size", "8", "--chunk", "1", "--no-progress"]
    assert score_main(args) == 2  # two records were already scored when line 3 failed
    err = capsys.readouterr().err
    assert f"{inp}:3" in err and "nothing written" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]
    assert out.read_text() == "an earlier result\n"
    assert score_main([*args, "--skip-bad"]) == 0
    assert len(out.read_text().splitlines()) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_b6_extract_and_hf_export_respect_the_umask(tmp_path, umask):
    import os

    from tiny_rm import save_tiny_rm

    from codescaler_jax.extract import main as extract_main

    inp = _write_jsonl(tmp_path / "in.jsonl", [GOOD])
    old = os.umask(umask)
    try:
        assert extract_main(["--input", str(inp), "--output", str(tmp_path / "o.jsonl"),
                             "--no-progress"]) == 0
        hf = save_tiny_rm(tmp_path / "hf")
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    assert (tmp_path / "o.jsonl").stat().st_mode & 0o777 == want
    for f in hf.iterdir():
        assert f.stat().st_mode & 0o777 == want, f.name


# ---- B5: bad config and arguments fail at load, naming the key, with no traceback --------------


def _bad_rm(tmp_path: Path) -> Path:
    d = tmp_path / "bad_rm"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "qwen3", oops}')
    return d


def _b5_cases(tmp: Path) -> list[tuple[str, list[str], str]]:
    """(module, argv, what the one-line error must name)."""
    run = ["--config", "configs/rm_tiny.yaml", "--no-progress", "--set", f"run_dir={tmp}/run"]
    grpo = ["--config", "configs/grpo_tiny.yaml", "--no-progress", "--set", f"run_dir={tmp}/run"]
    bad_rm = str(_bad_rm(tmp))
    inp = str(_write_jsonl(tmp / "in.jsonl", [GOOD]))
    bad_jsonl = str(_write_jsonl(tmp / "bad.jsonl", ["{not json"]))
    out = str(tmp / "out.jsonl")
    return [
        ("train_rm", [*run, "--set", "train.global_batch_size=-4"], "train.global_batch_size"),
        ("train_rm", [*run, "--set", "train.grad_accum_steps=0"], "train.grad_accum_steps"),
        ("train_rm", [*run, "--set", f"data.source={tmp}/nope/pairs.jsonl"], "data.source"),
        ("train_rm", [*run, "--set", f"data.tokenizer={tmp}/nope"], "data.tokenizer"),
        ("train_rm", [*run, "--set", f"model.init_from={tmp}/nope"], "model.init_from"),
        ("train_rm", [*run, "--set", "optim.b2=1.5"], "optim.b2"),
        ("train_grpo", [*grpo, "--set", "rollout.batch_size=0"], "rollout.batch_size"),
        ("train_grpo", [*grpo, "--set", f"data.source={tmp}/nope.jsonl"], "data.source"),
        ("train_grpo", [*grpo, "--set", f"reward.rm_path={tmp}/nope"], "reward.rm_path"),
        ("score", ["--rm", bad_rm, "--input", inp, "--output", out], f"{bad_rm}/config.json"),
        ("score", ["--rm", bad_rm, "--input", f"{tmp}/nope.jsonl", "--output", out], "nope.jsonl"),
        ("serve", ["--rm", bad_rm, "--port", "0"], f"{bad_rm}/config.json"),
        ("serve", ["--rm", f"{tmp}/nope", "--port", "0"], f"{tmp}/nope"),
        ("best_of_n", ["--rm", bad_rm, "--problems", "humaneval", "--limit", "2", "--candidates",
                       bad_jsonl, "--out-dir", f"{tmp}/bon"], "bad.jsonl:1"),
        ("eval.codegen", ["--problems", f"{tmp}/nope.jsonl", "--samples", inp, "--out-dir",
                          f"{tmp}/cg"], "nope.jsonl"),
        ("eval.rm_bench", ["--rm", bad_rm, "--pairs", inp, "--out", out], "config.json"),
        ("eval.rm_bench", ["--from-scores", "--data", bad_jsonl, "--out", out], "bad.jsonl"),
        ("extract", ["--input", bad_jsonl, "--output", out], "bad.jsonl:1"),
    ]


def test_b5_bad_input_is_one_error_line_and_exit_2_before_any_work(tmp_path, capsys):
    import time

    for module, argv, names in _b5_cases(tmp_path):
        main = importlib.import_module(f"codescaler_jax.{module}").main
        t0 = time.perf_counter()
        rc = main(argv)  # an exception escaping here (a traceback for the user) fails the test
        took = time.perf_counter() - t0
        err = capsys.readouterr().err
        assert rc == 2, (module, argv, err)
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: ") and names in last, (module, names, err)
        assert "Traceback" not in err
        assert took < 30, (module, took)  # refused up front, not after loading or scoring
        assert not (tmp_path / "run").exists(), module  # no run directory work started
        assert not (tmp_path / "out.jsonl").exists(), module


@pytest.mark.parametrize(
    "module, argv, names",
    [
        ("score", ["--rm", "x", "--input", "x", "--output", "y", "--shaping", "softmax"],
         "--shaping"),
        ("score", ["--rm", "x", "--input", "x", "--output", "y", "--batch-size", "0"],
         "--batch-size"),
        ("serve", ["--rm", "x", "--shaping", "softmax"], "--shaping"),
        ("serve", ["--rm", "x", "--row-buckets", "4,x"], "--row-buckets"),
        ("extract", ["--input", "x", "--output", "y", "--time-limit", "0"], "--time-limit"),
        ("best_of_n", ["--rm", "x", "--problems", "humaneval", "--candidates", "c",
                       "--format", "nope"], "--format"),
        ("eval.codegen", ["--problems", "humaneval", "--samples", "s", "--k", "-1"], "--k"),
    ],
)
def test_b5_bad_arguments_are_refused_by_the_parser(module, argv, names, capsys):
    main = importlib.import_module(f"codescaler_jax.{module}").main
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert names in capsys.readouterr().err


def test_b5_no_traceback_from_the_real_entry_point(tmp_path):
    """The same through ``python -m`` in a child process: one line on stderr, status 2."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run(
        [sys.executable, "-m", "codescaler_jax.train_rm", "--config", "configs/rm_tiny.yaml",
         "--set", f"run_dir={tmp_path}/run", "--set", "train.grad_accum_steps=0"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=120,
    )
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "error: train.grad_accum_steps must be >= 1, got 0"
    ], res.stderr
    assert not (tmp_path / "run").exists()
