"""SFT warm start of the policy: ``python -m codescaler_jax.train_sft --config FILE``.

    python -m codescaler_jax.train_sft --config configs/sft_tiny.yaml
    python -m codescaler_jax.train_sft --config configs/sft_tiny.yaml --set train.steps=20

Fine-tunes the policy on fenced, chat-formatted passing solutions (canonical + sandbox-checked
rewrites) of the *training* problems of the fixed hash split only, so that a tiny policy
writes code blocks, some right and some wrong, and GRPO has a signal to learn from. Writes
``<run_dir>/hf`` (the policy for ``policy.init_from`` of ``configs/grpo_tiny.yaml``) and
``<run_dir>/data/problems.jsonl`` (the problems trained on: GRPO's ``data.source``); see
``codescaler_jax/sft/trainer.py``. A used run directory is refused unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import sys

from codescaler_jax.cli import guarded
from codescaler_jax.config import load_config


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m codescaler_jax.train_sft", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config (see configs/sft_tiny.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.steps=20 (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="delete the run in run_dir first")
    p.add_argument("--no-progress", action="store_true", help="no progress output")
    return p.parse_args(argv)


@guarded
def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    from codescaler_jax.logging_utils import setup_logging
    from codescaler_jax.sft.config import SFTConfig
    from codescaler_jax.sft.trainer import train_sft

    setup_logging()
    cfg = load_config(SFTConfig, args.config, args.overrides)
    summary = train_sft(cfg, overwrite=args.overwrite, progress=not args.no_progress)
    print(json.dumps({k: summary[k] for k in ("steps", "final_loss", "wall_s", "data")},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
