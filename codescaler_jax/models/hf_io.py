"""Hugging Face checkpoint I/O for the Qwen3 models: config.json + safetensors, both ways.

``load_hf_model`` reads ``config.json``, builds the model abstractly (no memory), checks every
tensor name and shape in the safetensors headers against the model *before* reading any data,
then streams the tensors one at a time: map the HF name to our parameter, transpose/reshape,
cast, and place it straight into its target ``NamedSharding`` (each device receives only its
slice), so a model bigger than one device never sits whole on one device.

Name map (HF ``[out, in]`` Linear weights become our ``kernel[in..., out...]``)::

    model.embed_tokens.weight [V, H]            -> model.embed_tokens.embedding [V, H]
    model.layers.i.self_attn.{q,k,v}_proj.weight [N*D, H] -> ...kernel [H, N, D]
    model.layers.i.self_attn.o_proj.weight [H, N*D]       -> ...kernel [N, D, H]
    model.layers.i.mlp.{gate,up}_proj.weight [I, H]       -> ...kernel [H, I]
    model.layers.i.mlp.down_proj.weight [H, I]            -> ...kernel [I, H]
    *norm*.weight [X]                           -> *norm*.weight [X]
    score.weight [1, H] (RM) / lm_head.weight [V, H] (LM) -> kernel [H, 1] / [H, V]

With ``scan_layers`` the layer parameters are stacked (``model.layers.self_attn.q_proj.kernel
[L, H, N, D]``): HF tensor ``model.layers.{i}.…`` is slice ``i`` of the stacked parameter. Loading
streams each per-layer tensor into its slice on the devices (never the whole stack on the host);
saving writes one HF tensor per layer, so the files are the same in both layouts.

Architectures: ``Qwen3ForSequenceClassification`` (1 label) and ``Qwen3ForTokenClassification``
(1 label; its ``score.bias`` must be zero, as the reference's never-trained bias is) load into
``Qwen3RewardModel``; ``Qwen3ForCausalLM`` loads into ``Qwen3ForCausalLM`` (a ``lm_head.weight``
next to tied embeddings is ignored, as transformers does).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding
from safetensors import safe_open
from safetensors.numpy import save_file

from codescaler_jax.fsutil import apply_umask
from codescaler_jax.models.qwen3 import (
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3RewardModel,
    layer_path,
    stacked_layer_path,
)
from codescaler_jax.models.sharding import Rules, flat_param_shardings

RM_ARCHITECTURES = ("Qwen3ForSequenceClassification", "Qwen3ForTokenClassification")
LM_ARCHITECTURES = ("Qwen3ForCausalLM",)
TOKENIZER_FILE_PATTERN = re.compile(
    r"^(tokenizer.*|vocab\..*|merges\.txt|special_tokens_map\.json|added_tokens\.json|"
    r"chat_template\.(jinja|json)|.*\.tiktoken|generation_config\.json)$"
)
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9


class CheckpointError(ValueError):
    """A checkpoint that does not match the model: the message names the tensor or key."""


# ---- name map -------------------------------------------------------------------------------


def _hf_name(path: tuple[Any, ...], layer: int | None = None) -> str:
    # Our paths mirror HF module names; only the leaf differs (kernel/embedding -> weight).
    # A stacked layer parameter names one HF tensor per layer (its index after "layers").
    if layer is not None:
        path = layer_path(path, layer)
    return ".".join(str(p) for p in path[:-1]) + ".weight"


def _tensors(
    params: dict[tuple[Any, ...], Any],
) -> list[tuple[str, tuple[Any, ...], int | None, tuple[int, ...]]]:
    """``(HF name, our path, layer index or None, shape of the HF-side tensor in our axis
    order)`` for each HF tensor of a flat parameter dict (stacked parameters give one per
    layer)."""
    out = []
    for p, var in params.items():
        shape = tuple(var.get_value().shape)
        if stacked_layer_path(p):
            out.extend((_hf_name(p, i), p, i, shape[1:]) for i in range(shape[0]))
        else:
            out.append((_hf_name(p), p, None, shape))
    return out


def _layer_slice_sharding(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
    """The sharding of one layer of a stacked parameter (its leading axis dropped)."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))
    return sharding


def _stack_writer(shape: tuple[int, ...], dtype: Any, sharding: jax.sharding.Sharding):
    """``(empty stack, put)`` for a stacked parameter: ``put(stack, layer_array, i)`` writes
    layer ``i`` in place (the stack is donated), so loading holds one stack plus one layer."""
    empty = jax.jit(lambda: jax.numpy.zeros(shape, dtype), out_shardings=sharding)()
    put = jax.jit(
        lambda stack, x, i: jax.lax.dynamic_update_index_in_dim(stack, x, i, 0),
        out_shardings=sharding,
        donate_argnums=0,
    )
    return empty, put


def _num_in_dims(path: tuple[Any, ...]) -> int:
    return 2 if path[-2] == "o_proj" else 1  # o_proj kernel is [heads, head_dim, hidden]


def _hf_shape(path: tuple[Any, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the HF tensor that holds our parameter ``path`` of ``shape``."""
    if path[-1] != "kernel":
        return shape
    n_in = _num_in_dims(path)
    return (math.prod(shape[n_in:]), math.prod(shape[:n_in]))


def _to_ours(path: tuple[Any, ...], w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return w.T.reshape(shape) if path[-1] == "kernel" else w


def _to_hf(path: tuple[Any, ...], w: np.ndarray) -> np.ndarray:
    if path[-1] != "kernel":
        return w
    n_in = _num_in_dims(path)
    return np.ascontiguousarray(
        w.reshape(math.prod(w.shape[:n_in]), math.prod(w.shape[n_in:])).T
    )


# ---- reading --------------------------------------------------------------------------------


def _checkpoint_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return [single]
    raise CheckpointError(f"{path}: neither model.safetensors nor model.safetensors.index.json")


def _read_headers(files: list[str]) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """``{tensor name: (file, shape, safetensors dtype)}`` without reading tensor data."""
    out: dict[str, tuple[str, tuple[int, ...], str]] = {}
    for file in files:
        with safe_open(file, framework="np") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                out[name] = (file, tuple(sl.get_shape()), sl.get_dtype())
    return out


def _check_architecture(hf_config: dict[str, Any], model_cls: type) -> str:
    archs = hf_config.get("architectures") or []
    if len(archs) != 1:
        raise CheckpointError(f"config.json architectures={archs}: expected exactly one")
    arch = archs[0]
    allowed = RM_ARCHITECTURES if model_cls is Qwen3RewardModel else LM_ARCHITECTURES
    if model_cls not in (Qwen3RewardModel, Qwen3ForCausalLM):
        raise CheckpointError(f"model_cls {model_cls!r} is not a Qwen3 model of this package")
    if arch not in allowed:
        raise CheckpointError(
            f"config.json architecture {arch!r} cannot be loaded into {model_cls.__name__} "
            f"(accepted: {list(allowed)})"
        )
    if arch in RM_ARCHITECTURES:
        num_labels = len(hf_config.get("id2label") or {}) or hf_config.get("num_labels", 1)
        if num_labels != 1:
            raise CheckpointError(f"config.json: num_labels={num_labels}, the reward model needs 1")
    return arch


def load_hf_model(
    path: str | os.PathLike,
    model_cls: type[Qwen3RewardModel] | type[Qwen3ForCausalLM],
    *,
    mesh: Mesh | None = None,
    param_dtype: str | None = None,
    dtype: str | None = None,
    rules: Rules | None = None,
    **config_overrides: Any,
) -> Qwen3RewardModel | Qwen3ForCausalLM:
    """Load an HF Qwen3 checkpoint directory into ``model_cls``.

    Args:
        path: directory with ``config.json`` and ``model.safetensors`` (or a sharded set with
            ``model.safetensors.index.json``).
        model_cls: ``Qwen3RewardModel`` or ``Qwen3ForCausalLM``.
        mesh: place each parameter on this mesh per the logical-axis ``rules``; None puts
            everything on the first device.
        param_dtype, dtype: override the config's parameter / compute dtype (default
            "float32", whatever the checkpoint's dtype).
        config_overrides: other ``Qwen3Config`` fields (e.g. ``remat=True``).

    Raises:
        CheckpointError: unsupported architecture; a missing, unexpected or misshaped tensor
            (all named in the message, found from the headers before any data is read).
    """
    path = os.fspath(path)
    with open(os.path.join(path, "config.json")) as f:
        hf_config = json.load(f)
    arch = _check_architecture(hf_config, model_cls)
    overrides = dict(config_overrides)
    if param_dtype is not None:
        overrides["param_dtype"] = param_dtype
    if dtype is not None:
        overrides["dtype"] = dtype
    try:
        cfg = Qwen3Config.from_hf(hf_config, **overrides)
    except ValueError as e:
        raise CheckpointError(str(e)) from e

    abstract = nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    params = dict(nnx.to_flat_state(abstract_state))
    # HF name -> (our path, layer index for a stacked parameter or None, our-side shape).
    by_name = {name: (p, layer, shape) for name, p, layer, shape in _tensors(params)}
    if mesh is not None:
        shardings = flat_param_shardings(abstract_state, mesh, rules)
    else:
        one = SingleDeviceSharding(jax.devices()[0])
        shardings = {p: one for p in params}

    headers = _read_headers(_checkpoint_files(path))
    ignored = {n for n in headers if n.endswith("rotary_emb.inv_freq")}  # old non-persistent buffer
    if cfg.tie_word_embeddings and model_cls is Qwen3ForCausalLM and "lm_head.weight" in headers:
        ignored.add("lm_head.weight")  # tied: the embedding is the head, as in transformers
    if arch == "Qwen3ForTokenClassification" and "score.bias" in headers:
        file, shape, _ = headers["score.bias"]
        with safe_open(file, framework="np") as f:
            bias = f.get_tensor("score.bias")
        if shape != (1,) or np.any(bias != 0):
            raise CheckpointError(
                f"score.bias={bias.tolist()} in {file}: Qwen3RewardModel has no head bias; "
                "only an all-zero bias (as in the reference checkpoints) can be dropped"
            )
        ignored.add("score.bias")

    missing = sorted(set(by_name) - set(headers))
    unexpected = sorted(set(headers) - set(by_name) - ignored)
    bad_shapes = []
    for name, (p, _, shape) in by_name.items():
        if name in headers:
            want = _hf_shape(p, shape)
            if headers[name][1] != want:
                bad_shapes.append(f"{name}: checkpoint {headers[name][1]}, model expects {want}")
    problems = []
    if missing:
        problems.append(f"missing tensors {missing}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected}")
    if bad_shapes:
        problems.append("wrong shapes: " + "; ".join(bad_shapes))
    if problems:
        raise CheckpointError(f"{path} ({arch}) does not match {model_cls.__name__}: "
                              + " | ".join(problems))

    weight_dtype = cfg.weight_dtype
    values: dict[tuple[Any, ...], jax.Array] = {}
    writers: dict[tuple[Any, ...], Any] = {}
    by_file: dict[str, list[str]] = {}
    for name in by_name:
        by_file.setdefault(headers[name][0], []).append(name)
    for file, names in by_file.items():
        with safe_open(file, framework="np") as f:
            for name in names:
                p, layer, shape = by_name[name]
                host = np.asarray(_to_ours(p, f.get_tensor(name), shape), dtype=weight_dtype)
                if layer is None:
                    values[p] = jax.make_array_from_callback(
                        shape, shardings[p], lambda idx, h=host: h[idx]
                    )
                else:
                    if p not in writers:
                        full = tuple(params[p].get_value().shape)
                        values[p], writers[p] = _stack_writer(full, weight_dtype, shardings[p])
                    piece = jax.make_array_from_callback(
                        shape, _layer_slice_sharding(shardings[p]), lambda idx, h=host: h[idx]
                    )
                    values[p] = writers[p](values[p], piece, np.int32(layer))
                del host
    state = nnx.from_flat_state({p: params[p].replace(v) for p, v in values.items()})
    return nnx.merge(graphdef, state)


# ---- writing --------------------------------------------------------------------------------


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", size.upper())
    if not m:
        raise ValueError(f"max_shard_size={size!r}: use bytes or e.g. '500MB', '5GB'")
    return int(float(m.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[m.group(2)])


def _gather(x: jax.Array) -> np.ndarray:
    """The full value of a (possibly sharded, possibly multi-host) array on the host."""
    if not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def save_hf_model(
    model: Qwen3RewardModel | Qwen3ForCausalLM,
    path: str | os.PathLike,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_BYTES,
    save_dtype: str | None = None,
) -> None:
    """Write ``model`` as an HF checkpoint that ``transformers`` ``from_pretrained`` loads.

    Writes ``config.json`` (``Qwen3ForSequenceClassification`` with one label for the reward
    model, ``Qwen3ForTokenClassification`` with a zero ``score.bias`` and
    ``codescaler_rm_pooling`` for a mean-pooled one, ``Qwen3ForCausalLM`` for the LM),
    ``model.safetensors`` or, above
    ``max_shard_size``, ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``,
    and the tokenizer files of ``tokenizer_dir`` if given. Parameters are gathered to the
    host one at a time; at most one shard's tensors are held in host memory. In a multi-host
    run every process must call this (gathers are collective); process 0 writes.

    Args:
        save_dtype: "float32"/"bfloat16" to cast on save; default the parameter dtype.
    """
    path = os.fspath(path)
    cfg = model.cfg
    if isinstance(model, Qwen3RewardModel):
        # A mean-pooled RM is HF token classification (per-token scores; its score is their
        # mean under the attention mask, or with "last_mean" the average of that and the last
        # token's, recorded as config.json's codescaler_rm_pooling):
        # as sequence classification, transformers would read the last token instead.
        arch = ("Qwen3ForSequenceClassification" if cfg.rm_pooling == "last"
                else "Qwen3ForTokenClassification")
    elif isinstance(model, Qwen3ForCausalLM):
        arch = "Qwen3ForCausalLM"
    else:
        raise TypeError(f"save_hf_model: unsupported model type {type(model).__name__}")
    out_dtype = jax.numpy.dtype(save_dtype or cfg.param_dtype)
    writer = jax.process_index() == 0

    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    entries = _tensors(flat)  # (HF name, our path, layer of a stacked parameter, shape)
    limit = _parse_size(max_shard_size)
    shards: list[list[tuple[str, tuple[Any, ...], int | None, tuple[int, ...]]]] = [[]]
    shard_bytes = 0
    for entry in entries:
        nbytes = math.prod(entry[3]) * out_dtype.itemsize
        if shards[-1] and shard_bytes + nbytes > limit:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(entry)
        shard_bytes += nbytes

    if writer:
        os.makedirs(path, exist_ok=True)
        hf_config = cfg.to_hf_dict(arch)
        hf_config["dtype"] = str(out_dtype)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
    n = len(shards)
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards):
        fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        tensors: dict[str, np.ndarray] = {}
        for name, p, layer, _ in shard:
            value = flat[p].get_value()
            # One layer of a stack at a time: the host never holds a whole stacked parameter.
            host = _to_hf(p, _gather(value if layer is None else value[layer])).astype(out_dtype)
            tensors[name] = host
            weight_map[name] = fname
            total += host.nbytes
            if name == "score.weight" and arch == "Qwen3ForTokenClassification":
                # HF token classification has a head bias; ours is none, i.e. zero.
                tensors["score.bias"] = np.zeros((1,), out_dtype)
                weight_map["score.bias"] = fname
                total += tensors["score.bias"].nbytes
        if writer:
            save_file(tensors, os.path.join(path, fname), metadata={"format": "pt"})
            apply_umask(os.path.join(path, fname))  # safetensors writes 0600
        del tensors
    if writer and n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    if writer and tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, path)


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy tokenizer / chat-template / generation-config files from ``src`` to ``dst``."""
    copied = []
    for name in sorted(os.listdir(src)):
        full = os.path.join(src, name)
        if os.path.isfile(full) and TOKENIZER_FILE_PATTERN.match(name):
            shutil.copyfile(full, os.path.join(dst, name))
            copied.append(name)
    if not copied:
        raise FileNotFoundError(f"tokenizer_dir {src}: no tokenizer files found")
    return copied


def hf_param_names(model: nnx.Module) -> dict[str, tuple[tuple[Any, ...], int | None]]:
    """``{HF tensor name: (our parameter path, layer index)}`` for ``model`` (for tools and
    tests); the index is that of the tensor's slice of a stacked (scanned) parameter, or None."""
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    return {name: (p, layer) for name, p, layer, _ in _tensors(flat)}
