"""Child process for the multi-host tests: ``python -m codescaler_jax.train_rm`` plus a record
of which pair indices this process was fed.

    python tests/multihost_child.py RECORD_DIR -- <train_rm arguments>

The parent sets the environment (``JAX_PLATFORMS=cpu``, the fake device count in
``XLA_FLAGS``, and for multi-process runs ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
``JAX_PROCESS_ID``), so the CLI's own start-up path (``codescaler_jax.distributed``) is what
joins the processes. ``RECORD_DIR/indices.p<process>.json`` maps each batch position to the pair
indices of the rows this process built for it.
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

    import codescaler_jax.rm.trainer as trainer_mod
    from codescaler_jax import train_rm

    seen: dict[int, list[int]] = {}  # batch position -> pair indices (prefetch may run ahead)
    original = trainer_mod.pair_batches

    def recording_pair_batches(*args, **kwargs):
        ds = original(*args, **kwargs)

        def record(position, batch):
            seen[int(position)] = [int(i) for i in batch["index"]]
            return batch

        return ds.map_with_index(record)

    trainer_mod.pair_batches = recording_pair_batches
    rc = train_rm.main(argv)
    record_dir.mkdir(parents=True, exist_ok=True)
    info = {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "local_devices": jax.local_device_count(),
        "global_devices": jax.device_count(),
        "batches": {str(k): v for k, v in sorted(seen.items())},
    }
    (record_dir / f"indices.p{jax.process_index()}.json").write_text(json.dumps(info))
    return rc


if __name__ == "__main__":
    sys.exit(main())
