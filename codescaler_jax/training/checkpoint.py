"""Orbax checkpoints of a run directory, for both trainers.

``RunCheckpoints`` wraps an ``ocp.CheckpointManager`` over ``run_dir/checkpoints`` holding two
items per step: ``state`` (the train-state pytree) and ``meta`` (JSON: data-iterator state,
history, ...). Use it as a context manager: on every path out (a crash, Ctrl-C, an early
return) the saves in flight are finished and the manager is closed, so nothing written is lost
and no background thread outlives the run. ``restore_params`` reads only the parameters of a
checkpoint, for inference (``rm.scorer``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from codescaler_jax.models.qwen3 import tree_scan_layers


def _abstract(tree: Any, shardings: Any) -> Any:
    """Shape structs of ``tree`` (arrays or shape structs) with ``shardings``."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


class RunCheckpoints:
    """The checkpoints of one run: ``with RunCheckpoints(run_dir, keep=2) as ckpt: ...``."""

    def __init__(self, run_dir: str | os.PathLike, *, keep: int | None = None,
                 create: bool = True):
        """``keep``: how many checkpoints to keep (None: all); ``create``: make the folder."""
        self.directory = (Path(run_dir) / "checkpoints").absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=create),
        )

    def __enter__(self) -> RunCheckpoints:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Finish the saves in flight and close the manager (idempotent)."""
        if self.manager is not None:
            try:
                self.manager.wait_until_finished()
            finally:
                self.manager.close()
                self.manager = None

    def latest_step(self) -> int | None:
        """The newest saved step, or None."""
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Save ``state`` (a pytree of arrays) and ``meta`` (JSON) as ``step`` (async)."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

    def restore(self, step: int, like: Any, shardings: Any) -> tuple[Any, dict[str, Any]]:
        """``(state, meta)`` of ``step``, the state restored with the structure of ``like``
        (arrays or shape structs) placed with ``shardings``."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(like, shardings)),
            meta=ocp.args.JsonRestore()))
        return restored["state"], restored["meta"]

    def restore_latest(self, like: Any, shardings: Any) -> tuple[int, Any, dict[str, Any]] | None:
        """``(step, state, meta)`` of the newest checkpoint, or None when there is none."""
        step = self.latest_step()
        if step is None:
            return None
        state, meta = self.restore(step, like, shardings)
        return int(step), state, meta


def latest_step(run_dir: str | os.PathLike) -> int | None:
    """The newest checkpoint step of ``run_dir`` (None when it holds none)."""
    with RunCheckpoints(run_dir, create=False) as ckpt:
        return ckpt.latest_step()


def restore_state(run_dir: str | os.PathLike, step: int, target: Any) -> Any:
    """The ``state`` item of checkpoint ``step`` of ``run_dir`` in the structure and
    shardings of ``target`` (a pytree of sharded shape structs); ``meta`` is not read."""
    with RunCheckpoints(run_dir, create=False) as ckpt:
        return ckpt.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]


def checkpoint_scan_layers(directory: str | os.PathLike, step: int) -> bool | None:
    """The layer layout of the Orbax checkpoint ``directory/<step>`` (its ``state`` item),
    read from the metadata without loading arrays: True scanned (stacked), False unrolled,
    None if it holds no layers."""
    path = epath.Path(os.fspath(directory)) / str(step) / "state"
    meta = ocp.StandardCheckpointHandler().metadata(path)
    return tree_scan_layers(getattr(meta, "tree", meta))


def check_resume_layout(directory: str | os.PathLike, step: int, scan_layers: bool,
                        key: str) -> None:
    """Refuse to resume a checkpoint in the other layer layout, naming the config ``key``
    that must change (Orbax restores a tree of the same structure only)."""
    saved = checkpoint_scan_layers(directory, step)
    if saved is not None and saved != scan_layers:
        layout = "scanned (stacked)" if saved else "unrolled"
        raise ValueError(
            f"checkpoint step {step} in {directory} has {layout} layers but {key}="
            f"{str(scan_layers).lower()}; resume with --set {key}={str(saved).lower()}"
        )
