"""Dry runs shared by ``train_rm`` and ``train_grpo``: compile every device program of a step
for a target, report each, and where one does not fit, suggest the smallest change that does.

An entry point supplies a *builder*: ``build(cfg, target) -> (info, [ProgramSpec, ...])``. Each
``ProgramSpec`` lowers one program on abstract arrays over a mesh of ``target``'s devices and
names the knobs that shrink it (micro-batches, remat); ``run`` compiles them all
(``training.report``), adds the bigger-slice knob, and searches (``training.fit``) where one
does not fit, rebuilding the program from the changed config.

On the command line (``add_cli_args`` / ``cli_main``):

- ``--dry-run`` alone compiles for the local devices (fake CPU devices in tests), as before;
- ``--topology SLICE`` compiles for a real TPU slice with the TPU compiler (the ``tpu`` extra)
  and implies ``--dry-run``;
- the report is a table on stdout; ``--json PATH`` also writes it as JSON (``--json -``: JSON
  on stdout instead of the table).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from codescaler_jax.training.fit import (
    Candidate,
    Change,
    Knob,
    Largest,
    Suggestion,
    largest_that_fits,
    suggest,
)
from codescaler_jax.training.report import (
    ProgramReport,
    Target,
    compile_program,
    format_table,
    local_target,
    tpu_target,
)
from codescaler_jax.training.topology import (
    LibtpuMissingError,
    UnknownSliceError,
    bigger_slices,
    get_slice,
)


@dataclasses.dataclass
class ProgramSpec:
    """One device program of a step, ready to lower.

    Attributes:
        name: its name in the report.
        lower: returns its ``jax.stages.Lowered`` on abstract arrays.
        model_flops: analytic FLOPs of one call, all devices together.
        resident_bytes: per-device bytes of other long-lived buffers during the program.
        arguments_bytes: per-device bytes of its arguments (for the search when refused).
        knobs: config changes that shrink it, cheapest first (the slice knob is added).
    """

    name: str
    lower: Callable[[], jax.stages.Lowered]
    model_flops: float | None = None
    resident_bytes: int = 0
    arguments_bytes: int | None = None
    knobs: tuple[Knob, ...] = ()


Builder = Callable[[Any, Target], tuple[dict, list[ProgramSpec]]]


@dataclasses.dataclass
class DryRun:
    """Everything a dry run found: run info, a report per program, the suggestions."""

    info: dict
    programs: list[ProgramReport]
    suggestions: list[Suggestion]
    target: Target

    @property
    def fits(self) -> bool | None:
        verdicts = [p.fits for p in self.programs]
        if any(v is False for v in verdicts):
            return False
        return None if any(v is None for v in verdicts) else True

    def program(self, name: str) -> ProgramReport:
        return next(p for p in self.programs if p.name == name)

    def to_dict(self) -> dict:
        s = self.target.slice
        out = dict(self.info)
        out["target"] = {
            "slice": None if s is None else s.name,
            "topology": None if s is None else s.topology,
            "chips": self.target.num_devices,
            "device_kind": self.target.devices[0].device_kind,
            "hbm_gib_per_chip": None if s is None else s.chip.hbm_gib,
            "usable_hbm_gib_per_chip": None if s is None else s.chip.usable_hbm_gib,
            "peak_bf16_flops_per_chip": None if s is None else s.chip.peak_bf16_flops,
        }
        out["programs"] = {p.name: p.to_dict() for p in self.programs}
        out["fits"] = self.fits
        out["suggestions"] = [x.to_dict() for x in self.suggestions]
        return out

    def text(self, title: str) -> str:
        head = f"{title}\ntarget: {self.target.describe()}"
        if "mesh" in self.info:
            head += f"; mesh {self.info['mesh']}"
        parts = [format_table(self.programs, head)]
        if "memory_by_part" in self.info:
            parts.append(memory_by_part(self.info["memory_by_part"]))
        parts += [s.describe() for s in self.suggestions]
        if self.fits is not None:
            parts.append("the step fits" if self.fits else "the step does not fit")
        return "\n".join(parts)


def memory_by_part(parts: dict[str, dict]) -> str:
    """One line of the long-lived buffers by part, e.g. ``memory by part (GiB per device):
    policy_params 0.5, optimizer_state 1.0, ...`` (``parts``: ``{name: {"bytes": n}}``)."""
    body = ", ".join(f"{k} {v['bytes'] / 2**30:.4g}" for k, v in parts.items())
    return f"memory by part (GiB per device): {body}"


def resolve_target(topology: str | None) -> Target:
    """The local devices, or those of TPU slice ``topology`` (gcloud name, e.g. ``v5p-16``)."""
    return local_target() if topology is None else tpu_target(get_slice(topology))


def slice_knob(target: Target) -> Knob:
    """Bigger slices of the target's generation, the next ones first."""
    s = target.slice
    cands = tuple(Candidate(Change((), t.name), all_scale=s.chips / t.chips)
                  for t in bigger_slices(s))
    return Knob("slice", cands)


def run(cfg: Any, build: Builder, target: Target, *, suggest_changes: bool = True,
        max_compiles: int = 6) -> DryRun:
    """Compile every program ``build`` gives for ``target``; suggest changes for misfits."""
    info, specs = build(cfg, target)
    reports = [
        compile_program(s.name, s.lower, target, model_flops=s.model_flops,
                        resident_bytes=s.resident_bytes)
        for s in specs
    ]
    suggestions = []
    if suggest_changes and target.slice is not None:
        for spec, rep in zip(specs, reports, strict=True):
            if rep.fits is not False:
                continue
            suggestions.append(suggest(
                rep, [*spec.knobs, slice_knob(target)],
                lambda change, name=spec.name: _recompile(cfg, build, target, name, change),
                arguments_estimate=spec.arguments_bytes, max_compiles=max_compiles,
            ))
    return DryRun(info, reports, suggestions, target)


def _recompile(cfg: Any, build: Builder, target: Target, name: str,
               change: Change) -> ProgramReport | str:
    """Program ``name`` rebuilt with ``change`` and compiled, or why the change is invalid."""
    from codescaler_jax.config import apply_overrides

    try:
        cfg2 = apply_overrides(cfg, list(change.overrides))
        target2 = target if change.slice_name is None else tpu_target(get_slice(change.slice_name))
        _, specs = build(cfg2, target2)
    except ValueError as e:  # ConfigError included: e.g. a batch the new mesh cannot split
        return f"invalid: {e}"
    spec = next(s for s in specs if s.name == name)
    return compile_program(name, spec.lower, target2, model_flops=spec.model_flops,
                           resident_bytes=spec.resident_bytes)


def largest_fitting_value(cfg: Any, build: Builder, target: Target, program: str, key: str,
                          values: list[int]) -> Largest:
    """The largest of ``values`` (ascending) for config ``key`` at which ``program`` fits on
    ``target``, by bisection; each probe rebuilds and compiles that one program.

    E.g. the largest rollout batch of a GRPO step: ``program="rollout_decode_loop"``,
    ``key="rollout.batch_size"``.
    """
    return largest_that_fits(
        key, values,
        lambda v: _recompile(cfg, build, target, program, Change((f"{key}={v}",))))


# ---------------------------------------------------------------------------- CLI
def add_cli_args(p: argparse.ArgumentParser) -> None:
    """``--topology SLICE`` and ``--json PATH`` (with ``--dry-run``, which the caller has)."""
    p.add_argument(
        "--topology", metavar="SLICE", default=None,
        help="with the TPU compiler (pip install -e '.[tpu]'), compile for this TPU slice, "
             "named as gcloud accelerator types (v5p-16, v5litepod-16, v6e-8, v4-8); "
             "implies --dry-run",
    )
    p.add_argument("--json", metavar="PATH", default=None,
                   help="also write the dry-run report as JSON to PATH ('-': JSON on stdout "
                        "instead of the table)")


def prepare_platform(args: argparse.Namespace) -> None:
    """Before JAX starts: a ``--topology`` dry run compiles on the CPU backend only.

    The TPU compiler needs no TPU backend, and on a TPU VM the dry run must not take the chips
    a training job may be using. An explicit ``JAX_PLATFORMS`` wins.
    """
    if getattr(args, "topology", None):
        args.dry_run = True
        os.environ.setdefault("JAX_PLATFORMS", "cpu")


def cli_main(args: argparse.Namespace, cfg: Any, build: Builder, title: str,
             to_dict: Callable[[DryRun], dict] | None = None) -> int:
    """Run the dry run the arguments ask for, print it, return the exit code.

    ``to_dict`` turns the result into the JSON report (default ``DryRun.to_dict``).
    """
    try:
        target = resolve_target(args.topology)
    except (UnknownSliceError, LibtpuMissingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        result = run(cfg, build, target)
    except ValueError as e:  # e.g. the mesh does not divide the slice's chips
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = (to_dict or DryRun.to_dict)(result)
    if args.json == "-":
        print(json.dumps(report, indent=2))
    else:
        print(result.text(title))
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(report, indent=2))
    return 0
