"""A tiny random reward model with the real Qwen3 tokenizer, saved as a Hugging Face directory.

Used by the evaluation, best-of-N and server tests. The default initialisation (std 0.02) gives
scores that differ only in the 6th digit between inputs; the parameters are scaled up so that
different code gets clearly different scores (order 1), which the selection and accuracy tests
need to be meaningful.
"""

from __future__ import annotations

from pathlib import Path

import jax
from flax import nnx

from codescaler_jax.data.tokenizer import qwen3_tokenizer_dir
from codescaler_jax.models.hf_io import save_hf_model
from codescaler_jax.models.qwen3 import Qwen3Config, Qwen3RewardModel


def tiny_rm_config() -> Qwen3Config:
    return Qwen3Config.tiny(
        vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, pad_token_id=151643,
        eos_token_id=151645, max_position_embeddings=4096,
    )


def save_tiny_rm(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny random RM (+ the bundled Qwen3 tokenizer files) to ``path``."""
    model = Qwen3RewardModel(tiny_rm_config(), rngs=nnx.Rngs(seed))
    params = nnx.state(model, nnx.Param)

    def rescale(keypath, v):
        name = jax.tree_util.keystr(keypath)
        if "norm" in name:
            return v
        return v * (50.0 if ("embed" in name or "score" in name) else 10.0)

    nnx.update(model, jax.tree_util.tree_map_with_path(rescale, params))
    save_hf_model(model, path, tokenizer_dir=qwen3_tokenizer_dir())
    return Path(path)
