"""Multi-host RM training on one machine: two processes x four CPU devices (gloo over loopback)
against one process x eight devices, then the two-process checkpoint resumed by one process on
a different mesh.

Every run is a subprocess (``tests/multihost_child.py`` around the real ``train_rm`` CLI) with
its own ``XLA_FLAGS``, so device counts never depend on this pytest process. Each run is bounded
by a timeout and killed on expiry, so a hang cannot stall the suite.
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

from codescaler_jax.data.pairs import Pair, write_pairs_jsonl
from codescaler_jax.data.pipeline import TokenizedPairs, pair_batches

REPO = Path(__file__).resolve().parents[1]
CHILD = REPO / "tests" / "multihost_child.py"
TIMEOUT_S = 420  # per group of runs; a loaded 2-core machine needs ~1-2 minutes
STEPS = 3
GLOBAL_BATCH = 8

TINY = [
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "model.num_hidden_layers=2",
    "model.num_attention_heads=2",
    "model.num_key_value_heads=1",
    "model.head_dim=16",
    "data.max_length=256",
    "data.min_bucket=256",
    "data.eval_fraction=0.25",
    "data.validation_fraction=0",
    "optim.warmup_steps=1",
    "optim.learning_rate=3e-3",
    # Adam's eps well above the tiny gradients of rarely seen embedding rows, whose update
    # g / (|g| + eps) would otherwise turn reduction-order noise into 1e-3 differences.
    "optim.eps=1e-3",
    f"train.global_batch_size={GLOBAL_BATCH}",
    "train.eval_batch_size=8",
    f"train.max_steps={STEPS}",
    "train.eval_every=0",
    "train.save_every=2",
    "train.keep_checkpoints=5",
    "distributed.initialization_timeout_s=120",
    "distributed.heartbeat_timeout_s=60",
]
SAVE_MESH = ["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_", "SLURM_", "OMPI_"))
    }
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.update(extra or {})
    return env


def _argv(run_dir: Path, pairs: Path, extra: list[str]) -> list[str]:
    sets = [f"run_dir={run_dir}", f"data.source={pairs}", *TINY, *extra]
    out = ["--config", str(REPO / "configs" / "rm_tiny.yaml"), "--no-progress"]
    for s in sets:
        out += ["--set", s]
    return out


def _launch(record: Path, argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(CHILD), str(record), "--", *argv],
        cwd=REPO,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )


def _wait_all(procs: list[tuple[subprocess.Popen, Path]], *, ok: bool = True) -> None:
    wait_all(procs, TIMEOUT_S, ok=ok)


def _tb_scalars(tb_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def _params(run_dir: Path) -> dict[str, np.ndarray]:
    return load_file(str(run_dir / "hf" / "model.safetensors"))


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    from codescaler_jax.data.problems import humaneval_problems
    from codescaler_jax.data.verified import humaneval_candidates

    probs = humaneval_problems()[:24]
    cands = humaneval_candidates(probs, mutants_per_problem=3)
    pairs = [Pair(p.prompt, c[0], m, p.problem_id) for p, c in zip(probs, cands) for m in c[1:]]
    path = tmp_path_factory.mktemp("mh_pairs") / "pairs.jsonl"
    write_pairs_jsonl(pairs, path)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, pairs_file) -> dict[str, Path]:
    """Two processes x 4 devices and one process x 8 devices, same config and mesh, at once."""
    root = tmp_path_factory.mktemp("multihost")
    port = _free_port()
    procs = []
    for i in range(2):
        env = _env(
            4,
            {
                "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                "JAX_NUM_PROCESSES": "2",
                "JAX_PROCESS_ID": str(i),
            },
        )
        argv = _argv(root / "two", pairs_file, SAVE_MESH)
        procs.append(
            (_launch(root / "two_rec", argv, env, root / f"two.p{i}.log"), root / f"two.p{i}.log")
        )
    argv = _argv(root / "one", pairs_file, SAVE_MESH)
    procs.append((_launch(root / "one_rec", argv, _env(8), root / "one.log"), root / "one.log"))
    _wait_all(procs)
    return {"root": root, "two": root / "two", "one": root / "one"}


def _records(rec_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(rec_dir.glob("indices.p*.json"))]


def test_two_processes_match_one_process(runs):
    two, one = _records(runs["root"] / "two_rec"), _records(runs["root"] / "one_rec")
    assert [(r["process_count"], r["local_devices"], r["global_devices"]) for r in two] == [
        (2, 4, 8),
        (2, 4, 8),
    ]
    assert [(r["process_count"], r["global_devices"]) for r in one] == [(1, 8)]

    loss2 = _tb_scalars(runs["two"] / "tb", "train/loss")
    loss1 = _tb_scalars(runs["one"] / "tb", "train/loss")
    assert sorted(loss2) == sorted(loss1) == list(range(1, STEPS + 1))
    for step in loss1:
        assert abs(loss2[step] - loss1[step]) < 1e-5, (step, loss2[step], loss1[step])
    # the steps really trained (the losses differ from step to step)
    assert len({round(v, 6) for v in loss1.values()}) == STEPS

    # held-out evaluation over the global mesh (each process its rows) agrees too
    acc2 = _tb_scalars(runs["two"] / "tb", "eval/loss")
    acc1 = _tb_scalars(runs["one"] / "tb", "eval/loss")
    assert sorted(acc2) == sorted(acc1) == [0, STEPS]
    for step in acc1:
        assert abs(acc2[step] - acc1[step]) < 1e-5

    p2, p1 = _params(runs["two"]), _params(runs["one"])
    assert sorted(p2) == sorted(p1)
    worst = max(float(np.max(np.abs(p2[k] - p1[k]))) for k in p1)
    assert worst < 1e-5, worst


def test_each_process_reads_its_own_rows(runs):
    (r0, r1) = _records(runs["root"] / "two_rec")
    (ref,) = _records(runs["root"] / "one_rec")
    assert (r0["process_index"], r1["process_index"]) == (0, 1)
    for pos in map(str, range(STEPS)):
        a, b = r0["batches"][pos], r1["batches"][pos]
        assert len(a) == len(b) == GLOBAL_BATCH // 2
        assert not set(a) & set(b)
        # together: exactly the single process's global batch, process 0 first
        assert a + b == ref["batches"][pos]


def test_pair_batches_split_an_epoch_disjointly_and_completely():
    n = 53
    data = TokenizedPairs(
        [np.arange(3 + i % 7, dtype=np.int32) for i in range(n)],
        [np.arange(2 + i % 5, dtype=np.int32) for i in range(n)],
    )
    kw = dict(global_batch_size=8, buckets=(16,), pad_id=0, seed=3)
    parts = [
        [b["index"].tolist() for b in pair_batches(data, process_index=i, process_count=2, **kw)]
        for i in range(2)
    ]
    whole = [b["index"].tolist() for b in pair_batches(data, **kw)]
    seen = [i for a, b in zip(*parts) for i in a + b]
    assert [a + b for a, b in zip(*parts)] == whole
    assert len(seen) == len(set(seen)) == (n // 8) * 8  # disjoint; all but the dropped remainder


@pytest.mark.slow  # CI time: the faster tests of this file cover the same path
def test_two_process_checkpoint_resumes_on_another_mesh(runs, pairs_file):
    """Checkpoint of step 2 written by two processes (fsdp=4, tensor=2 on 8 devices), restored
    by one process on 2 devices (data=2): step 3 gives the same loss and parameters."""
    src = runs["two"]
    dst = runs["root"] / "resumed"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("tb", "hf", "summary.json"))
    shutil.rmtree(dst / "checkpoints" / str(STEPS))
    assert sorted(p.name for p in (dst / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
    log = runs["root"] / "resumed.log"
    argv = _argv(dst, pairs_file, ["mesh.data=2", "mesh.fsdp=1", "mesh.tensor=1"]) + ["--resume"]
    proc = _launch(runs["root"] / "resumed_rec", argv, _env(2), log)
    _wait_all([(proc, log)])
    assert "resumed from step 2" in log.read_text()
    (rec,) = _records(runs["root"] / "resumed_rec")
    assert (rec["process_count"], rec["global_devices"]) == (1, 2)

    loss_resumed = _tb_scalars(dst / "tb", "train/loss")
    loss_two = _tb_scalars(src / "tb", "train/loss")
    assert sorted(loss_resumed) == [STEPS]
    assert abs(loss_resumed[STEPS] - loss_two[STEPS]) < 1e-5
    pr, p2 = _params(dst), _params(src)
    worst = max(float(np.max(np.abs(pr[k] - p2[k]))) for k in p2)
    assert worst < 1e-5, worst


def test_run_dirs_that_are_not_shared_stop_every_process(tmp_path, pairs_file):
    """Each process given its own run_dir (as on hosts without a shared filesystem): all stop
    with the same clear error instead of hanging in Orbax or reading a half-written cache."""
    port = _free_port()
    procs = []
    for i in range(2):
        env = _env(
            4,
            {
                "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                "JAX_NUM_PROCESSES": "2",
                "JAX_PROCESS_ID": str(i),
            },
        )
        log = tmp_path / f"p{i}.log"
        argv = _argv(tmp_path / f"host{i}", pairs_file, SAVE_MESH)
        procs.append((_launch(tmp_path / "rec", argv, env, log), log))
    for p, _ in procs:
        try:
            p.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for q, _ in procs:
                q.kill()
            pytest.fail("processes with unshared run_dirs hung")
    for p, log in procs:
        assert p.returncode != 0
        assert "is not the same directory on all 2 processes" in log.read_text()
    assert not (tmp_path / "host0" / "checkpoints").exists()


# ---- start-up decisions (pure: no processes) ----------------------------------------------


def test_single_process_by_default():
    from codescaler_jax.distributed import DistributedConfig, detect_launcher, initialize_kwargs

    assert detect_launcher({}) in (None, "tpu_vm")
    if detect_launcher({}) is None:
        assert initialize_kwargs(DistributedConfig(), {}) is None
    assert (
        initialize_kwargs(DistributedConfig(mode="never"), {"JAX_COORDINATOR_ADDRESS": "h:1"})
        is None
    )
    # an srun step of one task, or a batch script outside srun, is not multi-process
    one_task = {
        "SLURM_JOB_ID": "7",
        "SLURM_PROCID": "0",
        "SLURM_STEP_NODELIST": "n1",
        "SLURM_NTASKS": "1",
    }
    batch_step = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "16"}
    assert detect_launcher(one_task) is None or detect_launcher(one_task) == "tpu_vm"
    assert detect_launcher(batch_step) is None or detect_launcher(batch_step) == "tpu_vm"


def test_explicit_environment_and_config_override():
    from codescaler_jax.distributed import DistributedConfig, initialize_kwargs

    env = {
        "JAX_COORDINATOR_ADDRESS": "10.0.0.1:8476",
        "JAX_NUM_PROCESSES": "4",
        "JAX_PROCESS_ID": "2",
    }
    kw = initialize_kwargs(DistributedConfig(), env)
    assert (kw["coordinator_address"], kw["num_processes"], kw["process_id"]) == (
        "10.0.0.1:8476",
        4,
        2,
    )
    kw = initialize_kwargs(DistributedConfig(process_id=3, initialization_timeout_s=9), env)
    assert (kw["process_id"], kw["initialization_timeout"]) == (3, 9)
    # config alone (mode auto, no environment) also starts it
    cfg = DistributedConfig(coordinator_address="h:2", num_processes=2, process_id=1)
    assert initialize_kwargs(cfg, {})["coordinator_address"] == "h:2"


def test_slurm_step_leaves_the_rest_to_jax_detection():
    from codescaler_jax.distributed import DistributedConfig, detect_launcher, initialize_kwargs

    env = {
        "SLURM_JOB_ID": "7",
        "SLURM_PROCID": "5",
        "SLURM_STEP_NODELIST": "n[1-2]",
        "SLURM_NTASKS": "16",
    }
    assert detect_launcher(env) == "slurm"
    kw = initialize_kwargs(DistributedConfig(), env)
    assert kw["coordinator_address"] is None and kw["num_processes"] is None


def test_incomplete_settings_name_what_is_missing():
    from codescaler_jax.distributed import DistributedConfig, initialize_kwargs

    with pytest.raises(ValueError, match="distributed.process_id") as e:
        initialize_kwargs(
            DistributedConfig(), {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"}
        )
    assert "num_processes" not in str(e.value)
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES.*not an integer"):
        initialize_kwargs(
            DistributedConfig(), {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two"}
        )
    with pytest.raises(ValueError, match="not below"):
        DistributedConfig(num_processes=2, process_id=2)


def test_initialize_after_the_backend_started_is_refused():
    import jax

    from codescaler_jax.distributed import DistributedConfig, initialize

    jax.devices()  # this pytest process's backend is up
    assert initialize(DistributedConfig(mode="never")) is False
    with pytest.raises(RuntimeError, match="before any other JAX call"):
        initialize(
            DistributedConfig(coordinator_address="127.0.0.1:1", num_processes=2, process_id=0)
        )


def test_config_section_in_rm_config():
    from codescaler_jax.config import ConfigError, load_config
    from codescaler_jax.rm.config import RMTrainConfig

    cfg = load_config(
        RMTrainConfig, None, ["distributed.mode=always", "distributed.num_processes=2"]
    )
    assert (cfg.distributed.mode, cfg.distributed.num_processes) == ("always", 2)
    with pytest.raises(ConfigError, match="distributed.mode"):
        load_config(RMTrainConfig, None, ["distributed.mode=sometimes"])
