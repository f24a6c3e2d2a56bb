"""Load a reward model and score (problem, code) pairs with it: batched, bucketed, on a mesh.

``load_rm`` is the one reward-model loader (a Hugging Face RM directory, or a ``train_rm`` run
directory: its ``hf/`` export, else its Orbax checkpoint via ``load_run_checkpoint``), and
``RewardScorer`` the one place that turns text into RM scores; ``score``, the GRPO
``codescaler`` reward, best-of-N, the RM benchmark and the HTTP server all use them, and none
imports a trainer. Inputs are rendered with the RM tokenizer's chat template (user = problem,
assistant = code), right-truncated at ``max_length``, sorted by length, cut into batches of
``batch_size`` rows (the scorer's default, or given per call), each padded to a length bucket
and to a full batch, so only a few shapes are ever compiled.

Multi-host (``jax.distributed``): every process calls ``score`` with its own rows (any number,
none included) and gets their scores. Each forward pass's global batch takes ``batch_size /
process_count`` rows of every process; the processes agree on the number of passes and each
pass's padded length first, and each fetches only its own rows' scores.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from codescaler_jax.data.pipeline import make_buckets
from codescaler_jax.data.tokenizer import (
    bucket_length,
    encode_rm_inputs,
    load_tokenizer,
    pad_right,
)
from codescaler_jax.distributed import global_max, local_rows, rows_to_global
from codescaler_jax.errors import InputError
from codescaler_jax.models.qwen3 import Qwen3Config, Qwen3RewardModel
from codescaler_jax.models.sharding import batch_sharding, make_mesh


def resolve_rm_path(path: str | Path) -> tuple[Path, str]:
    """Where an RM named by the user lives: ``(directory, kind)``.

    ``kind`` is ``"hf"`` for a Hugging Face RM directory (``path`` itself or a ``train_rm`` run
    directory's ``hf/`` export) and ``"run"`` for a run directory without an export (its Orbax
    checkpoints). Checked before anything is loaded: a ``config.json`` that is not valid JSON or
    describes a model this implementation does not support raises `InputError` naming the file;
    a path that is neither raises ``FileNotFoundError``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"reward model not found: {path}")
    if not (path / "config.json").is_file() and (path / "hf" / "config.json").is_file():
        path = path / "hf"
    config = path / "config.json"
    if config.is_file():
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise InputError(f"{config}: not UTF-8 ({e.reason})") from None
        except json.JSONDecodeError as e:
            raise InputError(
                f"{config}: not valid JSON ({e.msg}, line {e.lineno} column {e.colno})"
            ) from None
        if not isinstance(data, dict):
            raise InputError(f"{config}: expected a JSON object, got {type(data).__name__}")
        try:
            Qwen3Config.from_hf(data)
        except (ValueError, TypeError, KeyError) as e:
            raise InputError(f"{config}: {e}") from None
        return path, "hf"
    if (path / "config.yaml").is_file() and (path / "checkpoints").is_dir():
        return path, "run"
    raise FileNotFoundError(
        f"{path}: no config.json (expected a Hugging Face RM directory, or a train_rm "
        "run directory with an hf/ export or Orbax checkpoints)"
    )


def load_rm(
    path: str | Path, *, tokenizer: str | None = None, mesh=None, dtype: str | None = None
) -> tuple[Qwen3RewardModel, Any, Any]:
    """``(model, tokenizer, mesh)`` of the RM at ``path`` (see `resolve_rm_path`), placed on
    ``mesh`` (default: all devices), with the tokenizer found there unless ``tokenizer`` names
    another."""
    from codescaler_jax.models.hf_io import load_hf_model

    path, kind = resolve_rm_path(path)
    mesh = mesh if mesh is not None else make_mesh()
    if kind == "run":
        model, tok = load_run_checkpoint(path, mesh=mesh)
        return model, (load_tokenizer(tokenizer) if tokenizer else tok), mesh
    model = load_hf_model(path, Qwen3RewardModel, mesh=mesh, param_dtype=dtype, dtype=dtype)
    return model, load_tokenizer(tokenizer or str(path)), mesh


def load_run_checkpoint(
    run_dir: str | Path, *, mesh=None, step: int | None = None
) -> tuple[Qwen3RewardModel, Any]:
    """The RM of a ``train_rm`` run directory from its Orbax checkpoint (latest, or ``step``),
    with the run's tokenizer: ``(model, tokenizer)``. For runs exported without ``hf/``."""
    import jax.numpy as jnp

    from codescaler_jax.config import load_config
    from codescaler_jax.rm.config import RMTrainConfig
    from codescaler_jax.training.checkpoint import (
        checkpoint_scan_layers,
        latest_step,
        restore_state,
    )
    from codescaler_jax.training.optim import make_optimizer, make_schedule
    from codescaler_jax.training.state import split_model, state_shardings

    run_dir = Path(run_dir)
    cfg = load_config(RMTrainConfig, run_dir / "config.yaml")
    mesh = mesh if mesh is not None else make_mesh(cfg.mesh)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    mcfg = cfg.model.checkpoint_config() or cfg.model.sized_config(
        vocab_min=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    step = latest_step(run_dir) if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {run_dir / 'checkpoints'}")
    # Build the model in the layout the checkpoint was written in (a run directory whose
    # config predates model.scan_layers leaves it None, and the size's default may differ).
    saved = checkpoint_scan_layers((run_dir / "checkpoints").absolute(), step)
    if saved is not None and saved != mcfg.scan_layers:
        mcfg = dataclasses.replace(mcfg, scan_layers=saved)
    abstract = nnx.eval_shape(lambda: Qwen3RewardModel(mcfg, rngs=nnx.Rngs(0)))
    graphdef, params, rest = split_model(abstract)
    # The checkpoint holds the whole train state; Orbax restores a tree of the same structure.
    tx = make_optimizer(cfg.optim, make_schedule(cfg.optim, 1))
    sh = state_shardings(abstract, tx, mesh)
    sds = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
    target = {
        "params": jax.tree.map(sds, params, sh["params"]),
        "opt_state": jax.tree.map(sds, jax.eval_shape(tx.init, params), sh["opt_state"]),
        "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=sh["step"]),
    }
    state = restore_state(run_dir, step, target)
    return nnx.merge(graphdef, state["params"], rest), tokenizer


class RewardScorer:
    """Scores with a ``Qwen3RewardModel`` and its tokenizer.

    Args:
        model: the RM (its parameters already placed on ``mesh``).
        tokenizer: the RM's tokenizer (its chat template renders the input).
        mesh: the mesh the model lives on (default: all devices, fsdp).
        max_length: right-truncation length of RM inputs (the reference uses 4096).
        batch_size: rows per forward pass unless a call names another; every batch size must
            be divisible by the mesh's batch axes.
        min_bucket: smallest padded length; buckets double up to ``max_length``.
    """

    def __init__(
        self,
        model: Qwen3RewardModel,
        tokenizer,
        *,
        mesh=None,
        max_length: int = 4096,
        batch_size: int = 16,
        min_bucket: int = 64,
    ):
        self.mesh = mesh if mesh is not None else make_mesh()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = self._rows(batch_size)
        self.buckets = make_buckets(max_length, min(min_bucket, max_length))
        self.pad_id = tokenizer.pad_token_id
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        self.params = params
        self._sharding = batch_sharding(self.mesh)

        def forward(params, ids, mask):
            return nnx.merge(graphdef, params, rest)(ids, mask)

        self._forward = jax.jit(forward)
        self._compiled: dict[tuple[int, int], Any] = {}

    def _rows(self, batch_size: int | None) -> int:
        """``batch_size`` (default: the scorer's), checked against the mesh's batch axes."""
        if batch_size is None:
            return self.batch_size
        data_ways = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        if batch_size < 1 or batch_size % data_ways:
            raise InputError(
                f"batch_size={batch_size} must be divisible by the mesh's data x fsdp = {data_ways}"
            )
        return batch_size

    def compiled(self, length: int, batch_size: int | None = None):
        """The forward pass of ``[batch_size, length]`` inputs, compiled ahead of time and kept
        (the executable `score_ids` runs for that shape)."""
        rows = self._rows(batch_size)
        exe = self._compiled.get((rows, length))
        if exe is None:
            sds = jax.ShapeDtypeStruct((rows, length), np.int32, sharding=self._sharding)
            with jax.set_mesh(self.mesh):
                exe = self._forward.lower(self.params, sds, sds).compile()
            self._compiled[(rows, length)] = exe
        return exe

    def pass_bytes(self, length: int, batch_size: int | None = None) -> int:
        """Memory one forward pass of ``[batch_size, length]`` needs on top of the resident
        parameters, per device: XLA's temporaries and outputs, read from the compiled program
        (nothing is run)."""
        mem = self.compiled(length, batch_size).memory_analysis()
        return int((getattr(mem, "temp_size_in_bytes", 0) or 0)
                   + (getattr(mem, "output_size_in_bytes", 0) or 0))

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        tokenizer: str | None = None,
        mesh=None,
        dtype: str | None = None,
        **kwargs: Any,
    ) -> RewardScorer:
        """Load a Hugging Face RM directory, or a ``train_rm`` run directory (its ``hf/``
        export, else its latest Orbax checkpoint), with the tokenizer files found there
        unless ``tokenizer`` names others."""
        model, tok, mesh = load_rm(path, tokenizer=tokenizer, mesh=mesh, dtype=dtype)
        return cls(model, tok, mesh=mesh, **kwargs)

    def encode(self, problems: Sequence[str], codes: Sequence[str]) -> list[list[int]]:
        return encode_rm_inputs(self.tokenizer, problems, codes, self.max_length)

    def _batches(self, seqs: Sequence[Sequence[int]], rows_per_pass: int):
        """``(row indices, scores [rows_per_pass] on the mesh)`` of each forward pass, the
        inputs sorted by length; the padded tail of the last pass repeats its last row. Every
        pass is waited on before the next (independent calls must not pile up on fake CPU
        devices, see tests/conftest.py); the scores stay on device."""
        order = np.argsort([len(s) for s in seqs], kind="stable")
        for start in range(0, len(seqs), rows_per_pass):
            idx = order[start : start + rows_per_pass]
            rows = [seqs[i] for i in idx]
            length = bucket_length(max(max(len(r) for r in rows), 1), self.buckets)
            rows += [rows[-1]] * (rows_per_pass - len(rows))
            ids, mask = pad_right(rows, length, self.pad_id)
            ids = jax.device_put(ids, self._sharding)
            mask = jax.device_put(mask, self._sharding)
            exe = self.compiled(length, rows_per_pass)
            yield idx, jax.block_until_ready(exe(self.params, ids, mask))

    def score_ids(
        self, seqs: Sequence[Sequence[int]], batch_size: int | None = None
    ) -> np.ndarray:
        """Scores ``[N]`` float32 of already tokenized RM inputs, ``batch_size`` rows per
        forward pass (default: the scorer's)."""
        rows_per_pass = self._rows(batch_size)
        n = len(seqs)
        out = np.zeros(n, np.float32)
        if jax.process_count() > 1:
            return self._score_process_rows(seqs, rows_per_pass, out)
        with jax.set_mesh(self.mesh):
            for idx, scores in self._batches(seqs, rows_per_pass):
                out[idx] = jax.device_get(scores)[: len(idx)]
        return out

    def _score_process_rows(self, seqs: Sequence[Sequence[int]], rows_per_pass: int,
                            out: np.ndarray) -> np.ndarray:
        """`score_ids` of this process's rows under ``jax.distributed`` (module docstring)."""
        procs = jax.process_count()
        if rows_per_pass % procs:
            raise InputError(f"batch_size={rows_per_pass} is not divisible by the {procs} "
                             "processes")
        mine = rows_per_pass // procs
        order = np.argsort([len(s) for s in seqs], kind="stable")
        chunks = [order[i : i + mine] for i in range(0, len(seqs), mine)]
        passes = int(global_max(len(chunks)))
        # Each pass's padded length: the longest row any process puts into it.
        lengths = np.ones(passes, np.int64)
        for j, idx in enumerate(chunks):
            lengths[j] = max(len(seqs[i]) for i in idx)
        lengths = global_max(lengths)
        with jax.set_mesh(self.mesh):
            for j in range(passes):
                idx = chunks[j] if j < len(chunks) else order[:0]
                length = bucket_length(max(int(lengths[j]), 1), self.buckets)
                # filler rows (a process with fewer or no rows): dropped below
                rows = [seqs[i] for i in idx] or [[self.pad_id]]
                rows += [rows[-1]] * (mine - len(rows))
                ids, mask = pad_right(rows, length, self.pad_id)
                exe = self.compiled(length, rows_per_pass)
                scores = exe(self.params, rows_to_global(self._sharding, ids),
                             rows_to_global(self._sharding, mask))
                out[idx] = local_rows(scores)[: len(idx)]
        return out

    def score_ids_on_device(
        self,
        seqs: Sequence[Sequence[int]],
        slots: Sequence[int] | np.ndarray,
        size: int,
        *,
        fill: float = 0.0,
        batch_size: int | None = None,
    ) -> jax.Array:
        """The scores of ``seqs`` as one ``[size]`` float32 array on the mesh (replicated),
        without a host copy: ``out[slots[j]]`` is the score of ``seqs[j]``, ``fill`` elsewhere.

        The co-located reward's path (``rl.rewards.CodeScalerReward``): the scores go straight
        into on-device shaping and the advantages. The same forward passes as `score_ids`, so
        the same numbers; one small gather program per (number of passes, ``size``) places
        them, whatever subset of a batch is scored.
        """
        if jax.process_count() > 1:
            raise NotImplementedError(
                "score_ids_on_device takes every row of the batch in one process; under "
                "jax.distributed use score_ids (each process scores its own rows)")
        rows_per_pass = self._rows(batch_size)
        slots = np.asarray(slots, np.int64)
        if len(slots) != len(seqs):
            raise ValueError(f"{len(seqs)} inputs but {len(slots)} slots")
        if len(slots) and (slots.min() < 0 or slots.max() >= size):
            raise ValueError(f"slots must lie in [0, {size})")
        src = np.zeros(size, np.int32)  # where out[i] comes from in the passes' outputs
        hit = np.zeros(size, bool)
        outs = []
        with jax.set_mesh(self.mesh):
            for idx, scores in self._batches(seqs, rows_per_pass):
                src[slots[idx]] = len(outs) * rows_per_pass + np.arange(len(idx))
                hit[slots[idx]] = True
                outs.append(scores)
            return self._place(tuple(outs), src, hit, np.float32(fill))

    @functools.cached_property
    def _place(self):
        replicated = NamedSharding(self.mesh, PartitionSpec())

        def place(outs, src, hit, fill):
            if not outs:
                return jnp.full(src.shape, fill, jnp.float32)
            flat = jnp.concatenate([o.astype(jnp.float32) for o in outs])
            return jnp.where(hit, flat[src], fill)

        return jax.jit(place, out_shardings=replicated)

    def score(
        self, problems: Sequence[str], codes: Sequence[str], batch_size: int | None = None
    ) -> np.ndarray:
        """RM scores ``[N]`` float32 of (problem, code) pairs (``batch_size``: as `score_ids`)."""
        return self.score_ids(self.encode(problems, codes), batch_size)
