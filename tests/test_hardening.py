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
