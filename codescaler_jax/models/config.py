"""The Qwen3 architecture config and the Hugging Face ``config.json`` checks, apart from modules.

``Qwen3Config`` holds the architecture plus our compute knobs, with constructors for the named
sizes and ``from_hf`` / ``to_hf_dict`` for HF ``config.json`` files (what we cannot run is
refused naming the key). ``MeshConfig`` is the device-mesh shape, ``ModelSection`` the run-config
section that the RM and the policy configs share. Nothing here imports jax, so a run config
validates without it; ``models.qwen3`` builds the modules from a ``Qwen3Config``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from typing import Any, ClassVar, Literal

# The names of models.attention's implementations (kept here, jax-free, so that a config names
# a valid one without importing the kernels).
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "chunked", "splash", "cudnn")
DTYPE_NAMES = ("float32", "bfloat16")
REMAT_POLICIES = (
    "nothing_saveable",
    "everything_saveable",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
)
# How a reward model pools its hidden states into one score (Qwen3Config.rm_pooling); the
# config.json key that records a choice other than the HF default ("last").
RM_POOLINGS = ("last", "mean", "last_mean")
HF_POOLING_KEY = "codescaler_rm_pooling"
# HF config.json keys that carry no meaning for a dense, full-attention Qwen3 in JAX; any
# other key we do not read draws a warning, and _HF_UNSUPPORTED_KEYS an error.
_HF_IGNORED_KEYS = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "initializer_range", "attention_dropout", "id2label", "label2id", "num_labels",
    "problem_type", "_name_or_path", "bos_token_id", "max_window_layers", "sliding_window",
    "output_attentions", "output_hidden_states", "return_dict", "tie_word_embeddings",
    "classifier_dropout", "_attn_implementation_autoset", "keys_to_ignore_at_inference",
    "pretraining_tp", "is_decoder", "chunk_size_feed_forward", "finetuning_task",
    "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id", "task_specific_params",
}
_HF_READ_KEYS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rope_theta", "rope_scaling", "rope_parameters",
    "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings", "pad_token_id",
    "eos_token_id", "bos_token_id", "use_sliding_window", "layer_types", "hidden_act",
    "attention_bias", HF_POOLING_KEY,
}
_HF_UNSUPPORTED_KEYS = {
    "quantization_config": "quantized checkpoints are not supported",
    "auto_map": "custom remote code is not supported",
}
SUPPORTED_ARCHITECTURES = (
    "Qwen3ForCausalLM",
    "Qwen3ForSequenceClassification",
    "Qwen3ForTokenClassification",
    "Qwen3Model",
)


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    """Qwen3 architecture plus our compute knobs.

    Attributes:
        vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
        num_key_value_heads, head_dim, rope_theta, rms_norm_eps, max_position_embeddings,
        tie_word_embeddings, pad_token_id, eos_token_id, bos_token_id: as in HF config.json.
        param_dtype: storage dtype of the parameters, "float32" or "bfloat16".
        dtype: compute dtype of matmuls and activations ("float32" or "bfloat16"); norms,
            softmax and RoPE always run in float32, logits and scores are returned in float32.
        remat: rematerialise each decoder layer in the backward pass: False, True (recompute
            everything) or a ``jax.checkpoint_policies`` name from ``REMAT_POLICIES``.
        attention: the attention implementation (``models.attention.IMPLEMENTATIONS``):
            ``auto`` (splash on TPU, cudnn on GPU, chunked or xla by length on CPU), ``xla``
            (dense), ``chunked`` (blockwise, linear memory), ``splash`` or ``cudnn``.
        attention_block_q, attention_block_kv: block sizes of the chunked / splash paths
            (None: the path's default).
        rm_pooling: how the reward model turns hidden states into its score: ``"last"`` (the
            last real token, as HF ``Qwen3ForSequenceClassification`` and the reference) or
            ``"mean"`` (the mean over the real tokens of the per-token scores, i.e. HF
            ``Qwen3ForTokenClassification``'s logits averaged under the attention mask), or
            ``"last_mean"`` (the average of those two scores). Exported to ``config.json`` as
            ``codescaler_rm_pooling`` (with the token classification architecture for the
            pooling other than ``"last"``) and read back from it.
        scan_layers: store the decoder layers stacked (every layer parameter gets a leading
            ``[num_hidden_layers]`` axis, logical name ``"layers"``) and run them with one
            ``jax.lax.scan``, so compile time and program size do not grow with depth. On
            by default (the named sizes and checkpoints loaded from Hugging Face);
            ``tiny()`` turns it off, and the unrolled layout stays the reference.
    """

    vocab_size: int = 151936
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = True
    pad_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    bos_token_id: int | None = None
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: bool | str = False
    attention: str = "auto"
    attention_block_q: int | None = None
    attention_block_kv: int | None = None
    scan_layers: bool = True
    rm_pooling: str = "last"

    def __post_init__(self) -> None:
        if isinstance(self.eos_token_id, list):
            # Hashable: the config is static data of the NNX graph (jit cache key).
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPE_NAMES:
                raise ValueError(
                    f"Qwen3Config.{name}={getattr(self, name)!r}; use one of {list(DTYPE_NAMES)}"
                )
        if not (isinstance(self.remat, bool) or self.remat in REMAT_POLICIES):
            raise ValueError(
                f"Qwen3Config.remat={self.remat!r}; use a bool or one of {REMAT_POLICIES}"
            )
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"Qwen3Config.attention={self.attention!r}; use one of "
                f"{list(ATTENTION_IMPLEMENTATIONS)}"
            )
        for name in ("attention_block_q", "attention_block_kv"):
            val = getattr(self, name)
            if val is not None and (isinstance(val, bool) or not isinstance(val, int) or val < 1):
                raise ValueError(f"Qwen3Config.{name}={val!r}; use a positive int or None")
        if self.rm_pooling not in RM_POOLINGS:
            raise ValueError(
                f"Qwen3Config.rm_pooling={self.rm_pooling!r}; use one of {list(RM_POOLINGS)}"
            )
        if not isinstance(self.scan_layers, bool):
            raise ValueError(f"Qwen3Config.scan_layers={self.scan_layers!r}; use true or false")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")

    # ---- named sizes (numbers from the Qwen/Qwen3-* config.json files) -------------------
    @classmethod
    def tiny(cls, **overrides: Any) -> Qwen3Config:
        """A few-hundred-thousand-parameter config for CPU tests (GQA, untied head, layers
        unrolled unless ``scan_layers=True`` is passed)."""
        base = dict(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
            max_position_embeddings=512, tie_word_embeddings=False, pad_token_id=0,
            eos_token_id=1, scan_layers=False,
        )
        return cls(**{**base, **overrides})

    @classmethod
    def _qwen3(cls, **kw: Any) -> Qwen3Config:
        base = dict(
            vocab_size=151936, num_key_value_heads=8, head_dim=128, rope_theta=1_000_000.0,
            rms_norm_eps=1e-6, max_position_embeddings=40960, bos_token_id=151643,
            eos_token_id=151645, pad_token_id=151643,  # the Qwen3 tokenizer's pad token
        )
        return cls(**{**base, **kw})

    @classmethod
    def qwen3_0_6b(cls, **overrides: Any) -> Qwen3Config:
        return cls._qwen3(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                          num_attention_heads=16, tie_word_embeddings=True, **overrides)

    @classmethod
    def qwen3_1_7b(cls, **overrides: Any) -> Qwen3Config:
        return cls._qwen3(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                          num_attention_heads=16, tie_word_embeddings=True, **overrides)

    @classmethod
    def qwen3_4b(cls, **overrides: Any) -> Qwen3Config:
        return cls._qwen3(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                          num_attention_heads=32, tie_word_embeddings=True, **overrides)

    @classmethod
    def qwen3_8b(cls, **overrides: Any) -> Qwen3Config:
        return cls._qwen3(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                          num_attention_heads=32, tie_word_embeddings=False, **overrides)

    # ---- Hugging Face config.json ---------------------------------------------------------
    @classmethod
    def from_hf(cls, config: dict[str, Any] | str | os.PathLike, **overrides: Any) -> Qwen3Config:
        """Read an HF ``config.json`` (a dict, the file, or its directory).

        Raises ``ValueError`` naming the key for what this implementation does not support:
        non-Qwen3 architectures, sliding-window attention, non-default RoPE scaling, attention
        biases, activations other than SiLU.
        """
        if not isinstance(config, dict):
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            with open(path) as f:
                config = json.load(f)
        c = dict(config)
        if c.get("model_type") != "qwen3":
            raise ValueError(
                f"config.json model_type={c.get('model_type')!r}: only 'qwen3' is supported"
            )
        for arch in c.get("architectures") or []:
            if arch not in SUPPORTED_ARCHITECTURES:
                raise ValueError(
                    f"config.json architectures: {arch!r} is not supported (use one of "
                    f"{SUPPORTED_ARCHITECTURES})"
                )
        for key, why in _HF_UNSUPPORTED_KEYS.items():
            if key in c:
                raise ValueError(f"config.json key {key!r}: {why}")
        unknown = set(c) - _HF_READ_KEYS - _HF_IGNORED_KEYS
        if unknown:
            warnings.warn(f"config.json: ignoring unknown keys {sorted(unknown)}", stacklevel=2)
        if c.get("use_sliding_window"):
            raise ValueError(
                "config.json use_sliding_window=true: sliding-window attention is not supported"
            )
        layer_types = c.get("layer_types")
        if layer_types and any(t != "full_attention" for t in layer_types):
            raise ValueError(
                f"config.json layer_types={layer_types}: only 'full_attention' is supported"
            )
        if c.get("hidden_act", "silu") != "silu":
            raise ValueError(
                f"config.json hidden_act={c['hidden_act']!r}: only 'silu' is supported"
            )
        if c.get("attention_bias", False):
            raise ValueError("config.json attention_bias=true: Qwen3 attention has no biases here")
        rope_theta = c.get("rope_theta", 10000.0)
        for key in ("rope_scaling", "rope_parameters"):
            rope = c.get(key)
            if rope is None:
                continue
            kind = rope.get("rope_type", rope.get("type", "default"))
            if kind != "default":
                raise ValueError(
                    f"config.json {key}: rope type {kind!r} is not supported (only 'default')"
                )
            extra = set(rope) - {"rope_type", "type", "rope_theta"}
            if extra:
                raise ValueError(f"config.json {key}: unsupported keys {sorted(extra)}")
            rope_theta = rope.get("rope_theta", rope_theta)
        n_heads = c["num_attention_heads"]
        kw = dict(
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_hidden_layers=c["num_hidden_layers"],
            num_attention_heads=n_heads,
            num_key_value_heads=c.get("num_key_value_heads") or n_heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // n_heads,
            rope_theta=float(rope_theta),
            rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            max_position_embeddings=c.get("max_position_embeddings", 32768),
            tie_word_embeddings=c.get("tie_word_embeddings", False),
            pad_token_id=c.get("pad_token_id"),
            eos_token_id=c.get("eos_token_id"),
            bos_token_id=c.get("bos_token_id"),
        )
        pooling = c.get(HF_POOLING_KEY, "last")
        if pooling not in RM_POOLINGS:
            raise ValueError(
                f"config.json {HF_POOLING_KEY}={pooling!r}: use one of {list(RM_POOLINGS)}"
            )
        if pooling != "last":
            kw["rm_pooling"] = pooling
        kw.update(overrides)
        return cls(**kw)

    def to_hf_dict(self, architecture: str = "Qwen3ForCausalLM") -> dict[str, Any]:
        """An HF ``config.json`` dict that ``transformers`` loads as ``architecture``."""
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"architecture {architecture!r} not in {SUPPORTED_ARCHITECTURES}")
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        d: dict[str, Any] = {
            "architectures": [architecture],
            "model_type": "qwen3",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            # Legacy spelling, for transformers 4.x readers (5.x folds it into rope_parameters).
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": self.num_hidden_layers,
            "layer_types": ["full_attention"] * self.num_hidden_layers,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": 0.02,
            "use_cache": True,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "dtype": self.param_dtype,
        }
        if architecture in ("Qwen3ForSequenceClassification", "Qwen3ForTokenClassification"):
            d["id2label"] = {"0": "LABEL_0"}
            d["label2id"] = {"LABEL_0": 0}
            if self.rm_pooling != "last":
                d[HF_POOLING_KEY] = self.rm_pooling
        return d

    # jax is imported on use: a config is read and validated without it.
    @property
    def compute_dtype(self) -> Any:
        """The numpy-style dtype of matmuls and activations (``jnp.float32`` / ``bfloat16``)."""
        import jax.numpy as jnp

        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self) -> Any:
        """The dtype the parameters are stored in."""
        import jax.numpy as jnp

        return jnp.dtype(self.param_dtype)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape. Each entry is a device count; exactly one may be -1 ("all the rest").

    Attributes:
        data: data-parallel replicas (parameters replicated).
        fsdp: fully-sharded data parallelism (parameters split on ``embed``, batch split).
        tensor: tensor parallelism (heads / MLP units / vocab split).
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def __post_init__(self) -> None:
        sizes = dataclasses.asdict(self)
        for name, size in sizes.items():
            if size == 0 or size < -1:
                raise ValueError(
                    f"MeshConfig.{name} must be a positive device count or -1, got {size}"
                )
        if sum(1 for s in sizes.values() if s == -1) > 1:
            raise ValueError(f"MeshConfig: at most one axis may be -1, got {sizes}")

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        """Axis sizes ``(data, fsdp, tensor)`` for ``num_devices`` devices; -1 takes the rest."""
        sizes = dataclasses.asdict(self)
        fixed = math.prod(s for s in sizes.values() if s != -1)
        if -1 in sizes.values():
            if num_devices % fixed:
                raise ValueError(
                    f"MeshConfig {sizes}: {num_devices} devices are not divisible by the fixed "
                    f"axes' product {fixed}"
                )
            sizes = {k: (num_devices // fixed if v == -1 else v) for k, v in sizes.items()}
        elif fixed != num_devices:
            raise ValueError(
                f"MeshConfig {sizes}: product {fixed} != number of devices {num_devices}"
            )
        return sizes["data"], sizes["fsdp"], sizes["tensor"]


# The architecture fields a run config may set over a named size (None: the size's value).
SIZE_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings",
)
# The compute knobs applied both to a named size and to a checkpoint's own config.json.
COMPUTE_KEYS = ("param_dtype", "dtype", "remat", "attention", "attention_block_q",
                "attention_block_kv")


@dataclasses.dataclass
class ModelSection:
    """A model of a run config (the RM's ``model``, the policy's ``policy``).

    ``init_from``: a Hugging Face directory (an RM such as CodeScaler / Skywork-Reward-V2, a
    policy such as Qwen3-8B-Base, or one we exported) or ``None`` for random init of ``size``
    (a ``Qwen3Config`` named size: ``tiny``, ``qwen3_0_6b`` ...), with the explicit fields
    below overriding that size's values. ``attention``: the attention implementation
    (``models.attention``: ``auto`` picks splash on TPU, cudnn on GPU, and chunked or xla by
    length on CPU); ``attention_block_q`` / ``attention_block_kv``: its block sizes (None: the
    implementation's default). ``scan_layers``: stack the decoder layers and run them with a
    scan (compile time independent of depth); ``None`` keeps the model's default (on for the
    named Qwen3 sizes and HF checkpoints, off for ``tiny``). Orbax checkpoints are in the
    layout they were trained with. ``pooling`` (reward models): ``last`` (the last real
    token's score, HF sequence classification), ``mean`` (the mean of the per-token scores
    over the real tokens) or ``last_mean`` (the average of the two); ``None`` keeps the
    size's default (``last``) or the checkpoint's
    ``config.json`` (``codescaler_rm_pooling``).
    """

    # The config key of this section, for error messages (a class attribute, not a field).
    key: ClassVar[str] = "model"

    init_from: str | None = None
    size: str = "tiny"
    vocab_size: int | None = None
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    tie_word_embeddings: bool | None = None
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    dtype: Literal["float32", "bfloat16"] = "float32"
    remat: bool = False
    attention: Literal["auto", "xla", "chunked", "splash", "cudnn"] = "auto"
    attention_block_q: int | None = None
    attention_block_kv: int | None = None
    scan_layers: bool | None = None
    pooling: Literal["last", "mean", "last_mean"] | None = None

    def __post_init__(self) -> None:
        check_attention_blocks(self, self.key)

    def compute_overrides(self) -> dict[str, Any]:
        """The ``Qwen3Config`` compute knobs of this section; ``scan_layers`` only when set
        (``None`` keeps the size's or checkpoint's default)."""
        return compute_overrides(self)

    def sized_config(self, *, vocab_min: int = 0, **token_ids: Any) -> Qwen3Config:
        """The ``Qwen3Config`` of a from-scratch model: the named size, the explicit
        overrides, the compute knobs, and ``token_ids`` (``pad_token_id=``, ``eos_token_id=``).
        The vocabulary grows to ``vocab_min`` (rounded up to 128) unless set explicitly."""
        named = getattr(Qwen3Config, self.size, None)
        if named is None or self.size.startswith("_"):
            raise ValueError(f"{self.key}.size: unknown size {self.size!r}")
        base = named()
        overrides = {f: getattr(self, f) for f in SIZE_FIELDS if getattr(self, f) is not None}
        if "vocab_size" not in overrides and base.vocab_size < vocab_min:
            overrides["vocab_size"] = -(-vocab_min // 128) * 128
        return dataclasses.replace(base, **overrides, **token_ids, **self.compute_overrides())

    def checkpoint_config(self) -> Qwen3Config | None:
        """``init_from``'s ``config.json`` with this section's compute knobs, or None when
        there is no checkpoint config to read."""
        if not self.init_from or not os.path.isfile(os.path.join(self.init_from, "config.json")):
            return None
        return dataclasses.replace(Qwen3Config.from_hf(self.init_from), **self.compute_overrides())


def compute_overrides(section: Any) -> dict[str, Any]:
    """The ``Qwen3Config`` compute knobs of a model section (``model`` / ``policy``), applied
    both to a named size and to a checkpoint's own config.json; ``scan_layers`` only when set
    (``None`` keeps the size's or checkpoint's default)."""
    out = {name: getattr(section, name) for name in COMPUTE_KEYS}
    if section.scan_layers is not None:
        out["scan_layers"] = section.scan_layers
    if getattr(section, "pooling", None) is not None:
        out["rm_pooling"] = section.pooling
    return out


def check_attention_blocks(section: Any, prefix: str) -> None:
    """Block sizes are positive ints or None (the attention implementation's default)."""
    for name in ("attention_block_q", "attention_block_kv"):
        val = getattr(section, name)
        if val is not None and val < 1:
            raise ValueError(f"{prefix}.{name} must be >= 1 or null, got {val}")
