"""Packaging as a library: compatible ranges over the exact lock, a console script per
command, and benchmarks that say in one line when torch is missing."""

import configparser
import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg


def _lines(text: str) -> list[str]:
    return [ln.split("#")[0].strip() for ln in text.splitlines() if ln.split("#")[0].strip()]


def _install_requires() -> dict[str, Requirement]:
    reqs = [Requirement(r) for r in _lines(_setup_cfg()["options"]["install_requires"])]
    return {r.name.lower(): r for r in reqs}


def _lock() -> dict[str, Version]:
    out = {}
    for line in _lines((ROOT / "requirements.txt").read_text()):
        name, _, version = line.partition("==")
        assert version, f"requirements.txt must pin exactly: {line!r}"
        out[name.strip().lower()] = Version(version.strip())
    return out


def _next_patch(v: Version) -> Version:
    major, minor, micro = (list(v.release) + [0, 0])[:3]
    return Version(f"{major}.{minor}.{micro + 1}")


def test_ranges_hold_the_lock_and_its_newer_patch_releases():
    reqs, lock = _install_requires(), _lock()
    for name, req in reqs.items():
        assert not any(s.operator == "==" for s in req.specifier), f"{name}: exact pin"
        if name in lock:
            assert req.specifier.contains(lock[name]), (name, str(req.specifier), lock[name])
            newer = _next_patch(lock[name])
            assert req.specifier.contains(newer), f"{name} {newer} would be downgraded"
    # every direct dependency is locked, and the lock holds nothing the code does not use
    assert set(reqs) <= set(lock)
    assert {"fire", "tree-sitter-python"}.isdisjoint(set(lock) | set(reqs))


def test_installing_the_package_changes_no_installed_dependency(tmp_path):
    """``pip install -e .`` against this environment, offline (no index: pip may only use what
    is installed), resolves to installing the package alone: every dependency already
    present is kept as it is."""
    report = tmp_path / "report.json"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--no-index",
         "--no-build-isolation", "--report", str(report), "-e", str(ROOT)],
        check=True, cwd=tmp_path, capture_output=True, text=True,
    )
    installs = [i["metadata"]["name"] for i in json.loads(report.read_text())["install"]]
    assert installs == ["codescaler-jax"]


def test_every_command_has_a_console_script():
    scripts = dict(
        (name.strip(), target.strip())
        for name, _, target in (
            ln.partition("=") for ln in _lines(_setup_cfg()["options.entry_points"]
                                               ["console_scripts"]))
    )
    for target in scripts.values():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), target
    commands = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts)
        for p in (ROOT / "codescaler_jax").rglob("*.py")
        if re.search(r'^if __name__ == "__main__":', p.read_text(), re.M)
    } - {"codescaler_jax.code.runner"}  # the sandbox's own child process, not a command
    wrapped = {t.partition(":")[0] for t in scripts.values()}
    entry = (ROOT / "codescaler_jax" / "entry_points.py").read_text()
    missing = [c for c in commands if c not in wrapped and f"from {c} import main" not in entry]
    assert missing == []


def test_a_benchmark_without_torch_says_so_in_one_line():
    code = (
        "import sys\n"
        "class NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        "import codescaler_jax.bench.train_rm\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "error: bench.train_rm compares against PyTorch, which is not installed; "
        "install the test extra: pip install -e '.[test]'"
    ]
