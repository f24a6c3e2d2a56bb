"""RM train step: ours (jit, Bradley-Terry, AdamW) beside a PyTorch ``transformers`` BT step.

    python -m codescaler_jax.bench.train_rm [--hidden 512 --layers 8 --seq 512 --pairs 4]
    python -m codescaler_jax.bench.train_rm --small

Both sides build the same Qwen3 RM (float32, random weights), take the same batch of
``pairs`` (chosen, rejected) right-padded sequences in one forward pass of ``2 * pairs`` rows,
compute ``-log sigmoid(r+ - r-)``, backpropagate, clip the gradient norm to 1 and take an
AdamW step (lr 1e-5, weight decay 0.01). Steps alternate between the two sides so that both
see the same machine load. Reported: tokens/s (padded tokens processed), step time, and MFU
against the matmul peak measured in the same run (``codescaler_jax.perf``).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from codescaler_jax.bench.common import require_torch

require_torch("bench.train_rm")  # before any work: the comparison needs torch


def _args(argv):
    p = argparse.ArgumentParser(
        prog="python -m codescaler_jax.bench.train_rm", description=__doc__.split("\n")[0]
    )
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--pairs", type=int, default=4, help="pairs per step (2x rows)")
    p.add_argument("--repeat", type=int, default=4)
    p.add_argument("--small", action="store_true", help="hidden 256, 4 layers, seq 256")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.small:
        a.hidden, a.layers, a.heads, a.kv_heads, a.seq = 256, 4, 4, 2, 256
    return a


def main(argv=None) -> int:
    a = _args(argv)
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from codescaler_jax.bench.common import write_json
    from codescaler_jax.models.qwen3 import Qwen3Config, Qwen3RewardModel
    from codescaler_jax.models.sharding import MeshConfig, create_sharded, make_mesh
    from codescaler_jax.perf import measure_matmul_peak, train_flops_per_token
    from codescaler_jax.rm.config import OptimSection
    from codescaler_jax.rm.train_step import (
        StepOptions,
        init_state,
        make_optimizer,
        make_schedule,
        make_train_step,
        split_model,
        state_shardings,
    )

    cfg = Qwen3Config.tiny(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=3 * a.hidden,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        head_dim=a.head_dim,
        max_position_embeddings=max(a.seq, 512),
        pad_token_id=0,
    )
    rng = np.random.default_rng(0)
    B, L = a.pairs, a.seq
    lens = rng.integers(L // 2, L + 1, size=2 * B)
    lens[0] = L
    mask = (np.arange(L)[None] < lens[:, None]).astype(np.int32)
    ids = np.where(mask, rng.integers(1, a.vocab, size=(2 * B, L)), 0).astype(np.int32)
    batch = {
        "chosen_ids": ids[:B],
        "chosen_mask": mask[:B],
        "rejected_ids": ids[B:],
        "rejected_mask": mask[B:],
    }

    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
    model = create_sharded(lambda: Qwen3RewardModel(cfg, rngs=nnx.Rngs(0)), mesh)
    optim = OptimSection(
        learning_rate=1e-5,
        warmup_steps=0,
        schedule="constant",
        weight_decay=0.01,
        max_grad_norm=1.0,
    )
    sched = make_schedule(optim, 100)
    tx = make_optimizer(optim, sched)
    sh = state_shardings(model, tx, mesh)
    graphdef, params, rest = split_model(model)
    state = init_state(params, tx, sh)
    step = jax.jit(
        make_train_step(graphdef, rest, tx, sched, StepOptions()),
        out_shardings=(sh, None),
        donate_argnums=(0,),
    )
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}

    ours_times, torch_times = [], []
    with jax.set_mesh(mesh):
        state, m = step(state, jbatch)  # compile
        jax.block_until_ready(m)

        def run_ours():
            nonlocal state
            t0 = time.perf_counter()
            state, m = step(state, jbatch)
            jax.block_until_ready(m["loss_sum"])
            ours_times.append(time.perf_counter() - t0)

        torch_step = None
        if not a.skip_torch:
            import torch
            from transformers import Qwen3Config as HFConfig
            from transformers import Qwen3ForSequenceClassification

            torch.manual_seed(0)
            # The same architecture as ours, from our own config (rope theta and eps included).
            hf = Qwen3ForSequenceClassification(
                HFConfig(
                    **cfg.to_hf_dict("Qwen3ForSequenceClassification"),
                    attn_implementation="sdpa",
                )
            )
            hf.train()
            opt = torch.optim.AdamW(hf.parameters(), lr=1e-5, weight_decay=0.01)
            t_ids, t_mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask)

            def torch_step():
                t0 = time.perf_counter()
                s = hf(input_ids=t_ids, attention_mask=t_mask).logits[:, 0]
                loss = -torch.nn.functional.logsigmoid(s[:B] - s[B:]).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
                opt.step()
                torch_times.append(time.perf_counter() - t0)

            torch_step()  # warm-up
            torch_times.clear()
        for _ in range(a.repeat):
            run_ours()
            if torch_step is not None:
                torch_step()

    peak = measure_matmul_peak(n=2048, repeat=3)
    tokens = 2 * B * L
    fpt = train_flops_per_token(
        hidden=a.hidden,
        intermediate=3 * a.hidden,
        layers=a.layers,
        heads=a.heads,
        kv_heads=a.kv_heads,
        head_dim=a.head_dim,
        seq_len=L,
    )
    ours_t = float(np.median(ours_times))
    res = {
        "config": vars(a),
        "tokens_per_step": tokens,
        "flops_per_step": fpt * tokens,
        "matmul_peak_flops": peak,
        "ours": {
            "step_s": ours_t,
            "tokens_per_s": tokens / ours_t,
            "mfu": fpt * tokens / ours_t / peak,
            "all_s": ours_times,
        },
    }
    mfu = res["ours"]["mfu"]
    line = f"ours : {ours_t * 1e3:8.1f} ms/step  {tokens / ours_t:10.0f} tok/s  MFU {mfu:.1%}"
    if torch_times:
        torch_t = float(np.median(torch_times))
        res["torch"] = {
            "step_s": torch_t,
            "tokens_per_s": tokens / torch_t,
            "mfu": fpt * tokens / torch_t / peak,
            "all_s": torch_times,
            "threads": __import__("torch").get_num_threads(),
        }
        res["speedup_vs_torch"] = torch_t / ours_t
        line += (
            f"\ntorch: {torch_t * 1e3:8.1f} ms/step  {tokens / torch_t:10.0f} tok/s  "
            f"MFU {res['torch']['mfu']:.1%}\nratio ours/torch throughput: "
            f"{res['speedup_vs_torch']:.2f}x"
        )
    print(line)
    path = write_json("train_rm", res, a.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
