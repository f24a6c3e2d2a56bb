"""Test-session set-up: 8 fake CPU devices and no network, fixed before JAX is imported.

Every test sees 8 CPU devices; tests that want one device build a mesh over
``jax.devices()[:1]``. With 4+ fake devices on a 2-core machine, independent jitted calls
with collectives must be waited on one by one (``block_until_ready``) or XLA may deadlock.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
