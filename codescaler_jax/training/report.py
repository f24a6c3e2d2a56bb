"""Compile one program and report what it costs per device: the dry-run report.

``compile_program(name, lower, target)`` lowers and compiles a program (for fake CPU devices or
a real TPU slice, see ``training.topology``) and returns a ``ProgramReport``:

- memory per device from the compiler: arguments, temporaries, outputs, aliased (donated
  inputs reused as outputs), and their total (arguments + outputs + temporaries - aliased);
  ``resident`` adds long-lived buffers the program does not take as arguments (e.g. a
  co-located reward model's parameters), so the verdict is about the whole device;
- on a TPU slice: the verdict against the chip's usable HBM, with the headroom; a program the
  compiler refuses (``RESOURCE_EXHAUSTED``) becomes ``does not fit: needs X of Y GiB``, not a
  traceback;
- XLA's cost analysis: FLOPs per device and, on TPU, its estimated seconds
  (``optimal_seconds``);
- analytic model FLOPs (``codescaler_jax.perf``) and the MFU they imply at XLA's estimate
  against the chip's bf16 peak;
- the compile time.

Two cases make XLA's cost figures misleading, and the report says so instead of quoting them as
the step's cost: a Pallas / custom-call kernel (``tpu_custom_call``: splash attention) whose
FLOPs the cost analysis does not see, and a while loop (``lax.scan``/``while_loop``: micro-batch
accumulation, scanned layers, the decode loop), whose body the cost analysis counts once.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable
from typing import Any

import jax

from codescaler_jax.training.topology import TpuSlice

GIB = 2**30

# Custom calls that are kernels with arithmetic XLA cannot see (Pallas TPU / Mosaic, Triton,
# cuDNN attention). Sharding markers and the like are not kernels and carry no FLOPs.
_KERNEL_CALLS = re.compile(r"tpu_custom_call|triton|cudnn|mosaic|__gpu\$", re.IGNORECASE)
_UNITS = {"B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50}


@dataclasses.dataclass(frozen=True)
class Target:
    """Where a dry run compiles: a TPU slice, or the local (fake CPU) devices.

    Attributes:
        devices: the devices the mesh is built over.
        slice: the TPU slice (None for local devices: no HBM verdict, no MFU).
    """

    devices: tuple
    slice: TpuSlice | None = None

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    @property
    def capacity_bytes(self) -> int | None:
        return None if self.slice is None else self.slice.chip.usable_hbm_bytes

    @property
    def peak_flops_per_device(self) -> float | None:
        return None if self.slice is None else self.slice.chip.peak_bf16_flops

    def describe(self) -> str:
        kind = self.devices[0].device_kind
        if self.slice is None:
            return f"{self.num_devices} x {kind} (local devices)"
        s = self.slice
        return f"{s.name}: {s.chips} x {kind}, topology {s.topology}, {s.hosts} host(s)"


def local_target(devices=None) -> Target:
    """The local devices (``jax.devices()`` by default): today's fake-CPU dry run."""
    return Target(tuple(jax.devices() if devices is None else devices))


def tpu_target(s: TpuSlice) -> Target:
    """The devices of TPU slice ``s`` (needs libtpu; see ``topology.slice_devices``)."""
    from codescaler_jax.training.topology import slice_devices

    return Target(tuple(slice_devices(s)), s)


def parse_size(text: str) -> int:
    """Bytes of an XLA human-readable size (``153.12G``, ``512.00M``, ``12B``; powers of 1024)."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([BKMGTP])?(?:i?B)?\s*", text)
    if not m:
        raise ValueError(f"not a size: {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2) or "B"])


def parse_resource_exhausted(message: str) -> tuple[int | None, int | None]:
    """``(needed_bytes, available_bytes)`` from an XLA:TPU out-of-memory message, or Nones.

    Two forms are known (libtpu 0.0.42): "the total memory required for HLO temporaries
    (153.12G) exceeds available HBM (95.74G)" (the figure includes the arguments: measured) and
    "Used 120.50G of 95.74G hbm".
    """
    pats = (
        r"required for HLO temporaries \(([\d.]+[BKMGTP]?)\) exceeds available HBM "
        r"\(([\d.]+[BKMGTP]?)\)",
        r"Used ([\d.]+[BKMGTP]?) of ([\d.]+[BKMGTP]?) hbm",
    )
    for pat in pats:
        m = re.search(pat, message)
        if m:
            return parse_size(m.group(1)), parse_size(m.group(2))
    return None, None


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of a pytree of sharded arrays or ``ShapeDtypeStruct``s."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = tuple(x.shape)
        sharding = getattr(x, "sharding", None)
        if sharding is not None:
            shape = sharding.shard_shape(shape)
        total += math.prod(shape) * x.dtype.itemsize
    return total


def gib(x: float | None, nd: int = 6) -> float | None:
    return None if x is None else round(x / GIB, nd)


@dataclasses.dataclass
class ProgramReport:
    """What one compiled program costs per device (bytes, FLOPs, seconds); see the module doc.

    ``refused`` holds the compiler's out-of-memory message when it would not compile the
    program; then only ``needed_bytes`` (its figure) is known of the memory.
    """

    name: str
    compile_s: float
    num_devices: int
    capacity_bytes: int | None = None
    peak_flops_per_device: float | None = None
    arguments_bytes: int | None = None
    outputs_bytes: int | None = None
    aliased_bytes: int | None = None
    temporaries_bytes: int | None = None
    generated_code_bytes: int | None = None
    resident_bytes: int = 0
    needed_bytes: int | None = None
    refused: str | None = None
    xla_flops: float | None = None
    xla_seconds: float | None = None
    model_flops: float | None = None
    kernel_calls: tuple[str, ...] = ()
    has_loop: bool = False
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def total_bytes(self) -> int | None:
        """Peak bytes per device: the program's own plus the resident buffers."""
        if self.refused is not None:
            return None if self.needed_bytes is None else self.needed_bytes + self.resident_bytes
        if self.arguments_bytes is None:
            return None
        own = (self.arguments_bytes + (self.outputs_bytes or 0) + (self.temporaries_bytes or 0)
               - (self.aliased_bytes or 0))
        return own + self.resident_bytes

    @property
    def fits(self) -> bool | None:
        if self.refused is not None:
            return False
        if self.capacity_bytes is None or self.total_bytes is None:
            return None
        return self.total_bytes <= self.capacity_bytes

    @property
    def headroom_bytes(self) -> int | None:
        if self.capacity_bytes is None or self.total_bytes is None:
            return None
        return self.capacity_bytes - self.total_bytes

    @property
    def headroom_pct(self) -> float | None:
        h = self.headroom_bytes
        return None if h is None else 100.0 * h / self.capacity_bytes

    @property
    def xla_cost_meaningful(self) -> bool:
        """XLA's FLOPs/seconds are the whole program's (no hidden kernels, no loops)."""
        return not self.kernel_calls and not self.has_loop

    @property
    def mfu(self) -> float | None:
        """Analytic model FLOPs / (devices x bf16 peak x XLA's estimated seconds)."""
        if (self.model_flops is None or self.xla_seconds is None or not self.xla_seconds
                or self.peak_flops_per_device is None or not self.xla_cost_meaningful):
            return None
        return self.model_flops / (self.num_devices * self.peak_flops_per_device
                                   * self.xla_seconds)

    def verdict(self) -> str:
        """``fits: ...`` / ``does not fit: needs X of Y GiB`` / ``no HBM verdict ...``."""
        cap, total = self.capacity_bytes, self.total_bytes
        if self.fits is None:
            return "no HBM verdict (local devices)"
        if self.fits:
            return (f"fits: {total / GIB:.2f} of {cap / GIB:.2f} GiB, headroom "
                    f"{self.headroom_bytes / GIB:.2f} GiB ({self.headroom_pct:.1f}%)")
        if total is None or cap is None:  # refused, in words the parser does not know
            return f"does not fit ({self.refused})"
        return f"does not fit: needs {total / GIB:.2f} of {cap / GIB:.2f} GiB"

    def to_dict(self) -> dict[str, Any]:
        """JSON view; the ``*_gib`` / ``xla_flops_per_device`` keys are those of the old report."""
        return {
            "arguments_gib": gib(self.arguments_bytes),
            "outputs_gib": gib(self.outputs_bytes),
            "aliased_gib": gib(self.aliased_bytes),
            "temporaries_gib": gib(self.temporaries_bytes),
            "generated_code_gib": gib(self.generated_code_bytes),
            "resident_gib": gib(self.resident_bytes),
            "total_gib": gib(self.total_bytes),
            "hbm_gib": gib(self.capacity_bytes, 2),
            "fits": self.fits,
            "headroom_gib": gib(self.headroom_bytes),
            "headroom_pct": None if self.headroom_pct is None else round(self.headroom_pct, 1),
            "verdict": self.verdict(),
            "refused": self.refused,
            "xla_flops_per_device": self.xla_flops,
            "xla_seconds": self.xla_seconds,
            "xla_cost_meaningful": self.xla_cost_meaningful,
            "kernel_calls": list(self.kernel_calls),
            "has_loop": self.has_loop,
            "model_flops": self.model_flops,
            "mfu": None if self.mfu is None else round(self.mfu, 4),
            "compile_s": round(self.compile_s, 1),
            "notes": list(self.notes),
        }


def _is_out_of_memory(err: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(err) and (
        "memory" in str(err).lower() or "hbm" in str(err).lower())


def _kernel_calls(stablehlo: str) -> tuple[str, ...]:
    targets = re.findall(r"stablehlo\.custom_call @([\w$.]+)", stablehlo)
    targets += re.findall(r'call_target_name = "([^"]+)"', stablehlo)
    return tuple(sorted({t for t in targets if _KERNEL_CALLS.search(t)}))


def _has_loop(stablehlo: str) -> bool:
    return re.search(r"stablehlo\.while\b", stablehlo) is not None


def compile_program(
    name: str,
    lower: Callable[[], jax.stages.Lowered],
    target: Target,
    *,
    model_flops: float | None = None,
    resident_bytes: int = 0,
) -> ProgramReport:
    """Lower and compile ``lower()``'s program for ``target`` and report it (see module doc).

    Args:
        name: the program's name in the report (``train_step``, ``rollout`` ...).
        lower: returns the ``jax.stages.Lowered`` program (``jit(f).lower(*abstract_args)``).
        target: the devices it is compiled for (their mesh is inside the lowered program).
        model_flops: analytic FLOPs of one call of the program, all devices together.
        resident_bytes: per-device bytes of buffers alive during the program that are not its
            arguments (they count against HBM).

    A compile the compiler refuses for memory is reported (``refused``); other errors raise.
    """
    rep = ProgramReport(
        name, 0.0, target.num_devices, target.capacity_bytes, target.peak_flops_per_device,
        resident_bytes=resident_bytes, model_flops=model_flops,
    )
    t0 = time.perf_counter()
    lowered = lower()
    # Kernels and loops are read from the program as written (StableHLO): XLA:TPU's own
    # rewrites (e.g. its "online-softmax" custom calls for dense attention) are not kernels
    # that hide FLOPs from it.
    text = lowered.as_text()
    rep.kernel_calls = _kernel_calls(text)
    rep.has_loop = _has_loop(text)
    try:
        compiled = lowered.compile()
    except Exception as e:  # XLA raises JaxRuntimeError; only out-of-memory is a result
        if not _is_out_of_memory(e):
            raise
        rep.compile_s = time.perf_counter() - t0
        first = str(e).strip().splitlines()[0]
        rep.refused = first[:400]
        rep.needed_bytes, available = parse_resource_exhausted(str(e))
        if available is not None:
            rep.capacity_bytes = available
        return rep
    rep.compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    if mem is not None:
        rep.arguments_bytes = mem.argument_size_in_bytes
        rep.outputs_bytes = mem.output_size_in_bytes
        rep.aliased_bytes = mem.alias_size_in_bytes
        rep.temporaries_bytes = mem.temp_size_in_bytes
        rep.generated_code_bytes = mem.generated_code_size_in_bytes
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0] if cost else {}
    cost = cost or {}
    rep.xla_flops = cost.get("flops")
    secs = cost.get("optimal_seconds")
    if secs is not None and not (math.isfinite(secs) and secs > 0):
        # Seen on v5e for a program near the HBM limit (-40.9 s): an estimate, not a time.
        rep.notes.append(f"XLA's estimated seconds ({secs:.3g}) are not a time; not used")
        secs = None
    rep.xla_seconds = secs
    if rep.kernel_calls:
        rep.notes.append(
            f"custom-call kernels ({', '.join(rep.kernel_calls)}) hide their FLOPs from XLA's "
            "cost analysis: its FLOPs and seconds leave them out, so no MFU is derived")
    if rep.has_loop:
        rep.notes.append(
            "the program has a while loop (scan / micro-batches / decode loop); XLA's cost "
            "analysis counts a loop body once, so its FLOPs and seconds are not the whole "
            "program's and no MFU is derived")
    return rep


# ---------------------------------------------------------------------------- text output
def _fmt_gib(b: int | None) -> str:
    if b is None:
        return "-"
    x = b / GIB
    return f"{x:.2f}" if abs(x) >= 1 or x == 0 else f"{x:.2g}"


def _fmt_sci(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


def format_table(programs: list[ProgramReport], title: str = "") -> str:
    """A fixed-width table of the programs (memory in GiB per device), then their notes."""
    head = ("program", "args", "temps", "out-alias", "resident", "total", "HBM", "verdict",
            "XLA FLOPs/dev", "XLA est. s", "model FLOPs", "MFU", "compile s")
    rows = []
    for p in programs:
        out_alias = (None if p.outputs_bytes is None
                     else p.outputs_bytes - (p.aliased_bytes or 0))
        if p.fits is True:
            verdict = f"fits ({p.headroom_pct:.0f}% free)"
        elif p.fits is False:
            verdict = "DOES NOT FIT"
        else:
            verdict = "-"
        flops = _fmt_sci(p.xla_flops) + ("" if p.xla_cost_meaningful or p.xla_flops is None
                                         else "*")
        secs = "-" if p.xla_seconds is None else f"{p.xla_seconds:.3g}" + (
            "" if p.xla_cost_meaningful else "*")
        rows.append((
            p.name, _fmt_gib(p.arguments_bytes), _fmt_gib(p.temporaries_bytes),
            _fmt_gib(out_alias), _fmt_gib(p.resident_bytes), _fmt_gib(p.total_bytes),
            _fmt_gib(p.capacity_bytes), verdict, flops, secs, _fmt_sci(p.model_flops),
            "-" if p.mfu is None else f"{100 * p.mfu:.1f}%", f"{p.compile_s:.1f}",
        ))
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True))  # noqa: E731
    out = [title] if title else []
    out += [line(head), line(tuple("-" * w for w in widths)), *map(line, rows)]
    out.append("memory in GiB per device; * = XLA's figure is not the whole program's (see notes)")
    for p in programs:
        out.append(f"{p.name}: {p.verdict()}")
        out += [f"  note: {n}" for n in p.notes]
    return "\n".join(out)
