"""The Cloud TPU VM launch scripts against a stand-in ``gcloud`` that records its arguments.

The stand-in (first on PATH) appends each call's argv as a JSON line. For ``ssh --command``
calls whose command matches ``FAKE_GCLOUD_EXEC`` (a regex) it also runs the command with bash
in a fake worker home, as the real worker would, so the remote command strings themselves are
exercised (quoting, logs, detach/stop), not only their text.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SETTINGS = {
    "TPU_NAME": "my-tpu",
    "ZONE": "us-central2-b",
    "PROJECT": "my-proj",
    "ACCELERATOR_TYPE": "v4-32",
    "RUNTIME_VERSION": "tpu-ubuntu2204-base",
}
TPU_VM = ["compute", "tpus", "tpu-vm"]
WHERE = ["--zone=us-central2-b", "--project=my-proj"]

FAKE_GCLOUD = """#!{python}
import json, os, re, shutil, subprocess, sys, tarfile
args = sys.argv[1:]
rec = {{"argv": args}}
if args[3:4] == ["scp"] and args[4].endswith(".tar.gz"):
    with tarfile.open(args[4]) as t:
        rec["tar"] = sorted(t.getnames())
    home = os.environ.get("FAKE_WORKER_HOME")
    if home:
        shutil.copy(args[4], os.path.join(home, args[5].split(":", 1)[1]))
rc = 0
command = next((a.split("=", 1)[1] for a in args if a.startswith("--command=")), None)
pattern = os.environ.get("FAKE_GCLOUD_EXEC")
if command is not None and pattern and re.search(pattern, command):
    home = os.environ["FAKE_WORKER_HOME"]
    env = dict(os.environ, HOME=home)
    rc = subprocess.run(["bash", "-c", command], cwd=home, env=env).returncode
    rec["rc"] = rc
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(rec) + "\\n")
sys.exit(rc)
"""


@pytest.fixture
def fake(tmp_path):
    """PATH with the stand-in gcloud first; returns a helper to run a launch script."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
    gcloud.chmod(0o755)
    log = tmp_path / "gcloud.jsonl"
    home = tmp_path / "worker"
    home.mkdir()

    class Fake:
        worker_home = home

        def run(self, script, *args, env=None, drop=(), exec_pattern=None, timeout=60):
            e = {k: v for k, v in os.environ.items() if k not in SETTINGS and k != "SPOT"}
            e.update(SETTINGS)
            for k in drop:
                e.pop(k, None)
            e.update(env or {})
            e.update(
                PATH=f"{bin_dir}{os.pathsep}{e['PATH']}",
                FAKE_GCLOUD_LOG=str(log),
                FAKE_WORKER_HOME=str(home),
                TMPDIR=str(tmp_path),
            )
            if exec_pattern:
                e["FAKE_GCLOUD_EXEC"] = exec_pattern
            return subprocess.run(
                ["bash", str(LAUNCH / script), *args],
                env=e,
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=timeout,
            )

        def calls(self):
            if not log.exists():
                return []
            return [json.loads(line) for line in log.read_text().splitlines()]

        def argvs(self):
            return [c["argv"] for c in self.calls()]

        def reset(self):
            log.unlink(missing_ok=True)

    return Fake()


def _ok(res):
    assert res.returncode == 0, res.stderr + res.stdout
    return res


def _command(argv):
    return next(a.split("=", 1)[1] for a in argv if a.startswith("--command="))


def test_create_from_environment_and_flags(fake):
    _ok(fake.run("create.sh", env={"SPOT": "true"}))
    assert fake.argvs() == [
        TPU_VM
        + ["create", "my-tpu", *WHERE, "--accelerator-type=v4-32"]
        + ["--version=tpu-ubuntu2204-base", "--spot"]
    ]
    fake.reset()
    # flags win over the environment; no Spot unless asked
    _ok(
        fake.run(
            "create.sh",
            "--name",
            "other",
            "--zone=europe-west4-a",
            "--accelerator-type",
            "v5litepod-16",
        )
    )
    assert fake.argvs() == [
        TPU_VM
        + ["create", "other", "--zone=europe-west4-a", "--project=my-proj"]
        + ["--accelerator-type=v5litepod-16", "--version=tpu-ubuntu2204-base"]
    ]


def test_delete(fake):
    _ok(fake.run("delete.sh"))
    _ok(fake.run("delete.sh", "--yes"))
    assert fake.argvs() == [
        TPU_VM + ["delete", "my-tpu", *WHERE],
        TPU_VM + ["delete", "my-tpu", *WHERE, "--quiet"],
    ]


@pytest.mark.parametrize(
    "script, required, args",
    [
        ("create.sh", ["TPU_NAME", "ZONE", "PROJECT", "ACCELERATOR_TYPE", "RUNTIME_VERSION"], []),
        ("setup.sh", ["TPU_NAME", "ZONE", "PROJECT"], []),
        ("run.sh", ["TPU_NAME", "ZONE", "PROJECT"], ["--", "echo", "hi"]),
        ("logs.sh", ["TPU_NAME", "ZONE", "PROJECT"], []),
        ("tensorboard.sh", ["TPU_NAME", "ZONE", "PROJECT"], []),
        ("delete.sh", ["TPU_NAME", "ZONE", "PROJECT"], []),
    ],
)
def test_missing_settings_are_refused_by_name(fake, script, required, args):
    flag = {
        "TPU_NAME": "--name",
        "ZONE": "--zone",
        "PROJECT": "--project",
        "ACCELERATOR_TYPE": "--accelerator-type",
        "RUNTIME_VERSION": "--version",
    }
    for var in required:
        res = fake.run(script, *args, drop=[var])
        assert res.returncode == 2
        assert f"missing setting {var}" in res.stderr and flag[var] in res.stderr
        for other in set(required) - {var}:
            assert other not in res.stderr
    res = fake.run(script, *args, drop=required)
    assert all(f"missing setting {v}" in res.stderr for v in required)
    assert fake.calls() == []  # refused before running anything


def test_bad_arguments_are_refused(fake):
    for script, args, message in [
        ("create.sh", ["--bogus"], "unknown argument --bogus"),
        ("create.sh", ["--zone"], "--zone needs a value"),
        ("run.sh", [], "no command"),
        ("run.sh", ["--job", "a b", "--", "true"], "--job a b"),
        ("logs.sh", ["--lines", "x"], "--lines x"),
        ("tensorboard.sh", ["--port", "http"], "--port http"),
    ]:
        res = fake.run(script, *args)
        assert res.returncode == 2 and message in res.stderr, (script, res.stderr)
    res = fake.run("create.sh", env={"SPOT": "maybe"})
    assert res.returncode == 2 and "SPOT=maybe" in res.stderr
    assert fake.calls() == []


@pytest.mark.parametrize(
    "script, args",
    [
        ("create.sh", ["--spot"]),
        ("delete.sh", ["--yes"]),
        (
            "run.sh",
            [
                "--env",
                "A=b c",
                "--",
                "python",
                "-m",
                "codescaler_jax.train_rm",
                "--config",
                "c.yaml",
            ],
        ),
        ("run.sh", ["--detach", "--job", "rm", "--", "sleep", "1"]),
        ("run.sh", ["--stop", "--job", "rm"]),
        ("logs.sh", ["--follow"]),
        ("logs.sh", ["--lines", "7", "--job", "rm"]),
        ("tensorboard.sh", ["--port", "7007"]),
        (
            "setup.sh",
            ["--git-url", "https://example.com/x.git", "--git-ref", "v1", "--bucket", "b"],
        ),
    ],
)
def test_dry_run_prints_exactly_the_commands_it_would_run(fake, script, args):
    dry = _ok(fake.run(script, "--dry-run", *args))
    assert fake.calls() == []
    printed = [shlex.split(line) for line in dry.stdout.splitlines()]
    assert printed and all(p[0] == "gcloud" for p in printed)
    _ok(fake.run(script, *args))
    assert [p[1:] for p in printed] == fake.argvs()


def test_dry_run_of_setup_prints_the_packing_step(fake):
    dry = _ok(fake.run("setup.sh", "--dry-run"))
    lines = dry.stdout.splitlines()
    assert lines[0].startswith("bash -c ") and "git ls-files" in lines[0]
    assert [shlex.split(x)[:5] for x in lines[1:]] == [
        ["gcloud", *TPU_VM, "scp"],
        ["gcloud", *TPU_VM, "ssh"],
        ["gcloud", *TPU_VM, "ssh"],
    ]
    assert fake.calls() == [] and not list(Path(fake.worker_home).parent.glob("*.tar.gz"))


def test_setup_copies_the_checkout_and_installs_on_every_worker(fake):
    _ok(
        fake.run(
            "setup.sh", "--bucket", "my-bucket", exec_pattern=r"^mkdir -p codescaler-jax && tar"
        )
    )
    calls = fake.calls()
    assert [c["argv"][:5] for c in calls[1:]] == [
        TPU_VM + ["ssh", "my-tpu"],
        TPU_VM + ["ssh", "my-tpu"],
    ]
    scp = calls[0]["argv"]
    assert scp[:4] == TPU_VM + ["scp"] and scp[4].endswith(".tar.gz")
    assert scp[5] == "my-tpu:codescaler-jax.tar.gz" and scp[6:] == ["--worker=all", *WHERE]
    names = set(calls[0]["tar"])
    assert {"requirements.txt", "launch/worker_setup.sh", "codescaler_jax/distributed.py"} <= names
    assert not any(n.startswith((".venv", ".git/")) or "__pycache__" in n for n in names)
    for c in calls[1:]:
        assert "--worker=all" in c["argv"] and c["argv"][5:7] == WHERE
    # the extraction really ran in the fake worker home
    assert calls[1]["rc"] == 0
    assert (fake.worker_home / "codescaler-jax" / "launch" / "worker_setup.sh").is_file()
    assert not (fake.worker_home / "codescaler-jax.tar.gz").exists()
    assert _command(calls[2]["argv"]) == (
        "bash codescaler-jax/launch/worker_setup.sh --bucket my-bucket --mount gcs"
    )
    assert not list(
        fake.worker_home.parent.glob("codescaler-jax-*.tar.gz")
    )  # local tarball removed


def test_setup_from_git(fake):
    _ok(
        fake.run(
            "setup.sh",
            "--git-url",
            "https://example.com/a b.git",
            "--git-ref",
            "v1.2",
            "--remote-dir",
            "cs",
        )
    )
    argvs = fake.argvs()
    assert [a[3] for a in argvs] == ["ssh", "ssh"]
    clone = shlex.split(_command(argvs[0]).replace("(", " ( ").replace(")", " ) "))
    assert "https://example.com/a b.git" in clone and "v1.2" in clone and "FETCH_HEAD" in clone
    assert _command(argvs[1]) == "bash cs/launch/worker_setup.sh"


def test_worker_setup_pins_jax_tpu_to_requirements():
    text = (LAUNCH / "worker_setup.sh").read_text()
    assert '"jax[tpu]==$jax_version"' in text
    pin = re.search(r"^jax==(\S+)", (REPO / "requirements.txt").read_text(), re.M).group(1)
    out = subprocess.run(
        ["sed", "-n", r"s/^jax==\([^ ]*\).*/\1/p", str(REPO / "requirements.txt")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert out == pin


def _fake_project(home: Path) -> Path:
    d = home / "codescaler-jax"
    (d / ".venv" / "bin").mkdir(parents=True)
    (d / ".venv" / "bin" / "activate").write_text("export FAKE_VENV=active\n")
    return d


def test_run_streams_output_to_every_worker_log(fake):
    project = _fake_project(fake.worker_home)
    res = _ok(
        fake.run(
            "run.sh",
            "--env",
            "GREETING=hello world",
            "--",
            "echo",
            '"$GREETING from $FAKE_VENV"',
            "&&",
            "echo",
            "'$HOME'",
            exec_pattern=".",
        )
    )
    (call,) = fake.calls()
    assert call["argv"][:5] == TPU_VM + ["ssh", "my-tpu"] and "--worker=all" in call["argv"]
    assert "hello world from active\n$HOME\n" in res.stdout
    (log,) = (project / "logs").glob("train.*.log")
    assert log.read_text() == "hello world from active\n$HOME\n"
    # a failing command fails the launch
    res = fake.run("run.sh", "--", "exit", "3", exec_pattern=".")
    assert res.returncode == 3


def test_run_detached_then_stopped(fake):
    project = _fake_project(fake.worker_home)
    _ok(
        fake.run(
            "run.sh",
            "--detach",
            "--job",
            "bg",
            "--",
            "echo",
            "started;",
            "sleep",
            "120",
            exec_pattern=".",
        )
    )
    (pidfile,) = (project / "logs").glob("bg.*.pid")
    pid = int(pidfile.read_text())
    try:
        assert os.getpgid(pid) == pid  # its own process group, which --stop ends
        deadline = time.monotonic() + 10
        while "started" not in next((project / "logs").glob("bg.*.log")).read_text():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        res = _ok(fake.run("run.sh", "--stop", "--job", "bg", exec_pattern="."))
        assert "stopped bg" in res.stdout
        deadline = time.monotonic() + 10
        while _alive(pid):
            assert time.monotonic() < deadline, "the detached job survived --stop"
            time.sleep(0.05)
        assert not pidfile.exists()
    finally:
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) counts as stopped
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


def test_logs_tail_follow_collect(fake, tmp_path):
    _ok(fake.run("logs.sh"))
    _ok(fake.run("logs.sh", "--follow", "--job", "rm"))
    _ok(fake.run("logs.sh", "--collect", "out/logs"))
    tail, follow, collect = fake.argvs()
    for argv in (tail, follow, collect):
        assert argv[:7] == TPU_VM + ["ssh", "my-tpu", *WHERE] and "--worker=all" in argv
    assert _command(tail).startswith("tail -n 50 codescaler-jax/logs/train.$(hostname).log |")
    assert _command(follow).startswith("tail -n +1 -F codescaler-jax/logs/rm.$(hostname).log |")
    assert _command(collect) == "cat codescaler-jax/logs/train.$(hostname).log"
    assert collect[-1] == "--output-directory=out/logs" and (tmp_path / "out" / "logs").is_dir()


def test_tensorboard_forwards_a_port_from_worker_0(fake):
    _ok(fake.run("tensorboard.sh", "--logdir", "$HOME/gcs/runs", "--port", "7007"))
    (argv,) = fake.argvs()
    assert argv[:7] == TPU_VM + ["ssh", "my-tpu", *WHERE]
    assert "--worker=0" in argv
    assert _command(argv) == (
        "cd codescaler-jax && .venv/bin/tensorboard --logdir $HOME/gcs/runs"
        " --host localhost --port 7007"
    )
    assert argv[-3:] == ["--", "-L", "7007:localhost:7007"]


def test_gpu_node_exports_the_distributed_settings(tmp_path):
    probe = [
        sys.executable,
        "-c",
        "import json, os; print(json.dumps({k: os.environ[k] for k in "
        "('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID')}))",
    ]
    args = ["--coordinator", "10.0.0.1:8476", "--num-nodes", "4", "--node-rank", "3", "--"]
    res = subprocess.run(
        ["bash", str(LAUNCH / "gpu_node.sh"), *args, *probe],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {
        "JAX_COORDINATOR_ADDRESS": "10.0.0.1:8476",
        "JAX_NUM_PROCESSES": "4",
        "JAX_PROCESS_ID": "3",
    }
    dry = subprocess.run(
        ["bash", str(LAUNCH / "gpu_node.sh"), "--dry-run", *args, "python", "-m", "x"],
        capture_output=True,
        text=True,
    )
    assert dry.stdout.split() == [
        "env",
        "JAX_COORDINATOR_ADDRESS=10.0.0.1:8476",
        "JAX_NUM_PROCESSES=4",
        "JAX_PROCESS_ID=3",
        "python",
        "-m",
        "x",
    ]
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("COORDINATOR_ADDRESS", "NUM_NODES", "NODE_RANK")
    }
    for bad, message in [
        (
            ["--num-nodes", "2", "--node-rank", "0", "--", "true"],
            "missing setting COORDINATOR_ADDRESS",
        ),
        (
            ["--coordinator", "h:1", "--num-nodes", "2", "--node-rank", "2", "--", "true"],
            "NODE_RANK=2",
        ),
        (["--coordinator", "h", "--num-nodes", "2", "--node-rank", "0", "--", "true"], "HOST:PORT"),
    ]:
        res = subprocess.run(
            ["bash", str(LAUNCH / "gpu_node.sh"), *bad], capture_output=True, text=True, env=env
        )
        assert res.returncode == 2 and message in res.stderr, res.stderr


def test_scripts_parse_and_have_help():
    for script in sorted(LAUNCH.glob("*.sh")) + [LAUNCH / "gpu_slurm.sbatch"]:
        subprocess.run(["bash", "-n", str(script)], check=True)
        assert "set -euo pipefail" in script.read_text() or script.name == "common.sh"
    for script in (
        "create.sh",
        "setup.sh",
        "run.sh",
        "logs.sh",
        "tensorboard.sh",
        "delete.sh",
        "gpu_node.sh",
    ):
        res = subprocess.run(
            ["bash", str(LAUNCH / script), "--help"], capture_output=True, text=True
        )
        assert res.returncode == 0 and f"launch/{script}" in res.stdout, script
