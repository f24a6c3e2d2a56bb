"""Run one RM experiment (rm_tiny.yaml + --set overrides) and print its row for
notes/rm_experiments.md. Usage:

    PYTHONPATH=$PWD python notes/rm_experiment.py NAME [--data-from RUN_DIR] key=value ...

``--data-from`` copies another run's ``data/`` (the built pairs) so that runs differing only
in model / optimisation settings skip the sandbox; the data settings must then be the same.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path("/tmp/rmexp")


def load() -> str:
    return open("/proc/loadavg").read().split()[0]


def main(argv):
    name, rest = argv[0], argv[1:]
    data_from = None
    if rest and rest[0] == "--data-from":
        data_from, rest = rest[1], rest[2:]
    run = ROOT / name
    if run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True)
    if data_from:
        shutil.copytree(Path(data_from) / "data", run / "data")
    cmd = [sys.executable, "-m", "codescaler_jax.train_rm", "--config", "configs/rm_tiny.yaml",
           "--no-progress", "--set", f"run_dir={run}"]
    for kv in rest:
        cmd += ["--set", kv]
    l0, t0 = load(), time.time()
    with open(run / "stdout.txt", "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=os.environ)
    wall, l1 = time.time() - t0, load()
    if rc:
        print(f"| {name} | {' '.join(rest)} | FAILED rc={rc} |")
        return rc
    s = json.loads((run / "summary.json").read_text())
    fe, bv = s["final_eval"], s["best_validation"] or {}
    kinds = {k.split("/")[1]: v for k, v in fe.items() if k.startswith("by_kind/")
             and k.endswith("/accuracy")}
    pos = {k.split("/")[1]: v for k, v in fe.items() if k.startswith("by_positive/")
           and k.endswith("/accuracy")}
    d = s["data"]
    used = d.get("pairs_used") or {"train": d["train_pairs"], "validation": d["validation_pairs"],
                                   "held_out": d["eval_pairs"]}
    row = (
        f"| {name} | {' '.join(rest) or '(base)'} | {used['train']}/{used['validation']}/"
        f"{used['held_out']} | {bv.get('accuracy', float('nan')):.3f} @{bv.get('step')} "
        f"| {s['steps']}/{s['planned_steps']} | **{fe['accuracy']:.3f}** "
        f"| {pos.get('rewrite', float('nan')):.3f} / {pos.get('canonical', float('nan')):.3f} "
        f"| {s['last_train'].get('accuracy', float('nan')):.2f} "
        f"| {' '.join(f'{k[:6]}={v:.2f}' for k, v in sorted(kinds.items()))} "
        f"| {wall:.0f} s | {l0}->{l1} |"
    )
    print(row)
    with open(ROOT / "rows.md", "a") as f:
        f.write(row + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
