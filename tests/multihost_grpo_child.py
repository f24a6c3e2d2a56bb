"""Child process for the multi-host GRPO tests: ``python -m codescaler_jax.train_grpo`` plus a
record of what this process's rows were at every step.

    python tests/multihost_grpo_child.py RECORD_DIR -- <train_grpo arguments>

The parent sets the environment (``JAX_PLATFORMS=cpu``, the fake device count in
``XLA_FLAGS``, and for multi-process runs ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
``JAX_PROCESS_ID``), so the CLI's own start-up path (``codescaler_jax.distributed``) joins the
processes. ``RECORD_DIR/steps.p<process>.json`` holds, per step run: this process's prompt
indices, response token ids, rewards and advantages, the step's (global) metrics, and the rows
each packed update of this process received (``packed_rows``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> int:
    record_dir = Path(sys.argv[1])
    assert sys.argv[2] == "--"
    argv = sys.argv[3:]

    import jax
    import numpy as np

    import codescaler_jax.rl.trainer as trainer_mod
    from codescaler_jax import train_grpo
    from codescaler_jax.code.extract import extract_batch
    from codescaler_jax.rl.rewards import REWARDS, RewardResult

    @REWARDS.register("test_odd_tokens")
    def _odd_tokens(section, mesh):
        """The fraction of odd token ids: differs within a group even when no response holds
        code, so every step has non-zero advantages and really moves the policy."""

        def fn(batch):
            r = np.array([np.mean(np.asarray(ids) % 2) for ids in batch.response_ids],
                         np.float32)
            return RewardResult(r, extract_batch(batch.responses, mode="train"), None, None, {})

        return fn

    import codescaler_jax.rl.packing as packing_mod

    steps: list[dict] = []
    advantages: list[list[float]] = []
    packed_rows: list[int] = []  # rows each packing call of this process received
    original_pack = packing_mod.pack_update_batch

    def pack(batch, **kw):
        packed_rows.append(len(batch["response_mask"]))
        return original_pack(batch, **kw)

    packing_mod.pack_update_batch = pack
    original_call = trainer_mod.RolloutStep.__call__
    original_build = trainer_mod.GRPOTrainer.build_programs

    def build_programs(self, *args, **kwargs):
        prog = original_build(self, *args, **kwargs)
        adv_fn = prog.advantages_fn

        def recording(rewards, **kw):
            out = adv_fn(rewards, **kw)
            advantages.append(np.asarray(out).tolist())
            return out

        prog.advantages_fn = recording
        return prog

    def call(self, state, idx, key):
        state, last, rollout, res = original_call(self, state, idx, key)
        adv = advantages[-1]
        if len(adv) != len(res.rewards):  # scale_rewards=batch: the whole step's; keep mine
            n = len(res.rewards)
            adv = adv[jax.process_index() * n : (jax.process_index() + 1) * n]
        steps.append({
            "prompts": [int(i) for i in idx],
            "tokens": [list(map(int, t)) for t in rollout.response_ids],
            "rewards": [float(x) for x in res.rewards],
            "advantages": adv,
            "metrics": {k: float(v) for k, v in last.items()},
            "packed_rows": list(packed_rows),
        })
        packed_rows.clear()
        return state, last, rollout, res

    trainer_mod.GRPOTrainer.build_programs = build_programs
    trainer_mod.RolloutStep.__call__ = call
    rc = train_grpo.main(argv)
    record_dir.mkdir(parents=True, exist_ok=True)
    info = {
        "rc": rc,
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "local_devices": jax.local_device_count(),
        "global_devices": jax.device_count(),
        "steps": steps,
    }
    (record_dir / f"steps.p{jax.process_index()}.json").write_text(json.dumps(info))
    return rc


if __name__ == "__main__":
    sys.exit(main())
