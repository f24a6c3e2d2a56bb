"""Multi-host GRPO on one machine: two processes x four CPU devices (gloo over loopback) against
one process x eight devices on the same mesh, a two-process kill and ``--resume``, and the
misconfigurations a multi-host run refuses.

Every run is a subprocess (``tests/multihost_grpo_child.py`` around the real ``train_grpo``
CLI) with its own ``XLA_FLAGS``, bounded by a timeout and killed on expiry. The reward mixes
the CodeScaler RM (a tiny random RM, ``raw_unguarded`` so that every response is scored on the
global mesh, rows from both processes in each pass) with a token-level reward that differs
within a group, so every step has non-zero advantages and moves the policy.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from multihost_util import wait_all
from safetensors.numpy import load_file

REPO = Path(__file__).resolve().parents[1]
CHILD = REPO / "tests" / "multihost_grpo_child.py"
TIMEOUT_S = 480  # per group of runs; a loaded 2-core machine needs ~2-3 minutes
STEPS = 3
TOL = 1e-5

TINY = [
    "reward.name=mix",
    "reward.kwargs={weights: {codescaler: 1.0, test_odd_tokens: 1.0}}",
    "reward.shaping=raw_unguarded", "reward.pass_rate=false", "reward.rm_max_length=128",
    "reward.rm_batch_size=8",
    "policy.hidden_size=32", "policy.intermediate_size=64", "policy.num_hidden_layers=1",
    "policy.num_attention_heads=2", "policy.num_key_value_heads=1",
    "data.max_prompt_length=256", "data.min_prompt_bucket=256", "data.max_problems=40",
    # 2 prompts x 4 responses: one prompt (a whole group) per process, one decode loop
    "rollout.num_prompts=2", "rollout.num_generations=4", "rollout.max_new_tokens=16",
    "rollout.batch_size=8", "rollout.min_response_bucket=16",
    "algorithm.num_minibatches=2", "algorithm.logprob_chunk=8",
    f"train.steps={STEPS}", "train.save_every=2", "train.samples_every=1",
    # pass-rate probes at steps 0 and 3: 2 prompts x 4 samples, shared between the processes
    f"pass_rate_eval.every={STEPS}", "pass_rate_eval.train_prompts=2",
    "pass_rate_eval.held_out_prompts=0", "pass_rate_eval.num_samples=4",
    "optim.learning_rate=1e-2", "optim.warmup_steps=1",
    # Adam's eps above the tiny gradients of rarely seen embedding rows (see test_multihost.py)
    "optim.eps=1e-3",
    # fsdp over both processes, tensor=2 inside each: every process's rows sit on two
    # replicas, which the per-process fetch must take once
    "mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2",
    "distributed.initialization_timeout_s=120", "distributed.heartbeat_timeout_s=60",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, process: tuple[int, int, int] | None = None) -> dict[str, str]:
    """The child's environment; ``process = (port, count, index)`` for a multi-process run."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_", "XLA_", "SLURM_", "OMPI_"))}
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
    )
    if process is not None:
        port, count, index = process
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(count),
                   JAX_PROCESS_ID=str(index))
    return env


def _argv(run_dir: Path, rm_dir: Path, extra: list[str] = ()) -> list[str]:
    out = ["--config", str(REPO / "configs" / "grpo_tiny.yaml"), "--no-progress"]
    for s in [f"run_dir={run_dir}", f"reward.rm_path={rm_dir}", *TINY, *extra]:
        out += ["--set", s]
    return out


def _launch(root: Path, name: str, argv: list[str], processes: int, devices: int
            ) -> list[tuple[subprocess.Popen, Path]]:
    """``processes`` children of one run (records in ``root/<name>_rec``, logs beside)."""
    port = _free_port()
    procs = []
    for i in range(processes):
        log = root / f"{name}.p{i}.log"
        env = _env(devices, (port, processes, i) if processes > 1 else None)
        p = subprocess.Popen([sys.executable, str(CHILD), str(root / f"{name}_rec"), "--", *argv],
                             cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
        procs.append((p, log))
    return procs


def _wait_all(procs: list[tuple[subprocess.Popen, Path]], *, ok: bool = True) -> None:
    wait_all(procs, TIMEOUT_S, ok=ok)


def _records(rec_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(rec_dir.glob("steps.p*.json"))]


def _whole_steps(records: list[dict]) -> list[dict]:
    """Each step's rows of all processes in process order, with process 0's metrics."""
    out = []
    for i in range(len(records[0]["steps"])):
        step = {k: [x for r in records for x in r["steps"][i][k]]
                for k in ("prompts", "tokens", "rewards", "advantages")}
        step["metrics"] = records[0]["steps"][i]["metrics"]
        out.append(step)
    return out


def _params(run_dir: Path) -> dict[str, np.ndarray]:
    return load_file(str(run_dir / "hf" / "model.safetensors"))


def _tb_scalars(tb_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


# The step's figures that must not depend on the process count (time and throughput do).
COMPARED = ("reward/mean", "reward/std", "reward/max", "valid_code_fraction",
            "response_length/mean", "response_length/max", "advantage/zero_fraction",
            "entropy", "clip_fraction", "pg_loss", "approx_kl", "grad_norm", "learning_rate",
            "codescaler/reward_mean", "test_odd_tokens/reward_mean")


def _assert_steps_match(a: dict, b: dict) -> None:
    assert a["prompts"] == b["prompts"]
    assert a["tokens"] == b["tokens"]  # the samples, token for token
    np.testing.assert_allclose(a["rewards"], b["rewards"], rtol=0, atol=TOL)
    np.testing.assert_allclose(a["advantages"], b["advantages"], rtol=0, atol=TOL)
    for k in COMPARED:
        assert abs(a["metrics"][k] - b["metrics"][k]) < TOL, (k, a["metrics"][k], b["metrics"][k])


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_rm import save_tiny_rm

    return save_tiny_rm(tmp_path_factory.mktemp("mh_grpo_rm") / "rm")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_rm) -> dict[str, Path]:
    """Two processes x 4 devices and one process x 8 devices, same config and mesh, at once."""
    root = tmp_path_factory.mktemp("multihost_grpo")
    procs = _launch(root, "two", _argv(root / "two", tiny_rm), 2, 4)
    procs += _launch(root, "one", _argv(root / "one", tiny_rm), 1, 8)
    _wait_all(procs)
    return {"root": root, "two": root / "two", "one": root / "one", "rm": tiny_rm}


def test_two_processes_match_one_process(runs):
    two, one = _records(runs["root"] / "two_rec"), _records(runs["root"] / "one_rec")
    assert [(r["process_count"], r["local_devices"], r["global_devices"]) for r in two] == [
        (2, 4, 8), (2, 4, 8)]
    assert [(r["process_count"], r["global_devices"]) for r in one] == [(1, 8)]
    # each process samples its own prompt: a whole group of 4 responses, disjoint prompts
    for i in range(STEPS):
        mine = [r["steps"][i] for r in two]
        assert [len(s["prompts"]) for s in mine] == [1, 1]
        assert [len(s["tokens"]) for s in mine] == [4, 4]
        assert not set(mine[0]["prompts"]) & set(mine[1]["prompts"])
    steps2, steps1 = _whole_steps(two), _whole_steps(one)
    assert len(steps2) == len(steps1) == STEPS
    for a, b in zip(steps2, steps1, strict=True):
        _assert_steps_match(a, b)
    # the comparison is not vacuous: the RM scored, advantages were non-zero, losses moved
    assert all(abs(s["metrics"]["codescaler/reward_mean"]) > 1e-3 for s in steps1)
    assert all(np.mean(np.asarray(s["advantages"]) != 0) > 0.5 for s in steps1)
    assert len({round(s["metrics"]["pg_loss"], 7) for s in steps1}) == STEPS

    p2, p1 = _params(runs["two"]), _params(runs["one"])
    assert sorted(p2) == sorted(p1)
    worst = max(float(np.max(np.abs(p2[k] - p1[k]))) for k in p1)
    assert worst < TOL, worst

    # the pass-rate probes ran on both processes' shares and report the whole set
    for tag in ("eval/train/pass_rate", "eval/train/valid_code_fraction",
                "eval/train/problems_solved"):
        e2, e1 = _tb_scalars(runs["two"] / "tb", tag), _tb_scalars(runs["one"] / "tb", tag)
        assert sorted(e2) == sorted(e1) == [0, STEPS], tag
        assert all(abs(e2[s] - e1[s]) < TOL for s in e1), (tag, e2, e1)

    # process 0 alone wrote TensorBoard, hf/ and summary.json; every process its log
    run = runs["two"]
    assert sorted(_tb_scalars(run / "tb", "train/reward/mean")) == list(range(1, STEPS + 1))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps_run"] == STEPS
    assert [h["reward_mean"] for h in summary["history"]] == pytest.approx(
        [s["metrics"]["reward/mean"] for s in steps1], abs=TOL)
    assert {p.name for p in run.glob("log.p*.txt")} == {"log.p0.txt", "log.p1.txt"}
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [
        "2", "3"]


@pytest.mark.slow  # one more two-process GRPO run; the test above covers the same path
def test_two_process_kill_and_resume_continues_exactly(runs):
    """A two-process job killed after its step-2 checkpoint (its directory as it was then),
    resumed by two processes with ``--resume``: step 3 has the same samples, rewards,
    advantages, losses and final parameters as the uninterrupted run."""
    src, dst = runs["two"], runs["root"] / "cut"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("hf", "summary.json", "log.p*"))
    shutil.rmtree(dst / "checkpoints" / str(STEPS))
    procs = _launch(runs["root"], "cut", _argv(dst, runs["rm"]) + ["--resume"], 2, 4)
    _wait_all(procs)
    for _, log in procs:
        assert "resumed from step 2" in log.read_text()
    resumed = _whole_steps(_records(runs["root"] / "cut_rec"))
    full = _whole_steps(_records(runs["root"] / "two_rec"))
    assert len(resumed) == 1  # step 3 only
    _assert_steps_match(resumed[0], full[STEPS - 1])
    pr, p2 = _params(dst), _params(src)
    worst = max(float(np.max(np.abs(pr[k] - p2[k]))) for k in p2)
    assert worst < TOL, worst
    assert sorted(_tb_scalars(dst / "tb", "train/reward/mean")) == list(range(1, STEPS + 1))


@pytest.mark.slow  # two more GRPO runs (3 processes); the same trainer path as the test above
def test_continuous_engine_and_packed_update_two_processes_match_one_process(tmp_path, tiny_rm):
    """``rollout.engine=continuous`` multi-host: one queue of both processes' prompts through
    4 global decode slots (so slots are refilled), each process keeping its own rows; and the
    packed update (``algorithm.ppo_max_token_len_per_device``), each process packing only its
    own rows into its own bins: the same samples, rewards, advantages, losses and parameters
    as one process x 8 devices (whose packing holds every row)."""
    extra = ["rollout.engine=continuous", "rollout.batch_size=4", "train.steps=2",
             "pass_rate_eval.every=2", "algorithm.ppo_max_token_len_per_device=320"]
    procs = _launch(tmp_path, "two", _argv(tmp_path / "two", tiny_rm, extra), 2, 4)
    procs += _launch(tmp_path, "one", _argv(tmp_path / "one", tiny_rm, extra), 1, 8)
    _wait_all(procs)
    two, one = _records(tmp_path / "two_rec"), _records(tmp_path / "one_rec")
    assert [len(r["steps"][0]["tokens"]) for r in two] == [4, 4]
    # each process packed its own 4 rows; the single process all 8
    assert [s["packed_rows"] for r in two for s in r["steps"]] == [[4], [4], [4], [4]]
    assert [s["packed_rows"] for s in one[0]["steps"]] == [[8], [8]]
    # the packing figures are the whole step's on every process (here one bin per sequence)
    for key in ("update/padding_fraction_padded", "update/padding_fraction_packed"):
        seen = [[s["metrics"][key] for s in r["steps"]] for r in (*two, *one)]
        assert seen[0] == seen[1] == seen[2] and all(0 < x < 1 for x in seen[0]), (key, seen)
    steps2, steps1 = _whole_steps(two), _whole_steps(one)
    assert len(steps2) == len(steps1) == 2
    for a, b in zip(steps2, steps1, strict=True):
        _assert_steps_match(a, b)
    p2, p1 = _params(tmp_path / "two"), _params(tmp_path / "one")
    worst = max(float(np.max(np.abs(p2[k] - p1[k]))) for k in p1)
    assert worst < TOL, worst
    e2 = _tb_scalars(tmp_path / "two" / "tb", "eval/train/pass_rate")
    e1 = _tb_scalars(tmp_path / "one" / "tb", "eval/train/pass_rate")
    assert sorted(e2) == sorted(e1) == [0, 2] and all(abs(e2[s] - e1[s]) < TOL for s in e1)


REFUSED = {
    "rollout.num_prompts=3": "rollout.num_prompts=3 is not divisible by the 2 processes",
    "reward.rm_batch_size=5": "reward.rm_batch_size=5 is not divisible by the 2 processes",
}


def test_multihost_misconfiguration_stops_every_process(tmp_path, tiny_rm):
    """Two processes (three runs at once, one per bad setting) refuse, each with the same clear
    error naming the key, before the policy is built (no checkpoint appears)."""
    runs = {setting: _launch(tmp_path, f"bad{i}", _argv(tmp_path / f"run{i}", tiny_rm,
                                                        [setting]), 2, 4)
            for i, setting in enumerate(REFUSED)}
    _wait_all([p for procs in runs.values() for p in procs], ok=False)
    for i, (setting, procs) in enumerate(runs.items()):
        for p, log in procs:
            assert p.returncode != 0, setting
            assert REFUSED[setting] in log.read_text(), log.read_text()[-2000:]
        assert not (tmp_path / f"run{i}" / "checkpoints").exists()
