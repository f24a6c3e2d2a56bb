"""Checkpoint resharding: an RM train state saved on one mesh restores onto another mesh shape
and device count (Orbax with target shardings, as ``RMTrainer`` resumes) with identical values,
and training continues with the same loss. The cross-process version (two processes writing,
one reading) is in ``test_multihost.py``."""

from __future__ import annotations

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from codescaler_jax.models.qwen3 import Qwen3Config, Qwen3RewardModel
from codescaler_jax.models.sharding import MeshConfig, create_sharded, make_mesh
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

OPTIM = OptimSection(learning_rate=1e-2, warmup_steps=0, schedule="constant", eps=1e-3)


def _batch(b: int = 8, length: int = 24, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for side in ("chosen", "rejected"):
        lens = rng.integers(5, length + 1, size=b)
        mask = (np.arange(length)[None] < lens[:, None]).astype(np.int32)
        out[f"{side}_ids"] = np.where(mask, rng.integers(2, 256, size=(b, length)), 0).astype(
            np.int32
        )
        out[f"{side}_mask"] = mask
    return out


def _setup(mesh):
    """(jitted train step, fresh state, state shardings) of the tiny RM on ``mesh``."""
    cfg = Qwen3Config.tiny(num_hidden_layers=1)
    model = create_sharded(lambda: Qwen3RewardModel(cfg, rngs=nnx.Rngs(0)), mesh)
    graphdef, params, rest = split_model(model)
    sched = make_schedule(OPTIM, 10)
    tx = make_optimizer(OPTIM, sched)
    sh = state_shardings(model, tx, mesh)
    state = init_state(params, tx, sh)
    step = jax.jit(
        make_train_step(graphdef, rest, tx, sched, StepOptions()), out_shardings=(sh, None)
    )
    return step, state, sh


def _save(directory, state) -> None:
    with ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(create=True)
    ) as mngr:
        mngr.save(
            1,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({"step": 1})
            ),
        )
        mngr.wait_until_finished()


def _restore(directory, like, shardings):
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), like, shardings
    )
    with ocp.CheckpointManager(directory) as mngr:
        out = mngr.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    return out["state"]


def _device_count(x: jax.Array) -> int:
    return len(x.sharding.device_set)


@pytest.mark.parametrize(
    "save_mesh, load_mesh",
    [
        ((MeshConfig(data=1, fsdp=4, tensor=2), 8), (MeshConfig(data=2, fsdp=1, tensor=1), 2)),
        pytest.param(
            (MeshConfig(data=2, fsdp=1, tensor=1), 2),
            (MeshConfig(data=1, fsdp=2, tensor=4), 8),
            marks=pytest.mark.slow,
        ),
    ],
    ids=["8dev_fsdp4_tp2_to_2dev_dp2", "2dev_dp2_to_8dev_fsdp2_tp4"],
)
def test_checkpoint_restores_on_another_mesh_and_trains_on(tmp_path, save_mesh, load_mesh):
    (cfg_a, n_a), (cfg_b, n_b) = save_mesh, load_mesh
    mesh_a = make_mesh(cfg_a, jax.devices()[:n_a])
    mesh_b = make_mesh(cfg_b, jax.devices()[:n_b])
    step_a, state_a, _ = _setup(mesh_a)
    step_b, fresh_b, sh_b = _setup(mesh_b)

    with jax.set_mesh(mesh_a):
        state_a, _ = step_a(state_a, _batch(seed=1))  # a non-trivial optimizer state
        jax.block_until_ready(state_a)
    saved = jax.device_get(state_a)
    _save(tmp_path / "ckpt", state_a)

    restored = _restore(tmp_path / "ckpt", fresh_b, sh_b)
    for got, want_sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(sh_b)):
        assert got.sharding.is_equivalent_to(want_sharding, got.ndim)
        assert _device_count(got) <= n_b
    # the parameters are really split differently on the two meshes
    shards_a = [x.sharding.shard_shape(x.shape) for x in jax.tree.leaves(state_a["params"])]
    shards_b = [x.sharding.shard_shape(x.shape) for x in jax.tree.leaves(restored["params"])]
    assert shards_a != shards_b
    exact = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), saved, jax.device_get(restored))
    assert all(jax.tree.leaves(exact))

    batch = _batch(seed=2)
    with jax.set_mesh(mesh_a):
        next_a, m_a = step_a(state_a, batch)
        jax.block_until_ready(next_a)
    with jax.set_mesh(mesh_b):
        next_b, m_b = step_b(restored, batch)
        jax.block_until_ready(next_b)
    assert abs(float(m_a["loss_sum"]) - float(m_b["loss_sum"])) < 1e-5
    assert int(next_a["step"]) == int(next_b["step"]) == 2
    diffs = jax.tree.map(
        lambda a, b: float(np.max(np.abs(a - b))),
        jax.device_get(next_a["params"]),
        jax.device_get(next_b["params"]),
    )
    assert max(jax.tree.leaves(diffs)) < 1e-5
    moved = jax.tree.map(
        lambda a, b: float(np.max(np.abs(a - b))), saved["params"], jax.device_get(next_b["params"])
    )
    assert max(jax.tree.leaves(moved)) > 1e-4
