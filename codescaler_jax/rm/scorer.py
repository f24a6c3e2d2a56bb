"""Score (problem, code) pairs with a reward model: batched, bucketed, on a mesh.

``RewardScorer`` is the one place that turns text into RM scores; ``score``, the GRPO
``codescaler`` reward, best-of-N and the HTTP server all use it. Inputs are rendered with the
RM tokenizer's chat template (user = problem, assistant = code), right-truncated at
``max_length``, sorted by length, cut into batches of ``batch_size`` rows, each padded to a
length bucket and to a full batch, so only a few shapes are ever compiled.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from codescaler_jax.data.pipeline import make_buckets
from codescaler_jax.data.tokenizer import (
    bucket_length,
    encode_rm_inputs,
    load_tokenizer,
    pad_right,
)
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
        from codescaler_jax.rm.trainer import load_run_checkpoint

        model, tok = load_run_checkpoint(path, mesh=mesh)
        return model, (load_tokenizer(tokenizer) if tokenizer else tok), mesh
    model = load_hf_model(path, Qwen3RewardModel, mesh=mesh, param_dtype=dtype, dtype=dtype)
    return model, load_tokenizer(tokenizer or str(path)), mesh


class RewardScorer:
    """Scores with a ``Qwen3RewardModel`` and its tokenizer.

    Args:
        model: the RM (its parameters already placed on ``mesh``).
        tokenizer: the RM's tokenizer (its chat template renders the input).
        mesh: the mesh the model lives on (default: all devices, fsdp).
        max_length: right-truncation length of RM inputs (the reference uses 4096).
        batch_size: rows per forward pass; must be divisible by the mesh's batch axes.
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
        data_ways = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        if batch_size < 1 or batch_size % data_ways:
            raise InputError(
                f"batch_size={batch_size} must be divisible by the mesh's data x fsdp = {data_ways}"
            )
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.buckets = make_buckets(max_length, min(min_bucket, max_length))
        self.pad_id = tokenizer.pad_token_id
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        self.params = params
        self._sharding = batch_sharding(self.mesh)

        def forward(params, ids, mask):
            return nnx.merge(graphdef, params, rest)(ids, mask)

        self._forward = jax.jit(forward)
        self._compiled: dict[int, Any] = {}

    def compiled(self, length: int):
        """The forward pass of ``[batch_size, length]`` inputs, compiled ahead of time and kept
        (the executable `score_ids` runs for that length)."""
        exe = self._compiled.get(length)
        if exe is None:
            sds = jax.ShapeDtypeStruct((self.batch_size, length), np.int32,
                                       sharding=self._sharding)
            with jax.set_mesh(self.mesh):
                exe = self._forward.lower(self.params, sds, sds).compile()
            self._compiled[length] = exe
        return exe

    def pass_bytes(self, length: int) -> int:
        """Memory one forward pass of ``[batch_size, length]`` needs on top of the resident
        parameters, per device: XLA's temporaries and outputs, read from the compiled program
        (nothing is run)."""
        mem = self.compiled(length).memory_analysis()
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

    def score_ids(self, seqs: Sequence[Sequence[int]]) -> np.ndarray:
        """Scores ``[N]`` float32 of already tokenized RM inputs."""
        n = len(seqs)
        out = np.zeros(n, np.float32)
        if n == 0:
            return out
        order = np.argsort([len(s) for s in seqs], kind="stable")
        with jax.set_mesh(self.mesh):
            for start in range(0, n, self.batch_size):
                idx = order[start : start + self.batch_size]
                rows = [seqs[i] for i in idx]
                length = bucket_length(max(max(len(r) for r in rows), 1), self.buckets)
                rows += [rows[-1]] * (self.batch_size - len(rows))
                ids, mask = pad_right(rows, length, self.pad_id)
                ids = jax.device_put(ids, self._sharding)
                mask = jax.device_put(mask, self._sharding)
                # device_get blocks on each batch (independent calls must not pile up on
                # fake CPU devices, see tests/conftest.py)
                scores = jax.device_get(self.compiled(length)(self.params, ids, mask))
                out[idx] = scores[: len(idx)]
        return out

    def score(self, problems: Sequence[str], codes: Sequence[str]) -> np.ndarray:
        """RM scores ``[N]`` float32 of (problem, code) pairs."""
        return self.score_ids(self.encode(problems, codes))
