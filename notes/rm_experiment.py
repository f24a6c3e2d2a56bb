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

ROOT = Path(__file__).resolve().parent.parent / "runs" / "rmexp"


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
    run.parent.mkdir(parents=True, exist_ok=True)
    # --data-from: the trainer reads the pairs cached in that run's data/ (same cache-key
    # check as its own cache: a different data config there is rebuilt, not silently used).
    code = ("import sys; from pathlib import Path; from codescaler_jax.rm import trainer as T; "
            "from codescaler_jax.data.datasets import load_pair_splits; "
            f"d = {str(Path(data_from).resolve() / 'data') if data_from else None!r}; "
            "T.RMTrainer._load_pairs = (lambda self: load_pair_splits(self.cfg.data, "
            "seed=self.cfg.train.seed, data_dir=Path(d), progress=False)) if d else "
            "T.RMTrainer._load_pairs; "
            "from codescaler_jax.train_rm import main; sys.exit(main(sys.argv[1:]))")
    cmd = [sys.executable, "-c", code, "--config", "configs/rm_tiny.yaml",
           "--no-progress", "--set", f"run_dir={run}"]
    for kv in rest:
        cmd += ["--set", kv]
    l0, t0 = load(), time.time()
    log_path = ROOT / f"{name}.stdout.txt"
    with open(log_path, "w") as f:
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
    used = {"train": d["train_pairs_used"], "validation": d["validation_pairs_used"],
            "held_out": d["eval_pairs_used"]}
    row = (
        f"| {name} | {' '.join(rest) or '(base)'} | {used['train']}/{used['validation']}/"
        f"{used['held_out']} | {bv.get('accuracy', float('nan')):.3f} @{bv.get('step')} "
        f"| {s['steps']}/{s['planned_steps']} | **{fe['accuracy']:.3f}** "
        f"| {pos.get('rewrite', float('nan')):.3f} / {pos.get('canonical', float('nan')):.3f} "
        f"| {s['last_train'].get('accuracy', float('nan')):.2f} "
        f"| {' '.join(f'{k[:6]}={v:.2f}' for k, v in sorted(kinds.items()))} "
        f"| {wall:.0f} s | {l0}->{l1} |"
    )
    curve = " ".join(f"{v['accuracy']:.3f}@{v['step']}" for v in s.get("validation", []))
    row += f"\n\n  {name} validation: {curve}\n"
    print(row)
    with open(ROOT / "rows.md", "a") as f:
        f.write(row + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
