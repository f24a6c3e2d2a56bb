"""Sample k responses per problem from a policy checkpoint with our JAX sampler (`JaxSampler`).

Used by Avg@k evaluation and best-of-N. Each problem is one user turn of the policy tokenizer's
chat template with the generation prompt (the reference evaluates with ``llm.chat``); the k
samples of a problem are k rows of the same prompt, each with its own random stream. Responses
are decoded with special tokens kept and the final EOS token removed.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import jax

log = logging.getLogger("codescaler_jax")


@dataclasses.dataclass(frozen=True)
class SampleSettings:
    """Sampling knobs; the defaults are the reference's evaluation settings (recipe 7.3).

    Attributes:
        n: samples per problem (Avg@8 uses 8).
        temperature, top_p, top_k: sampling (top_k 0 = off, as in the reference evaluation).
        max_new_tokens: response budget (the reference allows 16,384 tokens in all).
        max_prompt_len: longest prompt in tokens (longer prompts are an error).
        batch_size: rows per decode loop (a multiple of the mesh's data x fsdp size).
        seed: base of the sampling random streams.
    """

    n: int = 8
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0
    max_new_tokens: int = 16384
    max_prompt_len: int = 4096
    batch_size: int = 8
    seed: int = 0


def render_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt as one user turn with the generation prompt."""
    out = []
    for p in prompts:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=True, add_generation_prompt=True
        )
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        out.append([int(t) for t in ids])
    return out


def sample_responses(
    policy: str | Path,
    prompts: Sequence[str],
    settings: SampleSettings,
    *,
    tokenizer: str | None = None,
    mesh=None,
) -> list[list[str]]:
    """``settings.n`` responses (text) for each prompt, from the HF policy directory ``policy``."""
    from codescaler_jax.data.tokenizer import load_tokenizer
    from codescaler_jax.generate.sampler import JaxSampler, SamplingConfig
    from codescaler_jax.models.hf_io import load_hf_model
    from codescaler_jax.models.qwen3 import Qwen3ForCausalLM
    from codescaler_jax.models.sharding import make_mesh

    mesh = mesh if mesh is not None else make_mesh()
    tok = load_tokenizer(tokenizer or str(policy))
    model = load_hf_model(policy, Qwen3ForCausalLM, mesh=mesh)
    eos = {int(tok.eos_token_id)}
    model_eos = model.cfg.eos_token_id
    if model_eos is not None:
        eos |= set(model_eos) if isinstance(model_eos, tuple) else {int(model_eos)}
    cfg = SamplingConfig(
        max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
        top_p=settings.top_p, top_k=settings.top_k, eos_token_ids=tuple(sorted(eos)),
        pad_token_id=int(tok.pad_token_id),
    )
    sampler = JaxSampler(
        model, cfg, mesh=mesh, batch_size=settings.batch_size,
        max_prompt_len=settings.max_prompt_len,
    )
    ids = render_prompts(tok, prompts)
    rows = [p for p in ids for _ in range(settings.n)]
    out = sampler.generate(rows, jax.random.key(settings.seed))
    texts = []
    for toks, n in zip(out.tokens, out.lengths, strict=True):
        toks = [int(t) for t in toks[: int(n)]]
        if toks and toks[-1] in eos:
            toks = toks[:-1]
        texts.append(tok.decode(toks, skip_special_tokens=False))
    truncated = int((~out.stopped).sum())
    if truncated:
        log.info("%d of %d responses hit max_new_tokens=%d", truncated, len(rows),
                 settings.max_new_tokens)
    return [texts[i * settings.n : (i + 1) * settings.n] for i in range(len(prompts))]
