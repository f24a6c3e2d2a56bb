"""When a program does not fit: find the smallest change that does, and compile it to show it.

Changes are tried in order of what they cost the run:

1. more micro-batches (gradient accumulation, or fewer rows per decode loop / RM batch):
   the same math, a little less throughput;
2. a stronger remat policy: recompute activations in the backward pass (about a third more
   FLOPs);
3. a bigger slice of the same TPU generation: more chips to rent.

Within one kind, values are tried from the smallest that *could* fit upward. The lower bound
comes from the refused (or too large) program: its arguments do not shrink with micro-batches,
its temporaries shrink at most in proportion to the rows per micro-batch, and on a bigger slice
everything shrinks at most in proportion to the chip count (FSDP and batch both split). Every
value tried is compiled; the first that fits is the suggestion, and its report is shown next
to the original's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from codescaler_jax.training.report import GIB, ProgramReport


@dataclasses.dataclass(frozen=True)
class Change:
    """A change to a run: config overrides (``key=value``) and/or another slice."""

    overrides: tuple[str, ...] = ()
    slice_name: str | None = None

    def describe(self) -> str:
        parts = [f"--set {o}" for o in self.overrides]
        if self.slice_name:
            parts.append(f"--topology {self.slice_name}")
        return " ".join(parts) or "(no change)"


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One value of a knob and how it can at best shrink the program.

    ``temps_scale``: the least factor on temporaries (micro-batches: old / new count; remat:
    0, it cannot drop the arguments); ``all_scale``: the least factor on everything (a bigger
    slice); neither: no prediction, always compiled.
    """

    change: Change
    temps_scale: float | None = None
    all_scale: float | None = None

    def lower_bound(self, needed: int, arguments: int, resident: int) -> float | None:
        """The least total bytes this candidate can give (``needed`` includes ``resident``)."""
        if self.temps_scale is not None:
            own = needed - resident
            return resident + arguments + max(own - arguments, 0) * self.temps_scale
        if self.all_scale is not None:
            return needed * self.all_scale
        return None


@dataclasses.dataclass(frozen=True)
class Knob:
    """One kind of change with its candidate values, cheapest first."""

    kind: str
    candidates: tuple[Candidate, ...]


@dataclasses.dataclass
class Suggestion:
    """The result of a search for ``program``: the change that fits (or None) and what was tried."""

    program: str
    change: Change | None
    report: ProgramReport | None
    tried: list[tuple[Change, ProgramReport]] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)

    def describe(self) -> str:
        lines = []
        if self.change is None:
            lines.append(f"{self.program}: no change tried fits")
        else:
            lines.append(f"{self.program}: smallest change that fits: {self.change.describe()}"
                         f" -> compiled: {self.report.verdict()}")
        for ch, rep in self.tried:
            if ch != self.change:
                lines.append(f"  tried {ch.describe()}: {rep.verdict()}")
        lines += [f"  {s}" for s in self.skipped]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "program": self.program,
            "change": None if self.change is None else {
                "overrides": list(self.change.overrides), "slice": self.change.slice_name,
                "command_line": self.change.describe()},
            "report": None if self.report is None else self.report.to_dict(),
            "tried": [{"change": c.describe(), "verdict": r.verdict(), "fits": r.fits}
                      for c, r in self.tried],
            "skipped": list(self.skipped),
        }


def suggest(
    failing: ProgramReport,
    knobs: Sequence[Knob],
    recompile: Callable[[Change], ProgramReport | str],
    *,
    arguments_estimate: int | None = None,
    max_compiles: int = 6,
) -> Suggestion:
    """Search ``knobs`` in order for the smallest change that makes ``failing`` fit.

    Args:
        failing: the report of the program that does not fit.
        knobs: kinds of change, cheapest first, each with candidates smallest first.
        recompile: compiles the same program with a change and reports it, or says why the
            change is invalid (e.g. a batch the bigger slice cannot split).
        arguments_estimate: per-device argument bytes when the compiler refused the program
            (then it reports only the total); 0 is a safe (looser) bound.
        max_compiles: give up after this many compiles.
    """
    needed = failing.total_bytes
    cap = failing.capacity_bytes
    args = failing.arguments_bytes if failing.arguments_bytes is not None else (
        arguments_estimate or 0)
    out = Suggestion(failing.name, None, None)
    compiles = 0
    for knob in knobs:
        for cand in knob.candidates:
            bound = (None if needed is None or cap is None
                     else cand.lower_bound(needed, args, failing.resident_bytes))
            if bound is not None and bound > cap:
                continue  # cannot fit even in the best case: not worth a compile
            if compiles >= max_compiles:
                out.skipped.append(f"stopped after {max_compiles} compiles")
                return out
            rep = recompile(cand.change)
            if isinstance(rep, str):
                out.skipped.append(f"{cand.change.describe()}: {rep}")
                continue
            compiles += 1
            out.tried.append((cand.change, rep))
            if rep.fits:
                out.change, out.report = cand.change, rep
                return out
    if not out.tried:
        lim = "-" if cap is None else f"{cap / GIB:.2f} GiB"
        out.skipped.append(f"no candidate of {[k.kind for k in knobs]} can bring it under {lim}")
    return out


def divisor_steps(current: int, rows: int, ways: int, limit: int = 1 << 20) -> list[int]:
    """Values ``k > current`` (doubling-friendly: every divisor) that split ``rows`` into ``k``
    micro-batches whose row count still divides over ``ways`` devices, smallest first."""
    return [k for k in range(current + 1, min(rows, limit) + 1)
            if rows % k == 0 and (rows // k) % ways == 0]


@dataclasses.dataclass
class Largest:
    """The result of ``largest_that_fits``: the largest value that fits (or None) and its report,
    with every value compiled on the way."""

    key: str
    value: int | None
    report: ProgramReport | None
    tried: list[tuple[int, ProgramReport | str]] = dataclasses.field(default_factory=list)

    def describe(self) -> str:
        head = (f"{self.key}: no value tried fits" if self.value is None else
                f"{self.key}: largest that fits: {self.value} -> {self.report.verdict()}")
        lines = [head]
        for v, rep in self.tried:
            if v != self.value:
                lines.append(f"  tried {self.key}={v}: "
                             f"{rep if isinstance(rep, str) else rep.verdict()}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "key": self.key, "value": self.value,
            "report": None if self.report is None else self.report.to_dict(),
            "tried": [{"value": v, "verdict": r if isinstance(r, str) else r.verdict(),
                       "fits": None if isinstance(r, str) else r.fits}
                      for v, r in self.tried],
        }


def largest_that_fits(key: str, values: Sequence[int],
                      compile_value: Callable[[int], ProgramReport | str]) -> Largest:
    """Bisect ``values`` (ascending; memory grows with the value) for the largest that fits.

    Every probe is a real compile (``compile_value(v)``: the program's report with ``key=v``,
    or why the value is invalid, which counts as not fitting). Memory is assumed monotone in the
    value, as it is for rows per batch; ``log2(len(values)) + 1`` compiles at most.
    """
    out = Largest(key, None, None)
    lo, hi = 0, len(values) - 1  # the answer's index lies in [lo - 1, hi]
    while lo <= hi:
        mid = (lo + hi) // 2
        v = values[mid]
        rep = compile_value(v)
        out.tried.append((v, rep))
        if not isinstance(rep, str) and rep.fits:
            out.value, out.report = v, rep
            lo = mid + 1
        else:
            hi = mid - 1
    return out
