"""TPU slices by their gcloud names, and their devices for ahead-of-time compilation.

A slice name is spelled as gcloud spells accelerator types: ``v4-8``, ``v5p-16``,
``v5litepod-16``, ``v6e-8``. v4 and v5p names count TensorCores, two per chip (``v5p-16`` is 8
chips, topology ``v5p:2x2x2``); v5e (``v5litepod-N``) and v6e names count chips.

``slice_devices(get_slice("v5p-16"))`` returns the 8 devices of that slice as the TPU compiler
(``libtpu``, the ``tpu`` extra) describes them. No TPU is needed: a mesh over these devices
lowers and compiles (``jit(f).lower(...).compile()``) with XLA:TPU on a CPU-only machine, and
the compiled program's ``memory_analysis()`` / ``cost_analysis()`` are the compiler's own
per-chip figures. Nothing can run on them.
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import importlib.util
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

TPU_EXTRA_HINT = "pip install -e '.[tpu]'"


class UnknownSliceError(ValueError):
    """A slice name that is not in the table (the message lists the known ones)."""


class LibtpuMissingError(RuntimeError):
    """``--topology`` needs the TPU compiler, which comes with the ``tpu`` extra."""


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation's chip.

    Attributes:
        generation: ``v4``, ``v5e``, ``v5p`` or ``v6e``; also the topology-string prefix.
        gcloud_prefix: how accelerator-type names start (``v5litepod`` for v5e).
        hbm_gib: published HBM per chip.
        usable_hbm_gib: HBM per chip that XLA:TPU lets one program use (GiB), the figure a
            fits / does-not-fit verdict is judged against.
        peak_bf16_flops: published bf16 peak per chip, FLOP/s (the MFU denominator).
        cores_per_chip_in_name: 2 where the name counts TensorCores (v4, v5p), else 1.
        chip_config_name: libtpu's chip configuration; ``megacore`` makes a v4 chip's two
            TensorCores one device, as on a real v4 VM (v5p is megacore by default).
    """

    generation: str
    gcloud_prefix: str
    hbm_gib: float
    usable_hbm_gib: float
    peak_bf16_flops: float
    cores_per_chip_in_name: int
    chip_config_name: str = "default"

    @property
    def usable_hbm_bytes(self) -> int:
        return int(self.usable_hbm_gib * 2**30)


# Peak bf16 FLOP/s per chip and HBM per chip, from Google Cloud's TPU pages (read 2026-12-01):
#   v4  https://cloud.google.com/tpu/docs/v4   275 TFLOP/s, 32 GiB HBM2
#   v5e https://cloud.google.com/tpu/docs/v5e  197 TFLOP/s, 16 GB HBM2
#   v5p https://cloud.google.com/tpu/docs/v5p  459 TFLOP/s, 95 GB HBM2e
#   v6e https://cloud.google.com/tpu/docs/v6e  918 TFLOP/s, 32 GB
# usable_hbm_gib is what XLA:TPU (libtpu 0.0.42) reports as "available HBM" in its
# RESOURCE_EXHAUSTED message for a program that is too large (measured here by compiling one
# per generation; tests/test_topology.py checks v5p's).
CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", "v4", 32.0, 30.75, 275e12, 2, "megacore"),
    "v5e": Chip("v5e", "v5litepod", 16.0, 15.75, 197e12, 1),
    "v5p": Chip("v5p", "v5p", 95.0, 95.74, 459e12, 2),
    "v6e": Chip("v6e", "v6e", 32.0, 31.25, 918e12, 1),
}


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    """One slice: its gcloud name, chip, topology string and host layout.

    Attributes:
        name: gcloud accelerator type, e.g. ``v5p-16``.
        chip: the generation's chip (HBM, peak).
        topology: libtpu topology string, e.g. ``v5p:2x2x2``.
        chips: number of chips (= JAX devices).
        chips_per_host_bounds: chips per host along (x, y, z).
    """

    name: str
    chip: Chip
    topology: str
    chips: int
    chips_per_host_bounds: tuple[int, int, int]

    @property
    def hosts(self) -> int:
        return self.chips // math.prod(self.chips_per_host_bounds)


# Slice shapes (chips along each axis). v4/v5p: 3D tori with 4 chips per host. v5e/v6e: 2D
# tori; one host holds up to 8 chips (2x4), multi-host slices have 4 chips per host.
_SHAPES_3D = (
    (2, 2, 1), (2, 2, 2), (2, 2, 4), (2, 4, 4), (4, 4, 4), (4, 4, 8), (4, 8, 8),
    (8, 8, 8), (8, 8, 16), (8, 16, 16), (16, 16, 16),
)
_SHAPES_2D = ((1, 1), (2, 2), (2, 4), (4, 4), (4, 8), (8, 8), (8, 16), (16, 16))


def _build_table() -> dict[str, TpuSlice]:
    table: dict[str, TpuSlice] = {}
    for gen in ("v4", "v5p"):
        chip = CHIPS[gen]
        shapes = _SHAPES_3D + (((16, 16, 24),) if gen == "v5p" else ())
        for shape in shapes:
            chips = math.prod(shape)
            name = f"{chip.gcloud_prefix}-{chips * chip.cores_per_chip_in_name}"
            topo = f"{gen}:{'x'.join(map(str, shape))}"
            table[name] = TpuSlice(name, chip, topo, chips, (2, 2, 1))
    for gen in ("v5e", "v6e"):
        chip = CHIPS[gen]
        for shape in _SHAPES_2D:
            chips = math.prod(shape)
            bounds = (shape[0], shape[1], 1) if chips <= 8 else (2, 2, 1)
            name = f"{chip.gcloud_prefix}-{chips}"
            topo = f"{gen}:{'x'.join(map(str, shape))}"
            table[name] = TpuSlice(name, chip, topo, chips, bounds)
    return table


SLICES: dict[str, TpuSlice] = _build_table()


def known_slices() -> list[str]:
    """Every slice name in the table, by generation then size."""
    return list(SLICES)


def _suggestions(name: str) -> list[str]:
    """Close matches of a mistyped name: same generation, nearest sizes; else by spelling."""
    m = re.fullmatch(r"([a-z0-9]+)-(\d+)", name)
    aliases = {"v5e": "v5litepod", "v5lite": "v5litepod", "v6": "v6e", "v5": "v5p"}
    if m:
        prefix, count = aliases.get(m.group(1), m.group(1)), int(m.group(2))
        same = [s for s in SLICES.values() if s.chip.gcloud_prefix == prefix]
        if same:
            sizes = sorted(same, key=lambda s: abs(math.log(
                max(count, 1) / (s.chips * s.chip.cores_per_chip_in_name))))
            return [s.name for s in sizes[:2]]
    return difflib.get_close_matches(name, list(SLICES), n=3, cutoff=0.5)


def get_slice(name: str) -> TpuSlice:
    """The slice called ``name`` (gcloud spelling, e.g. ``v5p-16``).

    Raises:
        UnknownSliceError: the name is not in the table; the message suggests close matches
            and lists every known name.
    """
    key = name.strip().lower()
    if key in SLICES:
        return SLICES[key]
    close = _suggestions(key)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    by_gen: dict[str, list[str]] = {}
    for s in SLICES.values():
        by_gen.setdefault(s.chip.generation, []).append(s.name)
    listing = "; ".join(" ".join(v) for v in by_gen.values())
    raise UnknownSliceError(
        f"unknown TPU slice {name!r}.{hint} Slice names are gcloud accelerator types "
        f"(v4/v5p count TensorCores, two per chip; v5litepod/v6e count chips). Known: {listing}"
    )


def bigger_slices(s: TpuSlice) -> list[TpuSlice]:
    """Slices of the same generation with more chips than ``s``, smallest first."""
    return sorted(
        (t for t in SLICES.values() if t.chip is s.chip and t.chips > s.chips),
        key=lambda t: t.chips,
    )


def libtpu_available() -> bool:
    """Whether the TPU compiler (the ``libtpu`` wheel of the ``tpu`` extra) is installed."""
    return importlib.util.find_spec("libtpu") is not None


def tpu_chips_attached() -> bool:
    """Whether this machine has TPU chips on its PCI bus (Google's vendor id), as jax checks."""
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            if Path(vendor).read_text().strip() == "0x1ae0":
                return True
        except OSError:
            continue
    return False


def slice_devices(s: TpuSlice, num_slices: int = 1) -> Sequence:
    """The devices of slice ``s`` as the TPU compiler describes them (for AOT compiles only).

    Raises:
        LibtpuMissingError: libtpu is not installed.
    """
    if not libtpu_available():
        raise LibtpuMissingError(
            f"compiling for a TPU slice needs the TPU compiler (libtpu): {TPU_EXTRA_HINT}"
        )
    if not tpu_chips_attached():
        # Without chips nothing is guarded by libtpu's one-process lock (/tmp/libtpu_lockfile),
        # and several compiles on one machine (tests, other shells) must not refuse each other.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    desc = topologies.get_topology_desc(
        platform="tpu",
        topology_name=s.topology,
        chip_config_name=s.chip.chip_config_name,
        chips_per_host_bounds=s.chips_per_host_bounds,
        num_slices=num_slices,
    )
    return list(desc.devices)
