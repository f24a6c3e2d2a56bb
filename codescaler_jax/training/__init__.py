"""Training parts shared by the RM trainer and the GRPO trainer.

- ``topology``: TPU slice names (as gcloud spells accelerator types) -> chips, topology
  string, HBM and bf16 peak per chip, and the devices of that slice for ahead-of-time compiles.
- ``report``: compile a program (for fake CPU devices or a real TPU slice) and report its
  per-device memory against the chip's HBM, XLA's cost estimate, the analytic MFU and the
  compile time; a program the compiler refuses is reported, not raised.
- ``fit``: when a program does not fit, find the smallest change that does (more
  micro-batches, stronger remat, a bigger slice) and compile it to show that it fits.
- ``dry_run``: the dry run ``train_rm`` and ``train_grpo`` share (builders, ``--topology``,
  ``--json``); ``abstract``: shape-only train states and batches for it.

- ``run_dir``: run-directory creation, refusal (``--resume`` / ``--overwrite``) and resume checks.

``python -m codescaler_jax.bench.fit_table`` builds the README's "Will it fit?" table on these.
"""
