"""The README's "Will it fit?" table: the 8B recipes compiled for real TPU slices.

    python -m codescaler_jax.bench.fit_table                       # both recipes, 3 slices
    python -m codescaler_jax.bench.fit_table --recipes rm --slices v5p-16 --layers 2

For each recipe (``configs/rm_codescaler_8b.yaml``: the RM train step;
``configs/grpo_codescaler_8b.yaml``: the rollout, RM scoring, log-prob and update programs) and
each slice, the TPU compiler (the ``tpu`` extra) compiles every program on abstract arrays, as
``--dry-run --topology SLICE`` does, and the table gives per program: memory per chip
(arguments, temporaries, total including what stays resident), the verdict against the
chip's usable HBM with the headroom, and the compile time. Where a program does not fit, the
smallest change that does is searched and compiled (``--no-suggest`` skips that). Output:
a markdown table on stdout and, with ``--out DIR``, ``fit_table.md`` and ``fit_table.json``
(with the machine's load, the wall time and the versions).

``--rollout-search`` (GRPO only) then bisects ``rollout.batch_size`` for the largest rollout
batch whose ``rollout_decode_loop`` fits on each slice, compiling each probe: the values are
the multiples of the mesh's data x fsdp ways that divide the step's responses (no filler
rows), and ``--rollout-search-fine`` refines between the largest that fits and the next one
over every multiple of the ways.

XLA's FLOPs and estimated seconds are in the table with a ``*`` where they are not the whole
program's (a while loop: scanned layers, the decode loop, micro-batches; or a Pallas kernel
such as splash attention, whose FLOPs XLA cannot see); no MFU is derived from those. The
analytic model FLOPs per step are always given.

``--layers N`` cuts the models to N decoder layers (a quick look; the table's figures are the
full models). ``--rm-set`` / ``--grpo-set KEY=VALUE`` override a key of one recipe, and
``--rm-config`` / ``--grpo-config`` compile another config in its place.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

RECIPES = {
    "rm": ("configs/rm_codescaler_8b.yaml", "model.num_hidden_layers"),
    "grpo": ("configs/grpo_codescaler_8b.yaml", "policy.num_hidden_layers"),
}
DEFAULT_SLICES = ("v5p-16", "v5p-32", "v6e-16")


def _args(argv):
    p = argparse.ArgumentParser(prog="python -m codescaler_jax.bench.fit_table",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    p.add_argument("--slices", nargs="+", default=list(DEFAULT_SLICES),
                   help="gcloud slice names (default: %(default)s)")
    p.add_argument("--layers", type=int, default=None, help="cut the models to N layers")
    for name, (path, _) in RECIPES.items():
        p.add_argument(f"--{name}-config", default=path, help=f"default: {path}")
        p.add_argument(f"--{name}-set", action="append", default=[], metavar="KEY=VALUE",
                       help=f"override a key of the {name} config (repeatable)")
    p.add_argument("--no-suggest", action="store_true", help="no search for a change that fits")
    p.add_argument("--max-compiles", type=int, default=4,
                   help="compiles per misfit program in the search (default 4)")
    p.add_argument("--rollout-search", action="store_true",
                   help="GRPO: bisect rollout.batch_size for the largest rollout that fits")
    p.add_argument("--rollout-search-fine", action="store_true",
                   help="with --rollout-search: refine over every multiple of the mesh ways")
    p.add_argument("--out", default=None, help="write fit_table.md and fit_table.json here")
    return p.parse_args(argv)


def _cpu_s() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _load(recipe: str, path: str, overrides: list[str], layers: int | None):
    from codescaler_jax.config import load_config

    layer_key = RECIPES[recipe][1]
    if recipe == "rm":
        from codescaler_jax.rm.config import RMTrainConfig as cls
        from codescaler_jax.train_rm import build_dry_run, dry_run_report
    else:
        from codescaler_jax.rl.config import GRPOConfig as cls
        from codescaler_jax.train_grpo import build_dry_run, dry_run_report
    ov = list(overrides) + ([f"{layer_key}={layers}"] if layers else [])
    return path, ov, load_config(cls, path, ov), build_dry_run, dry_run_report


def _row_cells(recipe: str, slice_name: str, p: dict) -> list[str]:
    f = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    star = "" if p.get("xla_cost_meaningful", True) else "*"
    sci = lambda x: "-" if x is None else f"{x:.2e}{star}"  # noqa: E731
    if p["fits"] is True:
        verdict = f"fits ({p['headroom_pct']:.0f}% free)"
    elif p["fits"] is False:
        verdict = "does not fit"
    else:
        verdict = "-"
    return [recipe, slice_name, p["name"], f(p["arguments_gib"]), f(p["temporaries_gib"]),
            f(p["total_gib"]), f(p["hbm_gib"]), verdict, sci(p.get("xla_flops_per_device")),
            "-" if p.get("xla_seconds") is None else f"{p['xla_seconds']:.3g}{star}",
            "-" if p.get("model_flops") is None else f"{p['model_flops']:.2e}",
            "-" if p.get("mfu") is None else f"{100 * p['mfu']:.1f}%",
            f"{p['compile_s']:.0f}"]


def markdown(rows: list[dict]) -> str:
    """The table (one line per program) and, below it, the verdicts and suggestions."""
    head = ["recipe", "slice", "program", "args GiB", "temps GiB", "total GiB", "HBM GiB",
            "verdict", "XLA FLOPs/chip", "XLA est. s", "model FLOPs", "MFU", "compile s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['recipe']} | {r['slice']} | - | | | | | error | |")
            notes.append(f"- {r['recipe']} on {r['slice']}: {r['error']}")
            continue
        for name, p in r["report"]["programs"].items():
            lines.append("| " + " | ".join(_row_cells(r["recipe"], r["slice"],
                                                      {**p, "name": name})) + " |")
        step = {True: "fits", False: "does not fit", None: "no verdict"}[r["report"]["fits"]]
        notes.append(f"- {r['recipe']} on {r['slice']}: the step {step} (compiled in "
                     f"{r['wall_s']:.0f} s wall, {r['cpu_s']:.0f} CPU s)")
        for s in r["report"]["suggestions"]:
            if s["change"] is None:
                tried = "; ".join(f"{t['change']}: {t['verdict']}" for t in s["tried"])
                notes.append(f"  - {s['program']}: no change tried fits ({tried})")
            else:
                notes.append(f"  - {s['program']}: smallest change that fits: "
                             f"`{s['change']['command_line']}` -> {s['report']['verdict']}")
        search = r.get("rollout_search")
        if search:
            tried = ", ".join(f"{t['value']}: {'fits' if t['fits'] else 'no'}"
                              for t in search["tried"])
            best = search["value"]
            notes.append(f"  - largest rollout batch that fits: "
                         f"{'none tried' if best is None else best}"
                         + ("" if best is None else f" ({search['report']['verdict']})")
                         + f"; compiled {tried}")
    notes.append("")
    notes.append("`*`: XLA's figure is not the whole program's (a while loop's body is counted "
                 "once; a Pallas kernel's FLOPs are invisible to it); MFU is derived only "
                 "where it is")
    return "\n".join(lines + [""] + notes)


def rollout_values(rows: int, ways: int, lo: int | None = None, hi: int | None = None
                   ) -> list[int]:
    """Rollout batches to bisect: multiples of ``ways`` that divide ``rows`` (no filler rows),
    or, with bounds ``lo < b < hi``, every multiple of ``ways`` between them."""
    if lo is None:
        return [b for b in range(ways, rows + 1, ways) if rows % b == 0]
    return [b for b in range(lo + ways, hi, ways) if b % ways == 0]


def _rollout_search(cfg, build, target, info: dict, fine: bool) -> dict:
    from codescaler_jax.training.dry_run import largest_fitting_value

    ways = info["mesh"]["data"] * info["mesh"]["fsdp"]
    rows = info["responses_per_step"]
    key, prog = "rollout.batch_size", "rollout_decode_loop"
    coarse = largest_fitting_value(cfg, build, target, prog, key, rollout_values(rows, ways))
    out = coarse.to_dict()
    if fine:
        vals = rollout_values(rows, ways)
        lo = coarse.value or 0
        nxt = [v for v in vals if v > lo]
        if nxt:
            fine_res = largest_fitting_value(cfg, build, target, prog, key,
                                             rollout_values(rows, ways, lo, nxt[0]))
            out["tried"] += fine_res.to_dict()["tried"]
            if fine_res.value is not None:
                out["value"], out["report"] = fine_res.value, fine_res.report.to_dict()
    print(f"  largest rollout batch that fits: {out['value']}", file=sys.stderr, flush=True)
    return out


def _write(args, rows: list[dict], wall_s: float, load_before) -> None:
    """``fit_table.md`` and ``fit_table.json`` (rows so far, machine load, versions)."""
    from codescaler_jax.bench.common import environment

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fit_table.md").write_text(markdown(rows) + "\n")
    payload = {"benchmark": "fit_table", "environment": environment(),
               "layers": args.layers, "wall_s": round(wall_s, 1),
               "load_avg_before": load_before, "rows": rows}
    try:
        from importlib.metadata import version

        payload["environment"]["libtpu"] = version("libtpu")
    except Exception:  # noqa: BLE001 - a version string must never break the table
        pass
    (out / "fit_table.json").write_text(json.dumps(payload, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the TPU compiler needs no TPU backend
    from codescaler_jax.training.dry_run import resolve_target, run
    from codescaler_jax.training.topology import LibtpuMissingError, UnknownSliceError

    rows = []
    t_all = time.perf_counter()
    load_before = os.getloadavg()
    for recipe in args.recipes:
        for slice_name in args.slices:
            path, ov, cfg, build, to_dict = _load(
                recipe, getattr(args, f"{recipe}_config"), getattr(args, f"{recipe}_set"),
                args.layers)
            t0, cpu0 = time.perf_counter(), _cpu_s()
            row = {"recipe": recipe, "config": path, "overrides": ov, "slice": slice_name}
            try:
                result = run(cfg, build, resolve_target(slice_name),
                             suggest_changes=not args.no_suggest,
                             max_compiles=args.max_compiles)
                row["report"] = to_dict(result)
                if recipe == "grpo" and args.rollout_search:
                    row["rollout_search"] = _rollout_search(
                        cfg, build, resolve_target(slice_name), result.info,
                        args.rollout_search_fine)
            except (UnknownSliceError, LibtpuMissingError) as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            except ValueError as e:  # a mesh or batch this slice cannot split
                row["error"] = str(e)
            row["wall_s"] = round(time.perf_counter() - t0, 1)
            # CPU seconds of this process (all compiler threads): on a shared machine the
            # wall time says more about the other jobs than about the compile.
            row["cpu_s"] = round(_cpu_s() - cpu0, 1)
            row["load_avg_after"] = os.getloadavg()
            rows.append(row)
            print(f"{recipe} on {slice_name}: {row['wall_s']:.0f} s wall, {row['cpu_s']:.0f} CPU s",
                  file=sys.stderr, flush=True)
            if args.out:  # after every row: a long run stopped early keeps what it compiled
                _write(args, rows, time.perf_counter() - t_all, load_before)
    table = markdown(rows)
    print(table)
    if args.out:
        _write(args, rows, time.perf_counter() - t_all, load_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
