"""The update half of ``bench.rollout``: one GRPO train step, padded vs packed, on a skewed batch.

Run it through ``python -m codescaler_jax.bench.rollout --part update``. Both sides take the same
rows (prompts of 8 to ``--prompt-len`` tokens, responses of the rollout workload's log-normal
lengths), the same initial state and the same options, timed after a compiling warm-up call,
interleaved A B A B. Tokens/s counts real (prompt + response) tokens; the packed side is
reported with and without the host-side packing time.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np


def skewed_update_batch(rows: int, prompt_len: int, lengths: np.ndarray, n: int, vocab: int,
                        seed: int = 0) -> dict[str, np.ndarray]:
    """A padded update batch ``[rows, prompt_len + n]`` with responses of ``lengths``."""
    rng = np.random.RandomState(seed)
    p_len = rng.randint(8, prompt_len + 1, rows)
    p_mask = (np.arange(prompt_len)[None] >= prompt_len - p_len[:, None]).astype(np.int32)
    r_mask = (np.arange(n)[None] < lengths[:, None]).astype(np.int32)
    mask = np.concatenate([p_mask, r_mask], 1)
    ids = rng.randint(2, vocab, size=mask.shape).astype(np.int32)
    return {
        "input_ids": np.where(mask == 1, ids, 0).astype(np.int32),
        "attention_mask": mask,
        "response_mask": r_mask,
        "advantages": rng.randn(rows).astype(np.float32),
        "old_logp": (np.log(1 / vocab) + 0.3 * rng.randn(rows, n)).astype(np.float32),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from codescaler_jax.bench.rollout import skewed_lengths
    from codescaler_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM
    from codescaler_jax.models.sharding import MeshConfig, make_mesh
    from codescaler_jax.rl.config import GRPOOptimSection
    from codescaler_jax.rl.grpo import UpdateOptions, make_train_step, per_update_schedule
    from codescaler_jax.rl.losses import PolicyLossConfig
    from codescaler_jax.rl.packing import make_packed_train_step, pack_update_batch
    from codescaler_jax.rm.train_step import (
        init_state,
        make_optimizer,
        make_schedule,
        split_model,
        state_shardings,
    )

    n = 8 * args.median
    cfg = Qwen3Config.tiny(vocab_size=args.vocab, hidden_size=args.hidden,
                           intermediate_size=3 * args.hidden, num_hidden_layers=args.layers,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                           max_position_embeddings=4 * n + 512)
    model = Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0))
    lengths = skewed_lengths(args.rows, args.median, seed=args.seed)
    host = skewed_update_batch(args.rows, args.prompt_len, lengths, n, args.vocab, args.seed)
    loss = PolicyLossConfig()
    opts = UpdateOptions(loss=loss, num_minibatches=2, micro_batches=1)
    optim = GRPOOptimSection(learning_rate=1e-6, warmup_steps=0)
    graphdef, params, rest = split_model(model)
    schedule = make_schedule(optim, 10)
    tx = make_optimizer(optim, per_update_schedule(schedule, opts.num_minibatches))
    mesh = make_mesh(MeshConfig(), devices=jax.devices()[:1])
    state = init_state(params, tx, state_shardings(model, tx, mesh))
    budget = max(args.token_budget, args.prompt_len + n)

    def pack():
        return pack_update_batch(host, num_minibatches=2, token_budget=budget, loss=loss)

    packed, stats = pack()
    sides = {
        "padded": (jax.jit(make_train_step(graphdef, rest, tx, schedule, opts)),
                   {k: jnp.asarray(v) for k, v in host.items()}),
        "packed": (jax.jit(make_packed_train_step(graphdef, rest, tx, schedule, opts)),
                   {k: jnp.asarray(v) for k, v in packed.items()}),
    }
    metrics = {}
    for name, (fn, data) in sides.items():  # compile
        metrics[name] = {k: float(v) for k, v in jax.block_until_ready(fn(state, data)[1]).items()}
    times: dict[str, list[float]] = {k: [] for k in sides}
    pack_s = []
    for _ in range(args.repeat):
        for name, (fn, data) in sides.items():  # A B A B
            t0 = time.perf_counter()
            jax.block_until_ready(fn(state, data))
            times[name].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        pack()
        pack_s.append(time.perf_counter() - t0)
    real = stats["real_tokens"]
    res: dict[str, Any] = {
        "batch": dict(rows=args.rows, prompt_len=args.prompt_len, response_bucket=n,
                      token_budget=budget, mean_response=float(lengths.mean()),
                      max_response=int(lengths.max())),
        "padding": stats,
        "padded": dict(seconds=times["padded"],
                       tokens_per_s=real / float(np.median(times["padded"]))),
        "packed": dict(seconds=times["packed"], pack_seconds=pack_s,
                       tokens_per_s=real / float(np.median(times["packed"])),
                       tokens_per_s_with_packing=real / float(
                           np.median(times["packed"]) + np.median(pack_s))),
        "pg_loss": {k: m["pg_loss"] for k, m in metrics.items()},
    }
    res["speedup"] = res["packed"]["tokens_per_s"] / res["padded"]["tokens_per_s"]
    res["speedup_with_packing"] = (res["packed"]["tokens_per_s_with_packing"]
                                   / res["padded"]["tokens_per_s"])
    return res
