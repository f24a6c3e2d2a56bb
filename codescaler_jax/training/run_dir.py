"""Run directories of ``train_rm`` and ``train_grpo``: refusal, overwrite, resume, TensorBoard.

A run directory holds what one run writes: ``config.yaml``, ``data/``, ``tb/``, ``checkpoints/``,
``hf/``, ``summary.json`` and ``log.p<process>.txt``. Pointing a new run at a directory that
holds any of them would mix two runs (cached pairs of one, checkpoints of the other), so:

- a used directory is refused unless ``--resume`` (continue the run there) or ``--overwrite``
  (delete the previous run's files first; files the run did not write are left alone);
- ``--resume`` refuses a config that differs from the run's ``config.yaml`` in anything but the
  keys its `ResumePolicy` allows, and names the keys that differ. The allowed keys are
  the step budget (``train.max_steps`` and ``train.num_epochs`` for ``train_rm``,
  ``train.steps`` for ``train_grpo``; raising it continues the run, the learning-rate schedule
  is rebuilt for the new total) and bookkeeping that cannot change what is trained: how often
  to evaluate, save and log, how many checkpoints to keep, the HF export, the eval batch size,
  sandbox worker counts, the mesh and the multi-host launch (a checkpoint restores onto another
  mesh), and ``run_dir`` itself;
- on resume at step ``s``, TensorBoard events past ``s`` (written after the last checkpoint by
  the run that stopped) are removed from the event files, so that every step has one point.

``prepare_run_dir`` does the first two (``claim_run_dir``: the same for every process of a
multi-host run); ``resume_tensorboard`` / ``purge_events_after`` the last. The trainers also
flush TensorBoard before each checkpoint, so no step up to a checkpoint is lost to a kill.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from codescaler_jax.config import ConfigError, load_config, to_dict
from codescaler_jax.errors import InputError

log = logging.getLogger("codescaler_jax")

# What a run writes into its directory (and --overwrite deletes).
RUN_FILES = ("config.yaml", "summary.json")
RUN_DIRS = ("data", "tb", "checkpoints", "hf")
RUN_GLOBS = ("log.p*.txt",)


@dataclasses.dataclass(frozen=True)
class ResumePolicy:
    """The keys a resumed run of one command may change: its step ``budget`` and
    ``bookkeeping`` keys (exact dotted keys, or ``section.*``)."""

    command: str
    budget: tuple[str, ...]
    bookkeeping: tuple[str, ...]

    @property
    def allowed(self) -> tuple[str, ...]:
        return self.budget + self.bookkeeping


# Keys every command may change on --resume (where and how often it writes, not what it trains).
COMMON_BOOKKEEPING = ("run_dir", "mesh.*", "distributed.*", "train.save_every",
                      "train.keep_checkpoints", "train.log_every", "train.export_hf")
RM_RESUME = ResumePolicy(
    "train_rm",
    budget=("train.max_steps", "train.num_epochs"),
    bookkeeping=(*COMMON_BOOKKEEPING, "train.eval_every", "train.eval_batch_size",
                 "data.sandbox_workers"),
)
GRPO_RESUME = ResumePolicy(
    "train_grpo",
    budget=("train.steps",),
    bookkeeping=(*COMMON_BOOKKEEPING, "train.samples_every", "train.num_text_samples",
                 "reward.sandbox_workers"),
)
# SFT runs are short; a used directory is refused (or --overwrite), never resumed.
SFT_RESUME = ResumePolicy("train_sft", budget=("train.steps",),
                          bookkeeping=(*COMMON_BOOKKEEPING, "data.sandbox_workers"))


def run_artifacts(run_dir: Path) -> list[Path]:
    """The files and folders of a previous run in ``run_dir`` (empty for a fresh directory)."""
    if not run_dir.is_dir():
        return []
    found = [run_dir / n for n in (*RUN_FILES, *RUN_DIRS) if (run_dir / n).exists()]
    for pattern in RUN_GLOBS:
        found.extend(sorted(run_dir.glob(pattern)))
    return found


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists stay values)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _allowed(key: str, allowed: Iterable[str]) -> bool:
    return any(key == a or (a.endswith(".*") and key.startswith(a[:-1])) for a in allowed)


def config_differences(old: Any, new: Any, allowed: Iterable[str] = ()) -> list[str]:
    """``["key: old -> new", ...]`` for every dotted key whose value differs, except ``allowed``
    ones (exact keys or ``section.*``)."""
    a, b = flatten(to_dict(old)), flatten(to_dict(new))
    out = []
    for key in sorted(set(a) | set(b)):
        if _allowed(key, allowed):
            continue
        if a.get(key) != b.get(key):
            out.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return out


@dataclasses.dataclass
class RunDirDecision:
    """What `prepare_run_dir` found: ``resuming`` (a used directory continued with --resume),
    ``removed`` (what --overwrite deleted)."""

    resuming: bool
    removed: list[str]


def prepare_run_dir(
    run_dir: str | Path,
    cfg: Any,
    *,
    resume: bool,
    overwrite: bool,
    policy: ResumePolicy,
    delete: bool = True,
) -> RunDirDecision:
    """Refuse, clean or accept ``run_dir`` for a run of ``cfg`` (see the module docstring).

    Raises `InputError` for a used directory without ``resume``/``overwrite``, for both flags
    together, and, with ``resume``, for a config whose keys outside ``policy.allowed`` differ
    from the directory's ``config.yaml`` (the message lists them). ``delete=False`` checks only
    (the other processes of a multi-host run, which leave the deleting to process 0).
    """
    run_dir = Path(run_dir)
    if resume and overwrite:
        raise InputError("--resume and --overwrite exclude each other")
    found = run_artifacts(run_dir)
    if not found:
        return RunDirDecision(resuming=False, removed=[])
    names = ", ".join(sorted(p.name for p in found))
    if overwrite:
        removed = [p.name for p in found]
        if delete:
            for p in found:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        return RunDirDecision(resuming=False, removed=removed)
    if not resume:
        raise InputError(
            f"run directory {run_dir} already holds a run ({names}); pass --resume to continue "
            f"it, --overwrite to delete it and start again, or set run_dir to a new directory"
        )
    saved = run_dir / "config.yaml"
    if saved.is_file():
        try:
            old = load_config(type(cfg), saved)
        except ConfigError as e:
            raise InputError(f"--resume: cannot read the run's config: {e}") from None
        diff = config_differences(old, cfg, policy.allowed)
        if diff:
            raise InputError(
                f"--resume: the config differs from the run's {saved} in {len(diff)} key(s): "
                f"{'; '.join(diff)}. A resumed {policy.command} run may change only its step "
                f"budget ({', '.join(policy.budget)}) and bookkeeping keys "
                f"({', '.join(policy.bookkeeping)}); set run_dir to a new directory, or pass "
                f"--overwrite to start this one again"
            )
    return RunDirDecision(resuming=True, removed=[])


def claim_run_dir(
    run_dir: str | Path, cfg: Any, *, resume: bool, overwrite: bool, policy: ResumePolicy
) -> RunDirDecision:
    """`prepare_run_dir` for every process of a (multi-host) run: all check, process 0
    deletes what ``overwrite`` removes, all wait for it; ``run_dir`` exists afterwards."""
    import jax

    decision = prepare_run_dir(
        run_dir, cfg, resume=resume, overwrite=overwrite, policy=policy,
        delete=jax.process_index() == 0,
    )
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"codescaler_jax.{policy.command}.run_dir")
    if decision.removed:
        log.info("--overwrite: removed %s from %s", ", ".join(decision.removed), run_dir)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return decision


# ---------------------------------------------------------------------------- TensorBoard


def _records(data: bytes) -> Iterator[tuple[int, int]]:
    """``(start, end)`` byte ranges of the complete TFRecords in ``data`` (a torn last record,
    cut by a kill, is left out)."""
    pos = 0
    while pos + 12 <= len(data):
        (length,) = struct.unpack_from("<Q", data, pos)
        end = pos + 12 + length + 4
        if end > len(data):
            return
        yield pos, end
        pos = end


def purge_events_after(tb_dir: str | Path, step: int) -> int:
    """Remove every event with ``step > step`` from the TensorBoard files in ``tb_dir``, in
    place; returns how many were removed.

    A run killed after its checkpoint at ``step`` has already written some later steps; the
    resumed run writes them again. Records are copied byte for byte (their checksums stay
    valid); a torn last record is dropped too.
    """
    from tensorboard.compat.proto.event_pb2 import Event

    removed = 0
    for path in sorted(Path(tb_dir).glob("events.out.tfevents.*")):
        data = path.read_bytes()
        kept, dropped = [], 0
        for start, end in _records(data):
            event = Event.FromString(data[start + 12 : end - 4])
            if event.step > step and not event.HasField("file_version"):
                dropped += 1
            else:
                kept.append(data[start:end])
        torn = sum(e - s for s, e in _records(data)) != len(data)
        if dropped or torn:
            tmp = path.with_name(path.name + ".purge")
            tmp.write_bytes(b"".join(kept))
            tmp.replace(path)
            removed += dropped
    return removed


def resume_tensorboard(tb_dir: str | Path, step: int) -> None:
    """Before a resumed run at ``step`` opens its writer: drop the events past ``step`` that the
    stopped run wrote after its last checkpoint (process 0 only: the only TensorBoard writer)."""
    import jax

    if jax.process_index() != 0 or not Path(tb_dir).is_dir():
        return
    n = purge_events_after(tb_dir, step)
    if n:
        log.info("resume at step %d: removed %d TensorBoard events of later steps", step, n)
