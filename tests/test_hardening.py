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


def test_b5_serve_on_a_busy_port_is_one_error_line(rm_dir, capsys):
    import socket

    from codescaler_jax.serve import main as serve_main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        rc = serve_main(["--rm", str(rm_dir), "--port", str(port), "--max-length", "64",
                         "--max-batch", "8", "--no-warmup"])
    assert rc == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot listen on 127.0.0.1:{port}"), last


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


# ---- B1: run-directory integrity ---------------------------------------------------------------

RM_TINY = [
    "model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=1",
    "model.num_attention_heads=2", "model.num_key_value_heads=1", "model.head_dim=16",
    # 384 tokens: every pair of the fixture's problems differs within it (at 128 all would be
    # identical after truncation and dropped, see B8)
    "data.max_length=384", "data.min_bucket=384", "data.eval_fraction=0.25",
    "data.validation_fraction=0", "train.early_stopping_patience=null",
    "optim.warmup_steps=1", "train.global_batch_size=8", "train.eval_batch_size=8",
    "train.eval_every=0", "train.save_every=1", "train.keep_checkpoints=5",
]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    from codescaler_jax.data.pairs import Pair, write_pairs_jsonl
    from codescaler_jax.data.problems import humaneval_problems
    from codescaler_jax.data.verified import humaneval_candidates

    probs = humaneval_problems()[:16]
    cands = humaneval_candidates(probs, mutants_per_problem=3)
    pairs = [Pair(p.prompt, c[0], m, p.problem_id) for p, c in zip(probs, cands) for m in c[1:]]
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    write_pairs_jsonl(pairs, path)
    return path


def _rm_argv(run_dir: Path, pairs: Path, *sets: str) -> list[str]:
    over = [f"run_dir={run_dir}", f"data.source={pairs}", *RM_TINY, *sets]
    return ["--config", "configs/rm_tiny.yaml", "--no-progress",
            *[a for s in over for a in ("--set", s)]]


def _tb_steps(tb: Path, tag: str = "train/loss") -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def used_run(tmp_path_factory, pairs_file):
    """A finished 3-step train_rm run (checkpoints 1, 2, 3) plus a file of the user's."""
    from codescaler_jax.train_rm import main

    run = tmp_path_factory.mktemp("used") / "run"
    assert main(_rm_argv(run, pairs_file, "train.max_steps=3")) == 0
    (run / "notes.txt").write_text("mine")
    return run


def test_b1_used_run_dir_is_refused_without_resume_or_overwrite(used_run, pairs_file, capsys):
    from codescaler_jax.train_rm import main

    before = _snapshot(used_run)
    assert main(_rm_argv(used_run, pairs_file, "train.max_steps=3", "data.max_pairs=8")) == 2
    err = capsys.readouterr().err
    assert f"run directory {used_run} already holds a run" in err
    assert "--resume" in err and "--overwrite" in err
    assert _snapshot(used_run) == before  # nothing touched, the cache not reused


def test_b1_resume_refuses_a_changed_config_naming_the_keys(used_run, pairs_file, capsys):
    from codescaler_jax.train_rm import main

    before = _snapshot(used_run)
    argv = _rm_argv(used_run, pairs_file, "train.max_steps=3", "data.max_pairs=8",
                    "optim.learning_rate=0.01")
    assert main([*argv, "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: --resume: the config differs")
    assert "data.max_pairs: None -> 8" in err
    assert re.search(r"optim.learning_rate: [0-9.e-]+ -> 0.01", err)
    assert "train.max_steps" in err  # what may change is named too
    assert _snapshot(used_run) == before


def test_b1_resume_that_trains_nothing_says_so_and_keeps_hf(used_run, pairs_file):
    from codescaler_jax.train_rm import main

    before = _snapshot(used_run)
    log_file = used_run / "log.p0.txt"
    n = len(log_file.read_text())
    assert main([*_rm_argv(used_run, pairs_file, "train.max_steps=3"), "--resume"]) == 0
    text = log_file.read_text()[n:]  # what this invocation logged
    assert "nothing to train: the checkpoint" in text and "is at step 3" in text
    assert "not re-measured" in text
    assert "untrained" not in text and "final held-out" not in text
    after = _snapshot(used_run)
    for name in ("summary.json", "hf/model.safetensors", "hf/config.json"):
        assert after[name] == before[name], name
    assert [k for k in after if k.startswith("tb/")] == [k for k in before if k.startswith("tb/")]


def test_b1_overwrite_starts_clean(used_run, pairs_file, tmp_path):
    """--overwrite deletes the old checkpoints, pairs cache, hf/, tb events and summary, keeps
    the user's file, and the new data config takes effect (max_pairs=8 trains on 8 pairs)."""
    import shutil

    from codescaler_jax.train_rm import main

    run = tmp_path / "run"
    shutil.copytree(used_run, run)
    (run / "data" / "stats.json").write_text(
        (run / "data" / "stats.json").read_text().replace('"train_pairs"', '"stale_marker": 1, '
                                                          '"train_pairs"'))
    assert main([*_rm_argv(run, pairs_file, "train.max_steps=2", "data.max_pairs=8"),
                 "--overwrite"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data"]["train_pairs"] == 8 and summary["steps"] == 2
    assert "stale_marker" not in (run / "data" / "stats.json").read_text()
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [
        "1", "2"]  # step 3 of the old run is gone
    assert _tb_steps(run / "tb") == [1, 2]  # one event file, the new run's
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 1
    assert (run / "notes.txt").read_text() == "mine"
    assert len(list(run.glob("log.p*.txt"))) == 1


@pytest.mark.slow  # CI time: the faster tests of this file cover the same path
def test_b1_resume_with_a_larger_budget_continues(used_run, pairs_file, tmp_path):
    import shutil

    from codescaler_jax.train_rm import main

    run = tmp_path / "run"
    shutil.copytree(used_run, run)
    assert main([*_rm_argv(run, pairs_file, "train.max_steps=4", "train.save_every=2"),
                 "--resume"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["first_step"], summary["steps_run"], summary["steps"]) == (3, 1, 4)
    assert _tb_steps(run / "tb") == [1, 2, 3, 4]


def test_b1_pair_cache_is_keyed_by_the_data_config(tmp_path, pairs_file):
    """Library use without the run-directory check: a changed data.max_pairs or a changed
    source file rebuilds the cached pairs instead of reusing them."""
    import shutil

    from codescaler_jax.config import load_config
    from codescaler_jax.rm.config import RMTrainConfig
    from codescaler_jax.rm.trainer import RMTrainer

    src = tmp_path / "pairs.jsonl"
    shutil.copy(pairs_file, src)

    def load(*sets):
        cfg = load_config(RMTrainConfig, "configs/rm_tiny.yaml",
                          [f"run_dir={tmp_path}/run", f"data.source={src}", *RM_TINY, *sets])
        t = RMTrainer(cfg, progress=False)
        t.run_dir.mkdir(exist_ok=True)
        return t._load_pairs()

    train, _, _, stats = load("data.max_pairs=10")
    assert len(train) == stats["train_pairs"] == 10
    train, _, _, stats = load("data.max_pairs=12")
    assert len(train) == stats["train_pairs"] == 12
    again, _, _, _ = load("data.max_pairs=12")
    assert again == train  # same config: the cache is reused
    lines = src.read_text().splitlines()
    src.write_text("\n".join(lines[: len(lines) // 2]) + "\n")  # the source file changed
    _, _, _, stats = load("data.max_pairs=12")
    assert stats["read"]["read"] == len(lines) // 2


def test_b1_train_grpo_shares_the_run_directory_rules(tmp_path, rm_dir, capsys):
    from codescaler_jax.config import load_config, save_config
    from codescaler_jax.rl.config import GRPOConfig
    from codescaler_jax.rl.trainer import GRPOTrainer
    from codescaler_jax.train_grpo import main

    run = tmp_path / "run"
    sets = [f"run_dir={run}", f"reward.rm_path={rm_dir}"]
    cfg = load_config(GRPOConfig, "configs/grpo_tiny.yaml", sets)
    (run / "checkpoints").mkdir(parents=True)
    save_config(cfg, run / "config.yaml")
    (run / "notes.txt").write_text("mine")
    argv = ["--config", "configs/grpo_tiny.yaml", *[a for s in sets for a in ("--set", s)]]
    assert main(argv) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main([*argv, "--set", "algorithm.beta=0.1", "--resume"]) == 2
    assert "algorithm.beta: 0.0 -> 0.1" in capsys.readouterr().err
    assert main([*argv, "--resume", "--overwrite"]) == 2
    GRPOTrainer(cfg, overwrite=True).prepare()
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]


# ---- B7: TensorBoard after a kill -9 and --resume ------------------------------------------------

_KILLED_CHILD = '''
import json, os, signal, sys, time
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from codescaler_jax.config import load_config
from codescaler_jax.rm.config import RMTrainConfig
from codescaler_jax.rm.trainer import RMTrainer

record = Path(sys.argv[1])
cfg = load_config(RMTrainConfig, "configs/rm_tiny.yaml", sys.argv[2:])


def on_step(step, metrics):
    if step == 4:  # just after the step-4 checkpoint: which steps are on disk?
        acc = EventAccumulator(str(Path(cfg.run_dir) / "tb"))
        acc.Reload()
        tags = acc.Tags()["scalars"]
        steps = [e.step for e in acc.Scalars("train/loss")] if "train/loss" in tags else []
        record.write_text(json.dumps(steps))
    if step == 5:
        # Orbax writes checkpoints in the background: wait until step 4's is complete, so the
        # resume point is known; then the events past it reach the disk (they often do).
        done = Path(cfg.run_dir) / "checkpoints" / "4"
        for _ in range(1200):
            if done.is_dir():
                break
            time.sleep(0.1)
        trainer.writer.flush()
        os.kill(os.getpid(), signal.SIGKILL)


trainer = RMTrainer(cfg, progress=False, on_step=on_step)
trainer.run()
'''


def test_b7_tensorboard_has_one_point_per_step_after_kill_and_resume(tmp_path, pairs_file):
    """A train_rm process SIGKILLed at step 5 (checkpoints every 2 steps) and resumed from
    step 4: every step 1..6 has exactly one point, none missing, none twice."""
    import os
    import signal
    import subprocess
    import sys

    from codescaler_jax.config import load_config
    from codescaler_jax.rm.config import RMTrainConfig
    from codescaler_jax.rm.trainer import RMTrainer

    run = tmp_path / "run"
    sets = [f"run_dir={run}", f"data.source={pairs_file}", *RM_TINY, "train.max_steps=6",
            "train.save_every=2", "train.eval_every=3"]
    script = tmp_path / "child.py"
    script.write_text(_KILLED_CHILD)
    record = tmp_path / "on_disk_at_4.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, str(script), str(record), *sets], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    # every step up to the checkpoint was on disk when the checkpoint existed
    assert json.loads(record.read_text()) == [1, 2, 3, 4]
    assert 5 in _tb_steps(run / "tb")  # the killed run got past its last checkpoint
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [
        "2", "4"]

    cfg = load_config(RMTrainConfig, "configs/rm_tiny.yaml", sets)
    RMTrainer(cfg, resume=True, progress=False).run()
    for tag in ("train/loss", "train/learning_rate"):
        assert _tb_steps(run / "tb", tag) == [1, 2, 3, 4, 5, 6], tag
    assert _tb_steps(run / "tb", "eval/accuracy") == [0, 3, 6]


# ---- B8: pairs identical after truncation are dropped and counted; ties reported apart ----------


def test_b8_drop_identical_and_ties_unit():
    import numpy as np

    from codescaler_jax.data.pairs import Pair
    from codescaler_jax.data.pipeline import TokenizedPairs, drop_identical
    from codescaler_jax.rm.loss import bt_metrics, finalize_metrics

    a, b = np.array([1, 2, 3], np.int32), np.array([1, 2, 4], np.int32)
    toks = TokenizedPairs([a, a, a[:2]], [a.copy(), b, a])
    pairs = [Pair("p", f"c{i}", f"r{i}") for i in range(3)]
    kept, kept_tok, n = drop_identical(pairs, toks)
    assert n == 1 and [p.chosen for p in kept] == ["c1", "c2"] and len(kept_tok) == 2
    m = finalize_metrics(bt_metrics(np.array([1.0, 2.0, 0.5, 3.0]), np.array([0.0, 2.0, 0.5, 4.0]),
                                    np.ones(4)))
    assert m["accuracy"] == 0.25 and m["tie_fraction"] == 0.5


def test_b8_identical_pairs_are_dropped_from_training_and_eval_and_counted(tmp_path):
    """Pairs whose codes differ only past max_length tokens are dropped from both sides and
    counted in summary.json; the held-out metrics report ties separately."""
    from codescaler_jax.data.pairs import Pair, write_pairs_jsonl
    from codescaler_jax.train_rm import main

    filler = "# " + "pad " * 300 + "\n"  # far more than 128 tokens of shared prefix
    def pairs(n_same, n_diff, tag):
        out = [Pair(f"Return {i} ({tag}).", filler + f"return {i}", filler + f"return -{i}",
                    f"{tag}s{i}") for i in range(n_same)]
        out += [Pair(f"Return {i} ({tag}).", f"def f():\n    return {i}",
                     f"def f():\n    return {i + 1}", f"{tag}d{i}") for i in range(n_diff)]
        return out
    train, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    write_pairs_jsonl(pairs(5, 16, "t"), train)
    write_pairs_jsonl(pairs(3, 8, "e"), held)
    run = tmp_path / "run"
    sets = [f"run_dir={run}", f"data.source={train}", f"data.eval_source={held}", *RM_TINY,
            "data.max_length=128", "data.min_bucket=128", "train.max_steps=2",
            "train.export_hf=false"]
    assert main(["--config", "configs/rm_tiny.yaml", "--no-progress",
                 *[a for s in sets for a in ("--set", s)]]) == 0
    summary = json.loads((run / "summary.json").read_text())
    d = summary["data"]
    assert d["identical_after_truncation"] == {"train": 5, "eval": 3, "max_length": 128}
    assert (d["train_pairs"], d["train_pairs_used"]) == (21, 16)
    assert (d["eval_pairs"], d["eval_pairs_used"]) == (11, 8)
    for key in ("untrained_eval", "final_eval"):
        assert "tie_fraction" in summary[key] and 0.0 <= summary[key]["tie_fraction"] <= 1.0
        assert summary[key]["pairs"] == 8  # evaluated on the 8 that differ


# ---- B4: huge records: a size limit per record, text cut before tokenising --------------------


# Runs the command and writes its peak RSS (KiB) to argv[1]. A launcher of its own: a child
# forked straight from pytest would count pytest's pages in its ru_maxrss.
_PEAK_LAUNCHER = (
    "import resource, subprocess, sys\n"
    "rc = subprocess.call(sys.argv[2:])\n"
    "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\n"
    "sys.exit(rc)\n"
)


def _run_child(argv: list[str], timeout: float = 600) -> tuple[int, float, float, str]:
    """Run ``python -m ARGV``; ``(returncode, peak RSS in MB, wall s, stderr)``."""
    import os
    import subprocess
    import sys
    import tempfile
    import time

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory() as d:
        peak_file = Path(d) / "peak"
        t0 = time.perf_counter()
        res = subprocess.run(
            [sys.executable, "-c", _PEAK_LAUNCHER, str(peak_file), sys.executable, "-m", *argv],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            timeout=timeout,
        )
        wall = time.perf_counter() - t0
        peak_mb = int(peak_file.read_text()) / 1024
    return res.returncode, peak_mb, wall, res.stderr


def _huge_record(mb: int = 20) -> dict:
    code = "def f(x):\n    return x + 1\n" * (mb * (1 << 20) // 27)
    return {"problem": "Add one.", "response": f"```python\n{code}```"}


@pytest.fixture(scope="module")
def huge_input(tmp_path_factory):
    d = tmp_path_factory.mktemp("huge")
    return _write_jsonl(d / "in.jsonl", [GOOD, _huge_record(20), GOOD])


def test_b4_score_skips_a_20mb_record_with_bounded_memory(rm_dir, huge_input, tmp_path):
    out = tmp_path / "out.jsonl"
    base = ["codescaler_jax.score", "--rm", str(rm_dir), "--input", str(huge_input), "--output",
            str(out), "--max-length", "128", "--batch-size", "8", "--no-progress"]
    rc, _, _, err = _run_child(base)
    assert rc == 2 and f"{huge_input}:2: record of" in err and "--max-record-bytes" in err
    assert not out.exists()
    rc, peak_mb, wall, err = _run_child([*base, "--skip-bad"])
    assert rc == 0, err[-2000:]
    assert f"skipped {huge_input}:2: record of" in err
    assert len(out.read_text().splitlines()) == 2
    print(f"\nscore with a 20 MB record skipped: peak RSS {peak_mb:.0f} MB, {wall:.1f} s")
    assert peak_mb < 2000  # was 17.7 GB (everything tokenised before truncation)
    assert wall < 180


def test_b4_extract_skips_a_20mb_record_with_bounded_memory(huge_input, tmp_path):
    out = tmp_path / "out.jsonl"
    rc, peak_mb, wall, err = _run_child(["codescaler_jax.extract", "--input", str(huge_input),
                                         "--output", str(out), "--skip-bad", "--no-progress"])
    assert rc == 0, err[-2000:]
    summary = json.loads(err.strip().splitlines()[-1])
    assert summary["records"] == 2 and summary["skipped_bad"] == 1
    assert f"{huge_input}:2: record of" in summary["skipped_messages"][0]
    print(f"\nextract with a 20 MB record skipped: peak RSS {peak_mb:.0f} MB, {wall:.1f} s")
    assert peak_mb < 500  # was 8.5 GB
    assert wall < 120


@pytest.mark.parametrize(
    "problem, code",
    [
        ("Add one.", "def f(x):\n    return x + 1\n" * 2000),
        ("Add one.", "a" * 50_000),  # one pre-token longer than the budget
        ("Add one.", " " * 45_000 + "x = 1"),
        ("Add one.", "中文字符" * 12_000 + "\n" + "🙂" * 5000),
        ("Add one. " * 10_000, "return 1"),  # the problem alone is past the budget
    ],
)
def test_b4_cutting_at_the_character_budget_gives_the_same_tokens(problem, code):
    from codescaler_jax.data.tokenizer import (
        char_budget,
        encode_rm_inputs,
        load_tokenizer,
        render_rm_text,
    )

    tok = load_tokenizer("qwen3")
    for max_length in (64, 300):
        assert max(len(problem), len(code)) > char_budget(tok, max_length)  # really cut
        whole = tok(render_rm_text(tok, problem, code), add_special_tokens=False)["input_ids"]
        assert encode_rm_inputs(tok, [problem], [code], max_length) == [whole[:max_length]]


def test_b4_a_long_record_under_the_limit_is_scored_truncated(rm_dir, tmp_path, capsys):
    """A 600 kB response (under the 1 MiB limit, far over the character budget) is scored
    like the first max_length tokens of its whole text."""
    from codescaler_jax.code.extract import extract_code
    from codescaler_jax.data.tokenizer import render_rm_text
    from codescaler_jax.rm.scorer import RewardScorer
    from codescaler_jax.score import main as score_main

    rec = {"problem": "Add one.",
           "response": "```python\n" + "def f(x):\n    return x + 1\n" * 22_000 + "```"}
    inp = _write_jsonl(tmp_path / "in.jsonl", [rec])
    out = tmp_path / "out.jsonl"
    assert score_main(["--rm", str(rm_dir), "--input", str(inp), "--output", str(out),
                       "--max-length", "128", "--batch-size", "8", "--no-progress"]) == 0
    row = json.loads(out.read_text())
    scorer = RewardScorer.from_pretrained(rm_dir, max_length=128, batch_size=8)
    code = extract_code(rec["response"]).code
    ids = scorer.tokenizer(render_rm_text(scorer.tokenizer, rec["problem"], code),
                           add_special_tokens=False)["input_ids"][:128]
    assert row["valid"] and row["score"] == pytest.approx(float(scorer.score_ids([ids])[0]),
                                                          abs=1e-6)


# ---- B3: the reward server under hostile clients -----------------------------------------------


def _start_server(args: list[str], log_path: Path, timeout: float = 600):
    """``python -m codescaler_jax.serve ARGS`` on one CPU device, stderr to ``log_path``;
    returns ``(proc, host, port)`` once it printed its listening line."""
    import os
    import queue
    import subprocess
    import sys
    import threading

    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(
        f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f
    )
    env["PYTHONPATH"] = str(REPO)
    err = open(log_path, "w")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen([sys.executable, "-m", "codescaler_jax.serve", *args], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    err.close()
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    import time

    deadline = time.monotonic() + timeout
    while True:  # until the listening line, the deadline, or the server's exit
        try:
            line = lines.get(timeout=1)
            break
        except queue.Empty:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"server did not start (exit status {proc.poll()}): "
                            f"{log_path.read_text()[-2000:]}")
    host, port = json.loads(line)["url"].removeprefix("http://").split(":")
    return proc, host, int(port)


def _request(host, port, method, path, payload=None, raw=None, timeout=30):
    import http.client

    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    body = raw if raw is not None else (json.dumps(payload).encode() if payload else None)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    out = resp.status, json.loads(resp.read())
    conn.close()
    return out


@pytest.fixture(scope="module",
                params=["uvicorn", pytest.param("stdlib", marks=pytest.mark.slow)])
def hostile_server(rm_dir, tmp_path_factory, request):
    """The real server of each backend (the default, uvicorn, in the fast suite)."""
    log_path = tmp_path_factory.mktemp("srv") / "server.log"
    proc, host, port = _start_server(
        ["--rm", str(rm_dir), "--port", "0", "--max-batch", "8", "--max-length", "128",
         "--max-connections", "16", "--socket-timeout", "10", "--request-timeout", "3",
         "--log-level", "INFO", "--backend", request.param], log_path)
    yield {"host": host, "port": port, "log": log_path}
    proc.terminate()
    assert proc.wait(timeout=60) == 0


def test_b3_slow_drip_clients_do_not_starve_health(hostile_server):
    """16 clients (the connection cap) dripping one byte a second (under the 10 s socket
    timeout) hold every slot; /health still answers at once, and each slow client is closed
    by the 3 s whole-request deadline."""
    import socket
    import threading
    import time

    h, p = hostile_server["host"], hostile_server["port"]
    request = b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"{" * 100
    closed_after: list[float] = []
    stop = threading.Event()

    def drip():
        s = socket.create_connection((h, p), timeout=30)
        t0 = time.monotonic()
        try:
            for byte in request:
                s.sendall(bytes([byte]))
                if stop.wait(1.0):
                    break
                s.setblocking(False)  # did the server close us?
                try:
                    if s.recv(1024) == b"":
                        break
                except BlockingIOError:
                    pass
                finally:
                    s.setblocking(True)
        except OSError:
            pass
        closed_after.append(time.monotonic() - t0)
        s.close()

    threads = [threading.Thread(target=drip) for _ in range(16)]
    for t in threads:
        t.start()
    time.sleep(1.5)  # every slot is held by a slow client now
    t0 = time.monotonic()
    for _ in range(3):
        status, health = _request(h, p, "GET", "/health", timeout=5)
        assert status == 200 and health["status"] == "ok"
    status, out = _request(h, p, "POST", "/score", {"items": [{"problem": "p", "code": "x=1"}]})
    assert status == 200 and len(out["scores"]) == 1
    assert time.monotonic() - t0 < 5
    for t in threads:
        t.join(timeout=30)
    stop.set()
    assert len(closed_after) == 16
    assert max(closed_after) < 3 + 3  # the deadline, plus the reaper's and the drip's tick
    _, health = _request(h, p, "GET", "/health")
    closed = health["connections_closed"]
    assert closed["deadline"] + closed["evicted"] >= 16, closed


def test_b3_client_leaving_mid_body_is_one_log_line(hostile_server):
    import socket
    import time

    h, p = hostile_server["host"], hostile_server["port"]
    log_path = hostile_server["log"]
    before = log_path.read_text()
    for _ in range(3):
        s = socket.create_connection((h, p), timeout=10)
        s.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"{" * 10)
        s.close()
    # and one that sends a whole request but resets the connection before the answer
    s = socket.create_connection((h, p), timeout=10)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    body = json.dumps({"items": [{"problem": "p", "code": "x = 1"}] * 8}).encode()
    s.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: " + str(len(body)).encode()
              + b"\r\n\r\n" + body)
    s.close()
    time.sleep(2.0)
    assert _request(h, p, "GET", "/health")[0] == 200
    new = log_path.read_text()[len(before):]
    assert "Traceback" not in new
    lost = [ln for ln in new.splitlines() if "connection lost" in ln]
    assert sum("closed after 10 of 1000 body bytes" in ln for ln in lost) == 3, new
    assert len(lost) <= 4 and len(new.splitlines()) <= 4 + 2, new


def test_b3_deeply_nested_json_is_a_400(hostile_server):
    h, p = hostile_server["host"], hostile_server["port"]
    for raw in (b"[" * 100_000, b'{"items": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"):
        status, out = _request(h, p, "POST", "/score", raw=raw)
        assert status == 400 and "nested too deeply" in out["error"], (status, out)
    assert _request(h, p, "GET", "/health")[0] == 200


def test_b3_score_endpoint_agrees_with_the_score_command_without_code(
    hostile_server, rm_dir, tmp_path
):
    from codescaler_jax.score import main as score_main

    h, p = hostile_server["host"], hostile_server["port"]
    recs = [{"problem": "Return 1.", "response": "no code here"},
            {"problem": "Return 2.", "response": "```python\ndef f(:\n```"},
            GOOD]
    status, out = _request(h, p, "POST", "/score", {"items": recs})
    assert status == 200 and out["valid"] == [False, False, True]
    inp = _write_jsonl(tmp_path / "in.jsonl", recs)
    assert score_main(["--rm", str(rm_dir), "--input", str(inp), "--output",
                       str(tmp_path / "out.jsonl"), "--max-length", "128", "--batch-size", "8",
                       "--no-progress"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert all(isinstance(s, float) for s in out["scores"])  # a number, not null
    for served, row in zip(out["scores"], rows):
        assert served == pytest.approx(row["score"], rel=1e-5, abs=1e-5)
    assert out["rewards"][:2] == [0.0, 0.0] and [r["reward"] for r in rows[:2]] == [0.0, 0.0]


# ---- B2: the reward server at its defaults -----------------------------------------------------


def test_b2_memory_budget_caps_rows_per_pass_and_refuses_what_cannot_fit(rm_dir):
    """In process (8 fake devices: row buckets 8 and 32): a budget between the needs of the
    [8, 256] and [32, 256] programs caps length 256 at 8 rows; a 32-item batch of long inputs
    is split into such passes and scores as without a budget; a budget below the smallest
    pass at max_length is refused, saying what to lower."""
    import numpy as np

    from codescaler_jax.errors import InputError
    from codescaler_jax.rm.scorer import RewardScorer
    from codescaler_jax.serving.server import RewardService

    probe = RewardService.from_pretrained(rm_dir, max_batch=32, max_length=256, min_bucket=128)
    small, big = (probe.scorers[r].pass_bytes(256) for r in (8, 32))
    assert big > 2 * small > 0
    probe.close()

    svc = RewardService.from_pretrained(rm_dir, max_batch=32, max_length=256, min_bucket=128,
                                        memory_budget_bytes=(small + big) // 2)
    svc.warmup()
    assert svc.memory_plan()["256"] == 8 and svc.max_rows(256) == 8
    calls = []
    for rows, scorer in svc.scorers.items():
        orig = scorer.score_ids
        scorer.score_ids = lambda seqs, _o=orig, _r=rows: calls.append(_r) or _o(seqs)
    codes = [f"x = {i}\n" + "y = x + 1\n" * 40 for i in range(32)]  # ~250 tokens each
    got = svc._score_batch(["Add one."] * 32, codes)
    assert calls == [8, 8, 8, 8]
    want = RewardScorer.from_pretrained(rm_dir, max_length=256, batch_size=32).score(
        ["Add one."] * 32, codes)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    svc.close()

    tight = RewardService.from_pretrained(rm_dir, max_batch=32, max_length=256, min_bucket=128,
                                          memory_budget_bytes=small // 2)
    with pytest.raises(InputError, match="lower --max-length, or raise --memory-budget-gb"):
        tight.warmup()
    tight.close()


def _long_code(tokens: int) -> str:
    return "".join(f"v{i} = {i} * 7\n" for i in range(tokens // 6))


@pytest.mark.slow  # the defaults compile 28 programs: 54-156 s here, by load
def test_b2_server_starts_at_its_defaults_with_bounded_memory(tmp_path):
    """``python -m codescaler_jax.serve --rm DIR`` at its defaults (4,096 tokens, 32 rows, every
    shape compiled at start-up) with a 2-layer RM (the embedded default's shape) starts, serves
    4,096-token inputs, and its peak RSS stays within its memory budget. Warm-up used to run
    the [32, 4096] pass, which needs 16 GiB for this model: the kernel killed it at 21 GB."""
    import os
    import signal
    import time

    from flax import nnx

    from codescaler_jax.data.tokenizer import qwen3_tokenizer_dir
    from codescaler_jax.models.hf_io import save_hf_model
    from codescaler_jax.models.qwen3 import Qwen3Config, Qwen3RewardModel

    cfg = Qwen3Config.tiny(
        vocab_size=151936, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, pad_token_id=151643,
        eos_token_id=151645, max_position_embeddings=4096,
    )
    rm = tmp_path / "rm2"
    save_hf_model(Qwen3RewardModel(cfg, rngs=nnx.Rngs(0)), rm, tokenizer_dir=qwen3_tokenizer_dir())
    log_path = tmp_path / "server.log"
    proc, host, port = _start_server(["--rm", str(rm), "--port", "0", "--log-level", "INFO"],
                                     log_path, timeout=1200)
    try:
        status, health = _request(host, port, "GET", "/health")
        assert status == 200 and health["max_length"] == 4096
        assert health["row_buckets"] == [1, 4, 16, 32]
        plan = health["max_rows_per_length"]
        assert set(plan) == {str(n) for n in health["length_buckets"]}
        for length, rows in plan.items():  # every cap is the budget's doing
            if rows < 32:
                assert health["over_budget"][length][1] > health["memory_budget_bytes"]
        items = [{"problem": "Add.", "code": _long_code(4096)} for _ in range(4)]
        status, out = _request(host, port, "POST", "/score", {"items": items}, timeout=600)
        assert status == 200 and len(out["scores"]) == 4
        # VmHWM: the server's own peak RSS (reset at exec, unlike ru_maxrss, which would count
        # the pages of the pytest process it was forked from)
        with open(f"/proc/{proc.pid}/status") as f:
            peak_kb = next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:"))
    finally:
        proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    peak_gb = peak_kb / 2**20
    budget_gb = health["memory_budget_bytes"] / 2**30
    print(f"\nserve at defaults: peak RSS {peak_gb:.2f} GiB, budget {budget_gb:.2f} GiB, "
          f"plan {health['max_rows_per_length']}, load {os.getloadavg()[0]:.1f}, "
          f"{time.strftime('%H:%M')}")
    assert peak_gb < min(budget_gb, 4.0) + 2.0  # the budget plus the process itself
    if budget_gb < 16:
        assert plan["4096"] < 32 and "at most" in log_path.read_text()
