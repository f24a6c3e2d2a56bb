"""Test helpers for the Qwen3 model tests: random ``transformers`` Qwen3 models (torch, CPU)
as the independent numerical reference, and padded token batches.

HF's own init (std 0.02, norm weights 1) gives near-zero outputs, which would make a 1e-4
tolerance meaningless; ``random_hf_model`` therefore redraws every weight (matrices std 0.1,
norm weights 1 +- 0.3) so scores and logits are O(1).
"""

from __future__ import annotations

import numpy as np
import torch
import transformers

PAD = 0
# Three tiny shapes: GQA + untied head; MHA + tied embeddings; 4-way GQA with a head_dim
# that is not hidden/heads and a large rope_theta.
TINY = {
    "gqa_untied": dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       tie_word_embeddings=False, rope_theta=10000.0),
    "mha_tied": dict(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                     num_attention_heads=3, num_key_value_heads=3, head_dim=16,
                     tie_word_embeddings=True, rope_theta=500.0),
    "gqa4_wide_head": dict(vocab_size=160, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
                           head_dim=32, tie_word_embeddings=False, rope_theta=1_000_000.0),
    # Divisible by 4 everywhere (heads, kv heads, mlp, vocab, hidden): for the mesh tests.
    "mesh": dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=8, num_key_value_heads=4, head_dim=16,
                 tie_word_embeddings=False, rope_theta=10000.0),
}


def hf_config(name: str, **extra) -> transformers.Qwen3Config:
    kw = dict(TINY[name])
    theta = kw.pop("rope_theta")
    return transformers.Qwen3Config(
        **kw, rope_parameters={"rope_type": "default", "rope_theta": theta},
        pad_token_id=PAD, num_labels=1, rms_norm_eps=1e-6, **extra,
    )


def random_hf_model(name: str, kind: str, seed: int = 0) -> torch.nn.Module:
    """A float32 eval-mode ``Qwen3ForSequenceClassification`` ("rm"), ``Qwen3ForCausalLM``
    ("lm") or ``Qwen3ForTokenClassification`` ("tok") with O(1)-output random weights."""
    torch.manual_seed(seed)
    cls = {"rm": transformers.Qwen3ForSequenceClassification,
           "lm": transformers.Qwen3ForCausalLM,
           "tok": transformers.Qwen3ForTokenClassification}[kind]
    model = cls(hf_config(name)).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif pname.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model


def padded_batch(seed: int, lengths: list[int], seq: int, vocab: int, left: bool = False):
    """``(ids, mask)`` int32 ``[B, seq]``: real tokens in ``[2, vocab)``, ``PAD`` elsewhere."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(2, vocab, size=(len(lengths), seq)).astype(np.int32)
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        if left:
            mask[i, seq - n:] = 1
        else:
            mask[i, :n] = 1
    return np.where(mask == 1, ids, PAD).astype(np.int32), mask


def torch_out(model: torch.nn.Module, ids: np.ndarray, mask: np.ndarray,
              position_ids: np.ndarray | None = None) -> np.ndarray:
    """The model's ``logits`` as float32 numpy (RM: ``[B]``, LM/token: ``[B, T, V|1]``)."""
    kwargs = {}
    if position_ids is not None:
        kwargs["position_ids"] = torch.tensor(position_ids, dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long),
                    attention_mask=torch.tensor(mask, dtype=torch.long), **kwargs).logits
    out = out.float().numpy()
    if isinstance(model, transformers.Qwen3ForSequenceClassification):
        return out[:, 0]
    return out
