"""Benchmark: continuous batching vs the static sampler, and packed vs padded GRPO updates, on
a skewed-length workload.

    python -m codescaler_jax.bench.rollout [--slots 8] [--rows 64] [--median 24] [--repeat 2]
                                           [--min-free 1] [--refill-batch 1]
                                           [--part rollout,update] [--out FILE.json]

Workload: response lengths drawn log-normal (median ``--median``, sigma 0.8), clipped to
``[1, 8 x median]`` (the long tail of real code responses), and forced exactly: the policy is
a "counting" Qwen3 (``counting_lm``: real weights and a full forward per token, but its
greedy continuation of token t is t+1, t+2, ... mod vocab), so a prompt ending in token
``(eos - n) mod vocab`` emits EOS as its n-th token on both engines. Both samplers get the same
model, prompts and ``max_new_tokens = 8 x median``.

Rollout: generated tokens/s of ``ContinuousSampler`` (``--slots`` decode slots) and of
``JaxSampler`` (``--slots`` rows per decode loop), each side's calls timed after a warm-up call
that compiles, interleaved A B A B (``bench.common.interleave``); ``speedup`` is the median
over rounds of the per-round ratio (wall seconds; ``speedup_cpu_s`` the same in process CPU
seconds), and decode slot utilisation (live slot-steps / (decode steps x slots); for the
static sampler from the lengths: each batch runs max(length) - 1 steps).

Update: one GRPO update (``rl.grpo.update``'s loss and gradient) on the same skewed batch,
padded (every row padded to prompt bucket + response bucket) vs packed (rows packed into
``--token-budget``-token micro-batches with segment ids, ``rl.packing``); tokens/s counts real
(prompt + response) tokens, and the padding fraction of each layout is reported.

The load is recorded by ``bench.common.LoadMonitor`` (``load`` and ``readme_grade`` in the
JSON; ``--force`` as in the other benchmarks), and each side's process CPU seconds beside its
wall seconds: on a shared machine the figures move with the load, so compare the two sides of
one run, never figures of different runs.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from codescaler_jax.bench.common import (
    LoadMonitor,
    add_harness_args,
    compare,
    interleave,
    write_json,
)


def counting_lm(cfg: Any, seed: int = 0, residual_scale: float = 0.05):
    """A ``Qwen3ForCausalLM`` whose greedy next token after token ``t`` is ``(t + 1) % V``.

    Embeddings are random unit-norm rows ``u_t``; the (untied) head's column ``t + 1`` is
    ``u_t``, so after the final RMSNorm the logit of ``t + 1`` is ``sqrt(H)`` and the others
    are ~N(0, 1). The layers keep their random weights (so every step does the full work) with
    output projections scaled by ``residual_scale``, small enough not to flip the argmax.
    """
    import jax.numpy as jnp
    from flax import nnx

    from codescaler_jax.models.qwen3 import Qwen3ForCausalLM

    if cfg.tie_word_embeddings:
        raise ValueError("counting_lm needs an untied head (tie_word_embeddings=False)")
    model = Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(seed))
    rng = np.random.RandomState(seed)
    u = rng.randn(cfg.vocab_size, cfg.hidden_size).astype(np.float32)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    model.model.embed_tokens.embedding[...] = jnp.asarray(u)
    model.lm_head.kernel[...] = jnp.asarray(np.roll(u, 1, axis=0).T)
    layers = model.model.layers
    for layer in (layers if not cfg.scan_layers else [layers]):
        for proj in (layer.self_attn.o_proj, layer.mlp.down_proj):
            proj.kernel[...] = proj.kernel[...] * residual_scale
    return model


def forced_prompts(lengths: Sequence[int], vocab: int, eos: int, prompt_lens: Sequence[int],
                   seed: int = 0) -> list[list[int]]:
    """Prompts on which ``counting_lm`` answers exactly ``lengths[i]`` tokens, the last one EOS
    (random tokens, then the token ``(eos - n) mod vocab``)."""
    rng = np.random.RandomState(seed)
    out = []
    for n, p in zip(lengths, prompt_lens, strict=True):
        if not 1 <= n < vocab:
            raise ValueError(f"forced length {n} must be in [1, vocab={vocab})")
        body = rng.randint(2, vocab, size=p - 1).tolist()
        out.append(body + [(eos - n) % vocab])
    return out


def skewed_lengths(rows: int, median: int, seed: int = 0, sigma: float = 0.8) -> np.ndarray:
    """Log-normal response lengths (median ``median``), clipped to ``[1, 8 x median]``."""
    rng = np.random.RandomState(seed)
    draw = median * np.exp(sigma * rng.randn(rows))
    return np.clip(np.round(draw), 1, 8 * median).astype(np.int64)


def static_utilisation(lengths: np.ndarray, batch: int) -> tuple[int, float]:
    """(decode steps, slot utilisation) of the static sampler on rows of ``lengths``."""
    steps = live = 0
    for start in range(0, len(lengths), batch):
        part = lengths[start:start + batch]
        steps += int(part.max()) - 1
        live += int((part - 1).sum())
    return steps, live / max(steps * batch, 1)


def _rollout(args: argparse.Namespace) -> dict[str, Any]:
    import jax

    from codescaler_jax.generate.engine import ContinuousSampler
    from codescaler_jax.generate.sampler import JaxSampler, SamplingConfig
    from codescaler_jax.models.qwen3 import Qwen3Config
    from codescaler_jax.models.sharding import MeshConfig, make_mesh

    n_new = 8 * args.median
    vocab = max(args.vocab, n_new + 2)
    cfg = Qwen3Config.tiny(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=
                           3 * args.hidden, num_hidden_layers=args.layers, head_dim=32,
                           num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=4 * n_new + 512)
    model = counting_lm(cfg)
    mesh = make_mesh(MeshConfig(), devices=jax.devices()[:1])
    lengths = skewed_lengths(args.rows, args.median, seed=args.seed)
    p_lens = np.random.RandomState(args.seed + 1).randint(8, args.prompt_len + 1, args.rows)
    prompts = forced_prompts(lengths, vocab, 1, p_lens, seed=args.seed)
    sc = SamplingConfig(max_new_tokens=n_new, greedy=True, eos_token_ids=(1,), pad_token_id=0)
    kw = dict(mesh=mesh, batch_size=args.slots, max_prompt_len=args.prompt_len,
              min_prompt_bucket=args.prompt_len)
    sides = {"static": JaxSampler(model, sc, **kw),
             "continuous": ContinuousSampler(model, sc, chunk=args.chunk, min_free=args.min_free,
                                             refill_batch=args.refill_batch, **kw)}
    key = jax.random.key(0)
    for name, s in sides.items():  # warm-up: compile, and check the forced lengths
        out = s.generate(prompts, key)
        if not np.array_equal(out.lengths, lengths):
            raise RuntimeError(f"{name}: lengths differ from the forced ones")
    timing = interleave({name: functools.partial(s.generate, prompts, key)
                         for name, s in sides.items()}, rounds=args.repeat, warmup=0)
    total = int(lengths.sum())
    st_steps, st_util = static_utilisation(lengths, args.slots)
    res: dict[str, Any] = {
        "workload": dict(rows=args.rows, slots=args.slots, median=args.median,
                         max_len=int(lengths.max()), mean_len=float(lengths.mean()),
                         generated_tokens=total, prompt_len_max=args.prompt_len,
                         chunk=sides["continuous"].chunk, model=dict(
                             vocab=vocab, hidden=args.hidden, layers=args.layers)),
        "static": dict(decode_steps=st_steps, slot_utilisation=st_util),
        "continuous": dict(min_free=args.min_free, refill_batch=args.refill_batch,
                           **sides["continuous"].last_stats),
    }
    for name in sides:
        t = timing["sides"][name]
        res[name].update(seconds=t["wall_s"], cpu_seconds=t["cpu_s"],
                         tokens_per_s=total / t["median_s"])
    cmp = compare(timing, "continuous", "static")
    res["order"] = timing["order"]
    res["speedup"] = cmp["ratio_median_of_pairs"]  # tokens/s ratio, median over rounds
    res["speedup_cpu_s"] = cmp["ratio_median_of_pairs_cpu_s"]
    res["pair_ratios"] = cmp["pair_ratios"]
    return res


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m codescaler_jax.bench.rollout",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", default="rollout,update", help="rollout, update or both")
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--median", type=int, default=24)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--chunk", type=int, default=32)
    p.add_argument("--min-free", type=int, default=1, help="ContinuousSampler min_free")
    p.add_argument("--refill-batch", type=int, default=1,
                   help="ContinuousSampler refill_batch: prompts prefilled together")
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--token-budget", type=int, default=1024)
    p.add_argument("--repeat", type=int, default=2,
                   help="interleaved rounds (A B per round) of each comparison")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    add_harness_args(p)
    args = p.parse_args(argv)
    parts = set(args.part.split(","))
    monitor = LoadMonitor()
    payload: dict[str, Any] = {"args": vars(args)}
    if "rollout" in parts:
        payload["rollout"] = _rollout(args)
    if "update" in parts:
        from codescaler_jax.bench.packed_update import run as run_update

        payload["update"] = run_update(args)
    path = write_json("rollout", payload, args.out, monitor=monitor, force=args.force)
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
