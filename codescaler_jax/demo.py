"""The paper's story in miniature, one command: ``python -m codescaler_jax.demo``.

    python -m codescaler_jax.demo                       # configs/demo.yaml -> runs/demo
    python -m codescaler_jax.demo --set seed=1 --set run_dir=runs/demo_s1

In order, in one process, each stage's run directory under ``run_dir``:

1. ``rm/``: train the RM (``configs/rm_tiny.yaml`` + ``rm_overrides``); held-out pairwise
   accuracy overall, by mutant kind and by positive kind;
2. ``best_of_n/``: best-of-N on the held-out problems (``data/candidates.py``: N labelled
   candidates per problem, rewrites that pass and mutants that fail): the pass rate of the RM
   pick, a random pick, the oracle and the test-execution pick, with each selector's time;
3. ``sft/``: the SFT warm start (``configs/sft_tiny.yaml`` + ``sft_overrides``) on the
   training problems only;
4. ``grpo_rm/``: GRPO from the warm start with the shaped RM reward (``configs/grpo_tiny.yaml``
   + ``grpo_overrides``), prompts = the SFT problems, pass-rate probes every K steps;
5. ``grpo_execution/``: the same run with ``reward.name=execution`` (the binary baseline).

Then ``report.md``: a table per claim with its bar and whether it holds, the machine's load
average (the timings depend on it), and PNG plots (``reward.png``, ``pass_rate.png``,
``best_of_n.png``). ``seed`` is every stage's seed: the same seed gives the same figures
(timings aside). A used ``run_dir`` is overwritten stage by stage.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from codescaler_jax.cli import guarded
from codescaler_jax.config import load_config

log = logging.getLogger("codescaler_jax")


@dataclasses.dataclass
class DemoConfig:
    """``configs/demo.yaml``: the stage configs and the overrides that size them for the demo
    (``key=value`` strings as ``--set`` takes). ``bon_n`` / ``bon_passing``: candidates per
    held-out problem and how many of them pass."""

    run_dir: str = "runs/demo"
    seed: int = 0
    rm_config: str = "configs/rm_tiny.yaml"
    rm_overrides: list[str] = dataclasses.field(default_factory=list)
    bon_n: int = 8
    bon_passing: int = 2
    sft_config: str = "configs/sft_tiny.yaml"
    sft_overrides: list[str] = dataclasses.field(default_factory=list)
    grpo_config: str = "configs/grpo_tiny.yaml"
    grpo_overrides: list[str] = dataclasses.field(default_factory=list)
    progress: bool = False


def _load() -> tuple[float, float, float]:
    return os.getloadavg()


def stage_rm(cfg: DemoConfig, out: Path) -> dict[str, Any]:
    from codescaler_jax.rm.config import RMTrainConfig
    from codescaler_jax.rm.trainer import RMTrainer

    rm = load_config(RMTrainConfig, cfg.rm_config,
                     [*cfg.rm_overrides, f"run_dir={out / 'rm'}", f"train.seed={cfg.seed}"])
    return RMTrainer(rm, overwrite=True, progress=cfg.progress).run()


def stage_best_of_n(cfg: DemoConfig, out: Path, rm_summary: dict[str, Any]) -> dict[str, Any]:
    from codescaler_jax.best_of_n import add_known_labels, best_of_n
    from codescaler_jax.data.candidates import best_of_n_candidates, problems_of_split
    from codescaler_jax.data.problems import humaneval_problems
    from codescaler_jax.rm.scorer import RewardScorer

    data = rm_summary["config"]["data"]
    held = problems_of_split(humaneval_problems(), "held_out",
                             held_out_fraction=data["eval_fraction"],
                             validation_fraction=data["validation_fraction"])
    cands = best_of_n_candidates(held, n=cfg.bon_n, passing=cfg.bon_passing, seed=cfg.seed)
    scorer = RewardScorer.from_pretrained(out / "rm", max_length=data["max_length"],
                                          batch_size=32)
    records, summary = best_of_n(scorer, cands.problems, cands.responses)
    add_known_labels(summary, records, cands)
    d = out / "best_of_n"
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "picks.jsonl", "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    (d / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def stage_sft(cfg: DemoConfig, out: Path) -> dict[str, Any]:
    from codescaler_jax.sft.config import SFTConfig
    from codescaler_jax.sft.trainer import train_sft

    sft = load_config(SFTConfig, cfg.sft_config,
                      [*cfg.sft_overrides, f"run_dir={out / 'sft'}", f"train.seed={cfg.seed}"])
    return train_sft(sft, overwrite=True, progress=cfg.progress)


def stage_grpo(cfg: DemoConfig, out: Path, name: str, reward: str) -> dict[str, Any]:
    from codescaler_jax.rl.config import GRPOConfig
    from codescaler_jax.rl.trainer import GRPOTrainer

    g = load_config(GRPOConfig, cfg.grpo_config, [
        *cfg.grpo_overrides, f"run_dir={out / name}", f"train.seed={cfg.seed}",
        f"policy.init_from={out / 'sft' / 'hf'}",
        f"data.source={out / 'sft' / 'data' / 'problems.jsonl'}",
        f"reward.name={reward}", f"reward.rm_path={out / 'rm'}",
    ])
    return GRPOTrainer(g, overwrite=True, progress=cfg.progress).run()


def grpo_claims(s: dict[str, Any]) -> dict[str, Any]:
    """Step-0 vs last probe pass rates and the valid-code floor of one GRPO summary."""
    probes = s.get("pass_rate_eval") or []
    first, last = (probes[0], probes[-1]) if probes else ({}, {})
    valid = [h["valid_code_fraction"] for h in s["history"]]
    return {
        "train_pass_rate_step0": first.get("train/pass_rate"),
        "train_pass_rate_last": last.get("train/pass_rate"),
        "train_pass_rate_gain": (last.get("train/pass_rate", 0.0)
                                 - first.get("train/pass_rate", 0.0)) if probes else None,
        "held_out_pass_rate_step0": first.get("held_out/pass_rate"),
        "held_out_pass_rate_last": last.get("held_out/pass_rate"),
        "probe_valid_step0": first.get("train/valid_code_fraction"),
        "probe_valid_last": last.get("train/valid_code_fraction"),
        "probe_valid_min": min((p["train/valid_code_fraction"] for p in probes
                                if "train/valid_code_fraction" in p), default=None),
        "rollout_valid_min": min(valid) if valid else None,
        "rollout_valid_mean": sum(valid) / len(valid) if valid else None,
        "steps": s["steps"],
        "last_probe_step": last.get("step"),
    }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _points(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.1f} points"


def _ok(flag: bool) -> str:
    return "holds" if flag else "**missed**"


def write_report(out: Path, res: dict[str, Any]) -> str:
    """``report.md`` and the PNG plots from the stage results; returns the markdown."""
    from codescaler_jax.plots import bar_chart, line_chart

    rm, bon = res["rm"], res["best_of_n"]
    lines = ["# CodeScaler in miniature: the demo's figures", "",
             f"seed {res['seed']}; wall time {res['wall_s'] / 60:.1f} min; load average "
             f"(1/5/15 min) at start {res['load_start']}, at end {res['load_end']} on "
             f"{os.cpu_count()} CPUs. Timings depend on the load.", ""]
    lines += ["| stage | wall s |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in res["stage_seconds"].items()]
    fe = rm.get("final_eval") or {}
    lines += ["", "## Claim 1: the RM ranks code by correctness (held-out pairs)", "",
              "| metric | value | bar |", "|---|---|---|",
              f"| held-out pairwise accuracy | {fe.get('accuracy', float('nan')):.3f} | "
              f">= 0.80 mean of 3 seeds, >= 0.75 each: "
              f"{_ok(fe.get('accuracy', 0) >= 0.75)} (this seed) |"]
    for k in sorted(fe):
        if k.endswith("/accuracy") and (k.startswith("by_kind") or k.startswith("by_positive")):
            extra = (f" >= 0.70: {_ok(fe[k] >= 0.70)}" if k == "by_positive/rewrite/accuracy"
                     else "")
            lines.append(f"| {k[:-len('/accuracy')]} | {fe[k]:.3f} |{extra} |")
    pr = bon.get("pass_rate", {})
    gain = bon.get("rm_minus_random", 0.0)
    lines += ["", "## Claim 2: best-of-N with the RM beats chance, faster than running tests",
              "", f"{bon['problems']} held-out problems x N={bon['n']} candidates "
              f"({bon['candidate_set']['passing_per_problem']} passing each at most); "
              f"label mismatches on re-execution: {bon.get('label_mismatches')}.", "",
              "| selector | pass rate | wall s |", "|---|---|---|",
              f"| RM pick (warm) | {_pct(pr.get('rm_pick'))} | {bon['rm_seconds_warm']:.2f} |",
              f"| RM pick (cold, with compile) | {_pct(pr.get('rm_pick'))} | "
              f"{bon['rm_seconds_cold']:.2f} |",
              f"| random pick (expected) | {_pct(pr.get('random_pick'))} | 0 |",
              f"| oracle | {_pct(pr.get('oracle'))} | - |",
              f"| test-execution pick | {_pct(pr.get('test_pick'))} | "
              f"{bon['test_seconds']:.2f} |", "",
              f"RM pick - random pick: {100 * gain:+.1f} points (bar >= +15: "
              f"{_ok(gain >= 0.15)})."]
    lines += ["", "## Claim 3: GRPO with the shaped RM reward raises the pass rate", "",
              "Pass rates from the fixed-key probes (same prompts, same sampler settings, "
              "same RNG key at every probe; step 0 is before any update).", "",
              "| metric | GRPO, RM reward | GRPO, execution reward |", "|---|---|---|"]
    a, b = res["grpo_rm_claims"], res["grpo_execution_claims"]
    for key, label in (("train_pass_rate_step0", "training-prompt pass rate, step 0"),
                       ("train_pass_rate_last", "training-prompt pass rate, last probe"),
                       ("train_pass_rate_gain", "gain (bar >= +10 points)"),
                       ("held_out_pass_rate_step0", "held-out pass rate, step 0"),
                       ("held_out_pass_rate_last", "held-out pass rate, last probe"),
                       ("probe_valid_last", "valid-code fraction, last probe"),
                       ("probe_valid_min", "valid-code fraction, min over probes"),
                       ("rollout_valid_min", "valid-code fraction, min over rollouts (bar >= 0.9)"),
                       ("rollout_valid_mean", "valid-code fraction, mean over rollouts")):
        fmt = _points if key.endswith("_gain") else _pct
        lines.append(f"| {label} | {fmt(a[key])} | {fmt(b[key])} |")
    g = a["train_pass_rate_gain"] or 0.0
    lines += ["", f"RM-reward run: gain {100 * g:+.1f} points ({_ok(g >= 0.10)}); valid-code "
              f"floor {_pct(a['rollout_valid_min'])} ({_ok((a['rollout_valid_min'] or 0) >= 0.9)})."
              f" Steps: {a['steps']}.", "",
              "![reward](reward.png)", "", "![pass rate](pass_rate.png)", "",
              "![best-of-N](best_of_n.png)", ""]
    text = "\n".join(lines)
    (out / "report.md").write_text(text)
    series_r, series_p = {}, {}
    for name in ("grpo_rm", "grpo_execution"):
        s = res[name]
        series_r[f"{name} reward"] = ([h["step"] for h in s["history"]],
                                      [h["reward_mean"] for h in s["history"]])
        probes = s.get("pass_rate_eval") or []
        series_p[f"{name} train"] = ([p["step"] for p in probes],
                                     [p.get("train/pass_rate") for p in probes])
        series_p[f"{name} held-out"] = ([p["step"] for p in probes],
                                        [p.get("held_out/pass_rate") for p in probes])
    line_chart(out / "reward.png", series_r, title="GRPO: mean reward per step (RM: shaped)",
               xlabel="step", ylabel="reward")
    line_chart(out / "pass_rate.png", series_p, title="GRPO: probe pass rate (sandbox)",
               xlabel="step", ylabel="pass rate", ylim=(0.0, 1.0))
    bar_chart(out / "best_of_n.png", {"RM": pr.get("rm_pick", 0.0),
                                      "random": pr.get("random_pick", 0.0),
                                      "oracle": pr.get("oracle", 0.0),
                                      "tests": pr.get("test_pick", 0.0)},
              title=f"best-of-{bon['n']} on held-out problems: pass rate", ylabel="pass rate")
    return text


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """All five stages, then the report; returns the results (also ``results.json``)."""
    out = Path(cfg.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"seed": cfg.seed, "load_start": _load(), "stage_seconds": {}}
    t0 = time.perf_counter()

    def timed(name, fn, *a):
        t = time.perf_counter()
        log.info("demo: %s ...", name)
        res[name] = fn(*a)
        res["stage_seconds"][name] = time.perf_counter() - t
        log.info("demo: %s done in %.0f s", name, res["stage_seconds"][name])

    timed("rm", stage_rm, cfg, out)
    timed("best_of_n", stage_best_of_n, cfg, out, res["rm"])
    timed("sft", stage_sft, cfg, out)
    timed("grpo_rm", stage_grpo, cfg, out, "grpo_rm", "codescaler")
    timed("grpo_execution", stage_grpo, cfg, out, "grpo_execution", "execution")
    res["grpo_rm_claims"] = grpo_claims(res["grpo_rm"])
    res["grpo_execution_claims"] = grpo_claims(res["grpo_execution"])
    res["wall_s"] = time.perf_counter() - t0
    res["load_end"] = _load()
    write_report(out, res)
    keep = {k: v for k, v in res.items() if k not in ("rm", "sft", "grpo_rm", "grpo_execution")}
    keep["rm_final_eval"] = res["rm"].get("final_eval")
    keep["sft_final_loss"] = res["sft"].get("final_loss")
    (out / "results.json").write_text(json.dumps(keep, indent=2, default=str) + "\n")
    return res


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m codescaler_jax.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo.yaml", help="the demo's YAML config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a demo key, e.g. --set seed=1 (repeatable)")
    return p.parse_args(argv)


@guarded
def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    from codescaler_jax.logging_utils import setup_logging

    cfg = load_config(DemoConfig, args.config, args.overrides)
    setup_logging()
    run_demo(cfg)
    print((Path(cfg.run_dir) / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
