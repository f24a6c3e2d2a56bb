"""Multi-host start-up: when and how to call ``jax.distributed.initialize``, and host agreement.

A multi-host JAX job runs one Python process per host (TPU VM worker, GPU node or, in tests,
a local process with fake CPU devices). Before anything touches a device, every process calls
``jax.distributed.initialize`` so that ``jax.devices()`` lists the devices of *all* processes
and one mesh spans them. ``initialize(cfg)`` decides whether to do that:

- ``mode="never"``: never (single process).
- ``mode="always"``: always; arguments from the config, else the environment, else JAX's own
  cluster detection (Cloud TPU metadata, SLURM, Open MPI).
- ``mode="auto"`` (default): only when the environment says this is one process of several:
  ``JAX_COORDINATOR_ADDRESS`` set (the explicit GPU form, with ``JAX_NUM_PROCESSES`` and
  ``JAX_PROCESS_ID``), a SLURM step of more than one task, an Open MPI job of more than one
  rank, or a Cloud TPU VM (TPU chips and libtpu present: JAX reads the slice layout from the
  metadata server, and a single-host VM simply gets one process). Config fields override
  the environment.

After start-up every process runs the same program (JAX multi-controller): meshes over
``jax.devices()``, ``jax.make_array_from_process_local_data`` for per-process batches, Orbax
saving and restoring from every process, process 0 alone writing TensorBoard files and
exports. ``assert_shared_directory`` checks, with collectives, that a run directory is the
same filesystem on every host (Orbax checkpoints and the data cache need that).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:  # jax is imported where it is used: configs load without it
    import jax

log = logging.getLogger("codescaler_jax")

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"  # read by JAX itself too
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


@dataclasses.dataclass
class DistributedConfig:
    """How this process joins a multi-host job (the ``distributed:`` config section).

    Attributes:
        mode: ``auto`` (initialize when the environment shows a multi-process launch),
            ``always`` or ``never`` (not on/off: YAML reads those as booleans).
        coordinator_address: ``host:port`` of process 0's coordinator; default from
            ``JAX_COORDINATOR_ADDRESS`` or cluster detection.
        num_processes: number of processes; default from ``JAX_NUM_PROCESSES`` or detection.
        process_id: this process's index in ``[0, num_processes)``; default from
            ``JAX_PROCESS_ID`` or detection.
        initialization_timeout_s: how long to wait for all processes to connect.
        heartbeat_timeout_s: after this long without a heartbeat a process counts as dead and
            the others stop instead of hanging in a collective.
    """

    mode: Literal["auto", "always", "never"] = "auto"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    initialization_timeout_s: int = 300
    heartbeat_timeout_s: int = 100

    def __post_init__(self) -> None:
        if self.num_processes is not None and self.num_processes < 1:
            raise ValueError(f"distributed.num_processes must be >= 1, got {self.num_processes}")
        if self.process_id is not None and self.process_id < 0:
            raise ValueError(f"distributed.process_id must be >= 0, got {self.process_id}")
        if (
            self.num_processes is not None
            and self.process_id is not None
            and self.process_id >= self.num_processes
        ):
            raise ValueError(
                f"distributed.process_id={self.process_id} is not below "
                f"distributed.num_processes={self.num_processes}"
            )


def _env_int(name: str, env: dict[str, str]) -> int | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def _tpu_vm_present() -> bool:
    # TPU chips on the PCI bus (what JAX itself checks; a Google vendor id alone would also
    # match gVNIC network cards) and libtpu installed. Reads /sys only: no backend starts.
    if importlib.util.find_spec("libtpu") is None:
        return False
    try:
        from jax._src import hardware_utils  # no public equivalent in jax 0.10

        return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except Exception:  # noqa: BLE001 - a detection failure means "not a TPU VM"
        return False


def detect_launcher(env: dict[str, str] | None = None) -> str | None:
    """Which multi-process launch the environment shows: ``explicit``, ``slurm``, ``ompi``,
    ``tpu_vm``, or None (a plain single process)."""
    env = dict(os.environ if env is None else env)
    if env.get(ENV_COORDINATOR):
        return "explicit"
    # Inside an `srun` step (the step node list is what JAX reads the coordinator from).
    slurm_step = all(k in env for k in ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_STEP_NODELIST"))
    if slurm_step and (_env_int("SLURM_NTASKS", env) or 1) > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in env and (_env_int("OMPI_COMM_WORLD_SIZE", env) or 1) > 1:
        return "ompi"
    if _tpu_vm_present():
        return "tpu_vm"
    return None


def initialize_kwargs(
    cfg: DistributedConfig, env: dict[str, str] | None = None
) -> dict[str, object] | None:
    """The ``jax.distributed.initialize`` keyword arguments ``cfg`` and the environment ask for,
    or None when this process should stay single-process. Pure: no JAX calls."""
    env = dict(os.environ if env is None else env)
    if cfg.mode == "never":
        return None
    launcher = detect_launcher(env)
    explicit = cfg.coordinator_address is not None or cfg.num_processes is not None
    if cfg.mode == "auto" and launcher is None and not explicit:
        return None
    kwargs: dict[str, object] = {
        "coordinator_address": cfg.coordinator_address or env.get(ENV_COORDINATOR) or None,
        "num_processes": cfg.num_processes
        if cfg.num_processes is not None
        else _env_int(ENV_NUM_PROCESSES, env),
        "process_id": cfg.process_id
        if cfg.process_id is not None
        else _env_int(ENV_PROCESS_ID, env),
        "initialization_timeout": cfg.initialization_timeout_s,
        "heartbeat_timeout_seconds": cfg.heartbeat_timeout_s,
    }
    # Without a cluster to detect the rest from, JAX would fail deep inside its detection
    # code; say here which setting is missing.
    if launcher in (None, "explicit"):
        missing = [
            name
            for name, key in (
                ("distributed.coordinator_address", "coordinator_address"),
                ("distributed.num_processes", "num_processes"),
                ("distributed.process_id", "process_id"),
            )
            if kwargs[key] is None
        ]
        if missing:
            raise ValueError(
                f"multi-host start-up needs {', '.join(missing)} (set in the config or via "
                f"{ENV_COORDINATOR} / {ENV_NUM_PROCESSES} / {ENV_PROCESS_ID}); no SLURM, "
                "Open MPI or Cloud TPU environment was detected to supply them"
            )
    return kwargs


def is_initialized() -> bool:
    """Whether ``jax.distributed.initialize`` has run in this process."""
    from jax._src import distributed as _dist  # no public query exists in jax 0.10

    return _dist.global_state.client is not None


def initialize(cfg: DistributedConfig | None = None, env: dict[str, str] | None = None) -> bool:
    """Join the multi-host job if ``cfg`` / the environment ask for it; True if initialized.

    Must run before any other JAX call that starts a backend (``jax.devices()``, a jit, even
    ``jax.process_index()``). Calling it again after a successful initialization is a no-op.

    Raises:
        RuntimeError: initialization is asked for but a JAX backend already started.
        ValueError: a coordinator address without the process count or index.
    """
    import jax

    cfg = cfg or DistributedConfig()
    if is_initialized():
        return True
    kwargs = initialize_kwargs(cfg, env)
    if kwargs is None:
        return False
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        raise RuntimeError(
            "multi-host initialization was asked for (distributed.mode="
            f"{cfg.mode}, launcher {detect_launcher(env)}) but a JAX backend already started: "
            "call codescaler_jax.distributed.initialize before any other JAX call"
        )
    jax.distributed.initialize(**{k: v for k, v in kwargs.items() if v is not None})
    log.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def all_processes_agree(flag: bool) -> bool:
    """True only if ``flag`` is true on every process (a collective: every process calls it)."""
    import jax

    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray([int(bool(flag))], np.int32))
    return bool(np.all(flags))


def assert_shared_directory(path: str | os.PathLike) -> None:
    """Check that ``path`` is one filesystem seen by every process (raise on all if not).

    Process 0 writes a random token; every process reads it back. Orbax checkpoints (each
    process writes its own shards) and the run's data cache need such a directory: on TPU VMs
    a gcsfuse mount or NFS/Filestore, on GPU clusters the shared home or scratch.
    """
    import jax

    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    path = Path(path)
    marker = path / ".shared_check"
    token = secrets.randbits(31) if jax.process_index() == 0 else 0
    token = int(multihost_utils.broadcast_one_to_all(np.asarray(token, np.int32)))
    if jax.process_index() == 0:
        path.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(token))
    # Fixed names: the barrier must match on every process even when the paths differ.
    multihost_utils.sync_global_devices("codescaler_jax.shared_dir.written")
    try:
        seen = int(marker.read_text())
    except (OSError, ValueError):
        seen = None
    ok = all_processes_agree(seen == token)
    multihost_utils.sync_global_devices("codescaler_jax.shared_dir.read")
    if jax.process_index() == 0:
        marker.unlink(missing_ok=True)
    if not ok:
        raise RuntimeError(
            f"{path} is not the same directory on all {jax.process_count()} processes "
            f"(process {jax.process_index()} read {seen!r}): put run_dir on a filesystem every "
            "host shares (gcsfuse mount, NFS/Filestore, a cluster's shared scratch)"
        )


# ---- per-process rows of global batches ---------------------------------------------------
# A multi-host step gives every process its own rows of the global batch (its prompts, its
# responses). These helpers move such rows onto the mesh and back, and agree on the few host
# figures the processes must share (padded lengths, counts, metrics).


def rows_to_global(sharding: Any, rows: np.ndarray) -> jax.Array:
    """A global array, batch-sharded on dimension 0, from this process's ``rows``.

    Every process passes the same number of rows; the global batch holds process 0's rows
    first on a process-major mesh (``make_mesh`` over ``jax.devices()``). One process: the
    rows are the whole batch (``jax.device_put``)."""
    import jax

    if jax.process_count() == 1:
        return jax.device_put(rows, sharding)
    shape = (rows.shape[0] * jax.process_count(), *rows.shape[1:])
    return jax.make_array_from_process_local_data(sharding, rows, shape)


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a global array batch-sharded on dimension 0: its addressable
    shards in row order, replicas (e.g. over ``tensor``) once. The inverse of
    `rows_to_global`; nothing crosses processes."""
    import jax

    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    by_start: dict[int, Any] = {}
    for s in x.addressable_shards:
        start = (s.index[0].start or 0) if s.index else 0
        by_start.setdefault(start, s)
    return np.concatenate([np.asarray(by_start[k].data) for k in sorted(by_start)])


def gather_rows(x: np.ndarray) -> np.ndarray:
    """Every process's ``x`` concatenated on dimension 0, in process order (a collective;
    the shapes must agree). One process: ``x``."""
    import jax

    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def global_max(values: Any) -> np.ndarray:
    """Elementwise maximum of ``values`` (a number or an int/float array of one shape on
    every process) over all processes (a collective)."""
    a = np.asarray(values)
    return gather_rows(a[None]).max(axis=0)


def gather_json(obj: Any) -> list[Any]:
    """``obj`` (anything ``json`` writes) of every process, in process order (a collective).
    One process: ``[obj]``."""
    import jax

    if jax.process_count() == 1:
        return [obj]
    import json

    raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    buf = np.zeros(int(global_max(raw.size)), np.uint8)
    buf[: raw.size] = raw
    sizes = gather_rows(np.asarray([raw.size], np.int64))
    bufs = gather_rows(buf[None])
    return [json.loads(bytes(b[:n])) for b, n in zip(bufs, sizes, strict=True)]
