"""The pieces of a training run both trainers share, so each ``run()`` is a short loop.

- ``start_run``: the config written to the run directory, the mesh logged.
- ``resume``: the latest checkpoint restored into a fresh train state (layout checked first).
- ``open_writer``: the TensorBoard writer, events past a resumed step dropped first.
- ``progress``: the progress bar (process 0 only).
- ``due``: whether a cadence (``log_every``, ``save_every`` ...) falls on a step.
- ``nothing_to_train``: the warning of a resume that already reached its step budget.
- ``export_hf``: the trained model written as a Hugging Face directory.
- ``write_summary``: ``summary.json`` (process 0).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from codescaler_jax.config import save_config
from codescaler_jax.logging_utils import Writer
from codescaler_jax.training.checkpoint import RunCheckpoints, check_resume_layout
from codescaler_jax.training.run_dir import resume_tensorboard

log = logging.getLogger("codescaler_jax")


def start_run(cfg: Any, run_dir: Path, mesh: Mesh) -> Mesh:
    """Write ``config.yaml`` (process 0) and log the mesh; returns ``mesh``."""
    if jax.process_index() == 0:
        save_config(cfg, run_dir / "config.yaml")
    log.info("mesh %s over %d devices (%s)", dict(mesh.shape), mesh.size, jax.default_backend())
    return mesh


def resume(
    ckpt: RunCheckpoints, state: dict, shardings: dict, *, enabled: bool, scan_layers: bool,
    layout_key: str,
) -> tuple[int, dict, dict[str, Any] | None]:
    """``(start_step, state, meta)``: the latest checkpoint when ``enabled`` and there is one
    (refused, naming ``layout_key``, when its layer layout differs from ``scan_layers``),
    else ``(0, state, None)``."""
    step = ckpt.latest_step() if enabled else None
    if step is None:
        if enabled:
            log.info("--resume: no checkpoint in %s, starting from scratch", ckpt.directory.parent)
        return 0, state, None
    check_resume_layout(ckpt.directory, step, scan_layers, layout_key)
    state, meta = ckpt.restore(step, state, shardings)
    log.info("resumed from step %d", step)
    return int(step), state, meta


def open_writer(run_dir: Path, *, resumed: bool, start_step: int) -> Writer:
    """The run's TensorBoard writer; on resume the events past ``start_step`` go first."""
    if resumed:
        resume_tensorboard(run_dir / "tb", start_step)
    return Writer(run_dir / "tb")


def progress(total: int, initial: int, desc: str, enabled: bool) -> tqdm:
    """A step progress bar, shown on process 0 only."""
    return tqdm(total=total, initial=initial, desc=desc, unit="step",
                disable=not enabled or jax.process_index() != 0)


def due(every: int, done: int, total: int | None = None) -> bool:
    """Whether a cadence of ``every`` steps (0: never) falls on step ``done`` (before
    ``total``, when given: the end of the run has its own handling)."""
    return bool(every) and done % every == 0 and (total is None or done < total)


def nothing_to_train(run_dir: Path, step: int, budget: int, budget_key: str) -> None:
    """Warn that a resumed run is already at its step budget (nothing is changed)."""
    log.warning(
        "nothing to train: the checkpoint in %s is at step %d and the step budget is %d "
        "(%s); raise it to continue. hf/, summary.json and tb/ are left as they were",
        run_dir / "checkpoints", step, budget, budget_key,
    )


def export_hf(run_dir: Path, graphdef: Any, params: Any, rest: Any, tokenizer_dir: Any) -> None:
    """Write the model as a Hugging Face directory ``run_dir/hf`` (with the tokenizer files)."""
    from codescaler_jax.models.hf_io import save_hf_model

    save_hf_model(nnx.merge(graphdef, params, rest), run_dir / "hf", tokenizer_dir=tokenizer_dir)


def write_summary(run_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """Write ``summary.json`` (process 0); returns ``summary``."""
    if jax.process_index() == 0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
