"""Benchmark: rollout decode speed of the JAX sampler vs ``transformers`` ``generate``, and where
the time of a GRPO step goes (rollout / reward / update) for ``configs/grpo_tiny.yaml``.

    python -m codescaler_jax.bench.sampler [--batch 8] [--prompt-len 64] [--new-tokens 128]
                                           [--grpo-steps 4] [--out bench_results/sampler.json]

Decode: the same random Qwen3 weights (a ``transformers`` model saved with ``save_pretrained``
and loaded through our HF I/O) generate ``--new-tokens`` tokens for ``--batch`` prompts of
``--prompt-len`` tokens in both frameworks, in this process, greedy and with the reference's
sampling (temperature 0.6, top-p 0.95, top-k 20); EOS is disabled so both produce exactly the
same number of tokens. Each timed call includes putting prompts on the device and fetching the
results; compilation (JAX) and the first call (torch) are excluded as warm-up. The sides run
interleaved (ours, torch, torch on one thread, ours, ... ``--repeat`` rounds). Reported:
generated tokens/s (batch x new tokens / seconds, median of the rounds) and the speed-up (the
median of the per-round ratios, ``codescaler_jax.bench.common``),
against torch with its default threads and against torch on one thread (on a busy 2-core
machine torch's threads thrash and the single-thread run is many times faster).

GRPO step: ``--grpo-steps`` steps of the tiny config (RM: ``runs/rm_tiny`` if it exists, else a
random RM of the same architecture, as recorded in the JSON); the mean time of each phase
over the steps after the first (which compiles). Run twice: as configured (the random tiny
policy writes no code, so nothing reaches the RM or the sandbox) and with every response sent
to the RM.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from codescaler_jax.bench.common import (
    LoadMonitor,
    add_harness_args,
    compare,
    interleave,
    require_torch,
    write_json,
)

require_torch("bench.sampler")  # before any work: the comparison needs torch

# Two policy shapes with the real Qwen3 vocabulary (the LM head is a large share of the work).
SHAPES = {
    "grpo_tiny_policy": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    "small_4L_256": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=32),
}
MODES = {
    "greedy": dict(greedy=True),
    "T0.6_p0.95_k20": dict(temperature=0.6, top_p=0.95, top_k=20),
}


def _hf_model(shape: dict[str, int], seed: int = 0):
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.Qwen3Config(vocab_size=151936, tie_word_embeddings=True, pad_token_id=0,
                                   rms_norm_eps=1e-6, **shape)
    return transformers.Qwen3ForCausalLM(cfg).eval()


def bench_decode(shape_name: str, *, batch: int, prompt_len: int, new_tokens: int,
                 repeat: int) -> list[dict[str, Any]]:
    """Tokens/s of ours and of ``transformers`` for each sampling mode of one model shape."""
    import jax

    from codescaler_jax.models.hf_io import load_hf_model
    from codescaler_jax.models.qwen3 import Qwen3ForCausalLM
    from codescaler_jax.models.sharding import make_mesh

    hf = _hf_model(SHAPES[shape_name])
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        mesh = make_mesh(devices=jax.devices()[:1])
        ours = load_hf_model(d, Qwen3ForCausalLM, mesh=mesh)
    prompts = np.random.RandomState(0).randint(1, 151000, size=(batch, prompt_len))
    return [
        {"shape": shape_name, **_bench_mode(ours, hf, mesh, prompts, mode, new_tokens, repeat)}
        for mode in MODES
    ]


def _bench_mode(ours, hf, mesh, prompts: np.ndarray, mode: str, new_tokens: int,
                repeat: int) -> dict[str, Any]:
    import jax
    import torch

    from codescaler_jax.generate.sampler import JaxSampler, SamplingConfig

    knobs = MODES[mode]
    batch, prompt_len = prompts.shape
    cfg = SamplingConfig(max_new_tokens=new_tokens, pad_token_id=0, **knobs)
    sampler = JaxSampler(ours, cfg, mesh=mesh, batch_size=batch, max_prompt_len=prompt_len,
                         min_prompt_bucket=prompt_len)
    calls = iter(range(10**6))

    def run_ours():
        out = sampler.generate(prompts.tolist(), jax.random.key(next(calls)))
        assert out.tokens.shape == (batch, new_tokens) and out.lengths.min() == new_tokens

    greedy = knobs.get("greedy", False)
    gen_kw = dict(do_sample=not greedy, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                  eos_token_id=None, pad_token_id=0)
    if not greedy:
        gen_kw.update(temperature=knobs["temperature"], top_p=knobs["top_p"],
                      top_k=knobs["top_k"])
    ids = torch.tensor(prompts, dtype=torch.long)

    def run_hf():
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **gen_kw)
        assert out.shape == (batch, prompt_len + new_tokens)

    n = batch * new_tokens
    # torch's default (one thread per core) is the like-for-like baseline; on a shared machine
    # its threads can thrash, so a single-thread run is measured too and reported beside it.
    # All sides run interleaved (ours, torch, torch 1-thread, ours, ...).
    default_threads = torch.get_num_threads()

    def run_hf_1thread():
        torch.set_num_threads(1)
        try:
            run_hf()
        finally:
            torch.set_num_threads(default_threads)

    sides = {"ours": run_ours, "transformers": run_hf}
    if default_threads > 1:
        sides["transformers_1thread"] = run_hf_1thread
    timing = interleave(sides, rounds=repeat, warmup=1)
    t_ours = timing["sides"]["ours"]
    row = {"mode": mode, "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
           "ours_tokens_per_s": n / t_ours["median_s"], "ours_s": t_ours,
           "order": timing["order"]}
    for label in ("", "_1thread"):
        name = f"transformers{label}"
        if name not in sides:
            continue
        t_hf = timing["sides"][name]
        row[f"{name}_tokens_per_s"] = n / t_hf["median_s"]
        row[f"speedup{label}"] = compare(timing, "ours", name)["ratio_median_of_pairs"]
        row[f"{name}_s"] = t_hf
    return row


def bench_grpo_phases(steps: int, rm_path: str | None,
                      overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """Mean seconds per phase of a tiny-config GRPO step (after the first, compiling step)."""
    from flax import nnx

    from codescaler_jax.config import load_config
    from codescaler_jax.data.tokenizer import qwen3_tokenizer_dir
    from codescaler_jax.models.hf_io import save_hf_model
    from codescaler_jax.models.qwen3 import Qwen3Config, Qwen3RewardModel
    from codescaler_jax.rl.config import GRPOConfig
    from codescaler_jax.rl.trainer import GRPOTrainer

    with tempfile.TemporaryDirectory() as d:
        rm_note = rm_path
        if rm_path is None or not Path(rm_path).exists():
            # The rm_tiny architecture with random weights: the same cost as the trained RM.
            from codescaler_jax.rm.config import RMTrainConfig
            from codescaler_jax.rm.trainer import model_config

            rm_cfg = load_config(RMTrainConfig, "configs/rm_tiny.yaml")
            mcfg: Qwen3Config = model_config(rm_cfg, 151669, 151643)
            rm_path = os.path.join(d, "rm")
            save_hf_model(Qwen3RewardModel(mcfg, rngs=nnx.Rngs(0)), rm_path,
                          tokenizer_dir=qwen3_tokenizer_dir())
            rm_note = "random weights, configs/rm_tiny.yaml architecture (runs/rm_tiny missing)"
        cfg = load_config(GRPOConfig, "configs/grpo_tiny.yaml", [
            f"run_dir={os.path.join(d, 'run')}", f"reward.rm_path={rm_path}",
            f"train.steps={steps}", "train.save_every=0", "train.export_hf=false", *overrides,
        ])
        summary = GRPOTrainer(cfg, progress=False).run()
    phases = summary["time_per_phase_s_after_first_step"]
    total = sum(phases.values())
    return {
        "config": "configs/grpo_tiny.yaml", "overrides": list(overrides), "rm": rm_note,
        "steps": steps,
        "responses_per_step": cfg.rollout.num_prompts * cfg.rollout.num_generations,
        "seconds_per_step": phases, "share": {k: v / total for k, v in phases.items()},
        "first_step_s": {k: summary["time_per_phase_s"][k] * steps - phases[k] * (steps - 1)
                         for k in phases},
        "valid_code_fraction_last_step": summary["last"]["valid_code_fraction"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m codescaler_jax.bench.sampler",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeat", type=int, default=5, help="interleaved rounds")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--grpo-steps", type=int, default=4, help="0 skips the GRPO phase split")
    p.add_argument("--rm-path", default="runs/rm_tiny")
    p.add_argument("--out", default=None)
    add_harness_args(p)
    args = p.parse_args(argv)

    import torch

    t0 = time.perf_counter()
    monitor = LoadMonitor()  # other work on a shared machine skews both columns
    rows = []
    for shape in args.shapes:
        rows += bench_decode(shape, batch=args.batch, prompt_len=args.prompt_len,
                             new_tokens=args.new_tokens, repeat=args.repeat)
    print(f"{'shape':<18} {'mode':<16} {'ours tok/s':>11} {'HF tok/s':>10} {'speedup':>8} "
          f"{'HF 1-thr':>9} {'speedup':>8}")
    for r in rows:
        print(f"{r['shape']:<18} {r['mode']:<16} {r['ours_tokens_per_s']:>11.0f} "
              f"{r['transformers_tokens_per_s']:>10.0f} {r['speedup']:>7.1f}x "
              f"{r.get('transformers_1thread_tokens_per_s', float('nan')):>9.0f} "
              f"{r.get('speedup_1thread', float('nan')):>7.1f}x")
    grpo = {}
    if args.grpo_steps > 1:
        # As configured, a random tiny policy writes no code block, so no response reaches the
        # RM or the sandbox; the second run sends every response to the RM (the shaping that
        # scores "no code" too) to show the cost of RM scoring in the step.
        runs = {"as_configured": (), "every_response_rm_scored": ("reward.shaping=raw_unguarded",)}
        for name, overrides in runs.items():
            grpo[name] = bench_grpo_phases(args.grpo_steps, args.rm_path, overrides)
            print(f"\nGRPO step, configs/grpo_tiny.yaml, {name} (mean over steps after the first):")
            for k, v in grpo[name]["seconds_per_step"].items():
                print(f"  {k:<8} {v:7.2f} s  {100 * grpo[name]['share'][k]:5.1f} %")
    payload = {
        "decode": rows, "grpo_tiny_step": grpo or None,
        "torch_threads": torch.get_num_threads(), "wall_s": time.perf_counter() - t0,
        "argv": sys.argv[1:] if argv is None else argv,
    }
    path = write_json("sampler", payload, args.out, monitor=monitor, force=args.force)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
