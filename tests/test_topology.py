"""Dry runs compiled for real TPU slices with the TPU compiler (libtpu, the ``tpu`` extra).

No TPU is needed: the compiler describes a slice's devices and compiles for them on this CPU
machine. Shapes are tiny because a TPU compile of even a small train step takes seconds.
"""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from codescaler_jax.config import load_config
from codescaler_jax.training import topology
from codescaler_jax.training.fit import Candidate, Change, Knob, largest_that_fits, suggest
from codescaler_jax.training.report import (
    GIB,
    ProgramReport,
    compile_program,
    parse_resource_exhausted,
    tpu_target,
)
from codescaler_jax.training.topology import UnknownSliceError, get_slice

needs_libtpu = pytest.mark.skipif(
    not topology.libtpu_available(), reason="the tpu extra (libtpu) is not installed"
)


@pytest.fixture(autouse=True)
def _default_matmul_precision():
    """Compile as a run does. conftest asks for "highest" precision (for CPU parity tests);
    for float32 matmuls XLA:TPU then emits multi-pass bf16 code, which compiles several times
    slower, and Mosaic kernels refuse it for bf16 operands."""
    with jax.default_matmul_precision("default"):
        yield


# ---------------------------------------------------------------- the slice-name table
@pytest.mark.parametrize(
    "name, chips, topo, hosts",
    [
        ("v5p-16", 8, "v5p:2x2x2", 2),  # v5p names count TensorCores, two per chip
        ("v5p-8", 4, "v5p:2x2x1", 1),
        ("v4-8", 4, "v4:2x2x1", 1),
        ("v5litepod-16", 16, "v5e:4x4", 4),  # v5e and v6e names count chips
        ("v6e-8", 8, "v6e:2x4", 1),
        ("v6e-16", 16, "v6e:4x4", 4),
    ],
)
def test_slice_names_map_to_chips_and_topologies(name, chips, topo, hosts):
    s = get_slice(name)
    assert (s.chips, s.topology, s.hosts) == (chips, topo, hosts)


def test_chip_figures():
    hbm = {g: c.hbm_gib for g, c in topology.CHIPS.items()}
    assert hbm == {"v4": 32.0, "v5e": 16.0, "v5p": 95.0, "v6e": 32.0}
    assert topology.CHIPS["v5p"].usable_hbm_gib == 95.74
    assert topology.CHIPS["v5p"].peak_bf16_flops == 459e12


@pytest.mark.parametrize(
    "bad, hint",
    [("v5p-12", "'v5p-16'"), ("v5e-16", "'v5litepod-16'"), ("v5p16", "'v5p-16'"), ("nope", "")],
)
def test_unknown_slice_names_the_close_ones_and_lists_all(bad, hint):
    with pytest.raises(UnknownSliceError) as e:
        get_slice(bad)
    msg = str(e.value)
    assert f"unknown TPU slice {bad!r}" in msg and "v5p-16" in msg and "v6e-256" in msg
    if hint:
        assert f"Did you mean {hint}" in msg or f"or {hint}" in msg


# ---------------------------------------------------------------- the compiler's view
@needs_libtpu
def test_slice_devices_are_the_chips_of_the_slice():
    for name, kind in (("v5p-16", "TPU v5"), ("v4-8", "TPU v4"), ("v5litepod-8", "TPU v5 lite")):
        devs = topology.slice_devices(get_slice(name))
        assert len(devs) == get_slice(name).chips and devs[0].device_kind == kind


@needs_libtpu
def test_refusal_is_reported_with_the_compilers_figures():
    """A program past the chip's HBM: the compiler's RESOURCE_EXHAUSTED message is parsed
    into "does not fit: needs X of Y GiB" (Y = the usable HBM in the table), no exception."""
    target = tpu_target(get_slice("v5p-8"))
    mesh = Mesh(np.array(target.devices), ("x",))
    # 640 GiB of bf16 split over 4 chips: 160 GiB per chip of arguments alone.
    big = jax.ShapeDtypeStruct((4 * 160 * 1024, 1024, 512), jnp.bfloat16,
                               sharding=NamedSharding(mesh, PartitionSpec("x")))
    rep = compile_program("double", lambda: jax.jit(lambda a: a * 2).lower(big), target)
    assert rep.fits is False and "RESOURCE_EXHAUSTED" in rep.refused
    assert rep.capacity_bytes == pytest.approx(95.74 * GIB, rel=1e-3)
    assert rep.needed_bytes >= 160 * GIB
    assert rep.verdict().startswith("does not fit: needs ") and "of 95.74 GiB" in rep.verdict()


def test_parse_resource_exhausted_forms():
    a = parse_resource_exhausted(
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
        "temporaries (153.12G) exceeds available HBM (95.74G).")
    assert a == (int(153.12 * GIB), int(95.74 * GIB))
    b = parse_resource_exhausted(
        "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space "
        "hbm. Used 120.50G of 15.75G hbm. Exceeded hbm capacity by 104.75G.")
    assert b == (int(120.5 * GIB), int(15.75 * GIB))
    assert parse_resource_exhausted("RESOURCE_EXHAUSTED: something else") == (None, None)


@needs_libtpu
def test_splash_attention_compiles_for_v5p_through_the_entry_point():
    """``models.attention`` with implementation="splash": jax's Pallas splash kernel under
    ``shard_map`` (batch over fsdp, heads over tensor), GQA and right padding, forward and
    backward, compiled by XLA:TPU for a v5p slice; the report says the kernel hides its
    FLOPs from XLA instead of quoting an MFU."""
    from codescaler_jax.models.attention import dot_product_attention
    from codescaler_jax.models.sharding import MeshConfig, batch_sharding, make_mesh

    target = tpu_target(get_slice("v5p-8"))
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=2), devices=target.devices)
    B, T, N, K, D = 4, 512, 4, 2, 128
    bs = batch_sharding(mesh)
    q = jax.ShapeDtypeStruct((B, T, N, D), jnp.bfloat16, sharding=bs)
    kv = jax.ShapeDtypeStruct((B, T, K, D), jnp.bfloat16, sharding=bs)
    valid = jax.ShapeDtypeStruct((B, T), jnp.bool_, sharding=bs)

    def loss(q, k, v, kv_valid):
        out = dot_product_attention(q, k, v, kv_valid=kv_valid, implementation="splash",
                                    mesh=mesh)
        return out.astype(jnp.float32).sum()

    fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))

    def lower():
        with jax.set_mesh(mesh):
            return fwd_bwd.lower(q, kv, kv, valid)

    rep = compile_program("splash", lower, target, model_flops=3.5 * 2 * B * N * T * T * D)
    assert rep.fits and rep.temporaries_bytes > 0
    assert rep.kernel_calls == ("tpu_custom_call",)
    assert rep.mfu is None and any("hide their FLOPs" in n for n in rep.notes)
    # XLA sees almost none of the attention arithmetic: the reason for the note.
    assert rep.xla_flops * rep.num_devices < 0.05 * rep.model_flops


# ---------------------------------------------------------------- dry runs for v5p-8
_FIELDS = ("arguments_gib", "temporaries_gib", "outputs_gib", "aliased_gib", "total_gib",
           "hbm_gib", "headroom_gib", "headroom_pct", "xla_flops_per_device", "xla_seconds",
           "model_flops", "compile_s")


@needs_libtpu
def test_tiny_rm_train_step_compiles_for_v5p_8():
    from codescaler_jax.rm.config import RMTrainConfig
    from codescaler_jax.train_rm import dry_run

    # Dense attention: no kernel hides FLOPs, so XLA's estimate prices the whole step.
    cfg = load_config(RMTrainConfig, "configs/rm_tiny.yaml",
                      ["data.max_length=128", "model.attention=xla"])
    report = dry_run(cfg, "v5p-8")
    step = report["programs"]["train_step"]
    assert all(step[k] is not None for k in _FIELDS), step
    assert step["fits"] is True and step["verdict"].startswith("fits: ")
    assert 0 < step["total_gib"] < step["hbm_gib"] == 95.74
    assert step["headroom_gib"] == pytest.approx(step["hbm_gib"] - step["total_gib"], abs=2e-3)
    # No loop and no kernel: XLA's estimate covers the step, so the analytic MFU is derived.
    assert step["xla_cost_meaningful"] and 0 < step["mfu"] < 1
    assert report["target"]["slice"] == "v5p-8" and report["target"]["chips"] == 4
    assert report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert report["devices"] == "4 x TPU v5"
    # The old report's keys are the train step's figures.
    assert report["per_device_memory"]["total_gib"] == step["total_gib"]
    assert report["xla_flops_per_step_per_device"] == step["xla_flops_per_device"]
    assert report["fits"] is True and report["suggestions"] == []


@needs_libtpu
def test_tiny_grpo_programs_compile_for_v5p_8():
    from codescaler_jax.rl.config import GRPOConfig
    from codescaler_jax.train_grpo import dry_run

    cfg = load_config(GRPOConfig, "configs/grpo_tiny.yaml", [
        "policy.num_hidden_layers=1", "rollout.max_new_tokens=32", "data.max_prompt_length=64",
        "data.min_prompt_bucket=64", "reward.rm_max_length=128"])
    report = dry_run(cfg, "v5p-8")
    progs = report["programs"]
    assert set(progs) == {"rollout_decode_loop", "reward_scores", "actor_logprobs", "train_step"}
    for name, p in progs.items():
        assert all(p[k] is not None for k in _FIELDS if k != "xla_seconds"), (name, p)
        assert p["fits"] is True and p["compile_s"] > 0 and p["xla_flops_per_device"] > 0
    # What stays in HBM while a program runs: the optimizer state during the rollout, the
    # whole train state during RM scoring, the RM during the update.
    assert progs["rollout_decode_loop"]["resident_gib"] > 0
    assert progs["train_step"]["resident_gib"] > 0  # the RM (policy-sized here)
    # Parameters + Adam moments are about 3x the parameters alone.
    assert progs["reward_scores"]["resident_gib"] > 2.5 * progs["train_step"]["resident_gib"]
    # The decode loop is a while loop: XLA counts its body once, so no MFU from it.
    loop = progs["rollout_decode_loop"]
    assert loop["has_loop"] and loop["mfu"] is None and loop["notes"]
    assert report["rollout_decode_loop"] == loop  # the old report's keys
    # The long-lived buffers by part (abstract arrays x shardings), and the residents above
    # are made of them: the optimizer state and the RM while the rollout runs.
    parts = {k: v["bytes"] for k, v in report["memory_by_part"].items()}
    assert parts["kv_cache"] > 0 and parts["reward_model_params"] > 0
    assert parts["reference_params"] == 0  # beta = 0
    resident = parts["optimizer_state"] + parts["reward_model_params"]
    assert progs["rollout_decode_loop"]["resident_gib"] == pytest.approx(resident / 2**30,
                                                                         abs=1e-5)


# ---------------------------------------------------------------- does not fit
@needs_libtpu
def test_misfit_gets_more_micro_batches_shown_to_fit(tmp_path, capsys):
    """Activations past one v5e chip (64 pairs x 2 x 64 tokens through 262,144 MLP units):
    "does not fit: needs X of Y GiB", then the fewest micro-batches that fit, compiled. Two
    micro-batches cannot fit even if the temporaries halved exactly, so they are not compiled;
    three do not divide the batch."""
    from codescaler_jax.train_rm import main

    out = tmp_path / "report.json"
    rc = main(["--config", "configs/rm_tiny.yaml", "--topology", "v5litepod-1",
               "--set", "data.max_length=64", "--set", "train.global_batch_size=64",
               "--set", "model.intermediate_size=262144", "--json", str(out)])
    text = capsys.readouterr()
    assert rc == 0 and "Traceback" not in text.err
    assert "train_step: does not fit: needs " in text.out and "of 15.75 GiB" in text.out
    assert ("smallest change that fits: --set train.grad_accum_steps=4 -> compiled: fits: "
            in text.out)
    report = json.loads(out.read_text())
    (sug,) = report["suggestions"]
    assert sug["change"]["overrides"] == ["train.grad_accum_steps=4"]
    assert sug["report"]["fits"] is True and sug["report"]["has_loop"] is True
    assert sug["report"]["total_gib"] < report["programs"]["train_step"]["total_gib"]
    assert [t["change"] for t in sug["tried"]] == ["--set train.grad_accum_steps=4"]


def test_bigger_slices_are_the_same_generation_in_size_order():
    from codescaler_jax.training.dry_run import slice_knob
    from codescaler_jax.training.report import Target

    knob = slice_knob(Target((), get_slice("v5p-16")))
    names = [c.change.slice_name for c in knob.candidates]
    assert names[:3] == ["v5p-32", "v5p-64", "v5p-128"] and names[-1] == "v5p-12288"
    assert knob.candidates[0].all_scale == 0.5


@pytest.mark.slow
@needs_libtpu
def test_misfit_is_reported_with_a_change_that_is_shown_to_fit(tmp_path, capsys):
    """A model whose parameters and optimizer state alone exceed one v5e chip (two layers of
    262,144 MLP units: 1.6 B parameters): the CLI reports "does not fit: needs X of Y GiB",
    skips what cannot help (micro-batches and remat leave the parameters where they are) and
    compiles the next slice, over which FSDP splits them."""
    from codescaler_jax.train_rm import main

    out = tmp_path / "report.json"
    rc = main(["--config", "configs/rm_tiny.yaml", "--topology", "v5litepod-1",
               "--set", "data.max_length=32", "--set", "model.intermediate_size=262144",
               "--set", "model.hidden_size=1024", "--json", str(out)])
    text = capsys.readouterr()
    assert rc == 0 and "Traceback" not in text.err
    assert "train_step: does not fit: needs " in text.out and "of 15.75 GiB" in text.out
    assert ("smallest change that fits: --topology v5litepod-4 -> compiled: fits: "
            in text.out)
    report = json.loads(out.read_text())
    assert report["fits"] is False and report["programs"]["train_step"]["fits"] is False
    (sug,) = report["suggestions"]
    assert sug["change"]["slice"] == "v5litepod-4" and sug["report"]["fits"] is True
    assert [t["change"] for t in sug["tried"]] == ["--topology v5litepod-4"]


def _rep(total_gib: float, args_gib: float = 1.0) -> ProgramReport:
    b = int(total_gib * GIB)
    return ProgramReport("step", 1.0, 4, capacity_bytes=10 * GIB, arguments_bytes=int(
        args_gib * GIB), outputs_bytes=0, aliased_bytes=0, temporaries_bytes=b - int(
        args_gib * GIB))


def test_search_skips_what_cannot_fit_and_takes_the_first_that_does():
    """The search on reports whose memory follows the linear model: 1 GiB of arguments and
    29 GiB of temporaries against 10 GiB. k micro-batches need at least 1 + 29/k GiB, so
    k = 2 and 3 are skipped without a compile; k = 4 is compiled first."""
    compiled = []

    def recompile(change: Change):
        compiled.append(change.describe())
        k = int(change.overrides[0].split("=")[1])
        if k == 5:
            return "invalid: 5 does not divide the batch"
        return _rep(1 + 29 / k + 2.0)  # the real program is 2 GiB worse than the bound

    knob = Knob("micro-batches", tuple(
        Candidate(Change((f"accum={k}",)), temps_scale=1 / k) for k in (2, 3, 4, 5, 6)))
    s = suggest(_rep(30.0), [knob], recompile)
    assert compiled == ["--set accum=4", "--set accum=5", "--set accum=6"]
    assert s.change == Change(("accum=6",)) and s.report.fits
    assert any("invalid" in x for x in s.skipped)


def test_bisection_finds_the_largest_value_that_fits_in_few_compiles():
    """Memory 1 GiB + 0.1 GiB per row against 10 GiB: 90 rows fit, 96 do not. Of 64 values the
    bisection compiles at most 7, every one of them recorded, and an invalid value counts as
    not fitting."""
    values = list(range(8, 520, 8))
    compiled = []

    def compile_value(v: int):
        compiled.append(v)
        return "invalid: odd" if v == 256 else _rep(1 + 0.1 * v)

    res = largest_that_fits("rollout.batch_size", values, compile_value)
    assert res.value == 88 and res.report.fits and len(compiled) <= 7
    assert [v for v, _ in res.tried] == compiled
    assert all(r.fits for v, r in res.tried if v <= 88 and not isinstance(r, str))
    assert "largest that fits: 88" in res.describe()
    none = largest_that_fits("k", [200, 300], lambda v: _rep(1 + 0.1 * v))
    assert none.value is None and none.to_dict()["tried"][0]["fits"] is False


@pytest.mark.slow
@needs_libtpu
def test_fit_table_rollout_search_compiles_tiny_grpo_for_v5p_8(tmp_path):
    """The rollout-batch bisection of ``bench.fit_table`` on a tiny GRPO config for v5p-8
    (4 chips): the probes are multiples of 4 that divide the step's 16 responses, each a real
    compile of the decode loop; all fit at this size, so the largest is the whole step."""
    from codescaler_jax.bench.fit_table import main, rollout_values

    assert rollout_values(1024, 8) == [8, 16, 32, 64, 128, 256, 512, 1024]
    assert rollout_values(1024, 8, 128, 256) == list(range(136, 256, 8))
    rc = main(["--recipes", "grpo", "--grpo-config", "configs/grpo_tiny.yaml", "--slices",
               "v5p-8", "--out", str(tmp_path), "--rollout-search", "--no-suggest",
               "--grpo-set", "policy.num_hidden_layers=1", "--grpo-set",
               "rollout.max_new_tokens=16", "--grpo-set", "data.max_prompt_length=32",
               "--grpo-set", "data.min_prompt_bucket=32", "--grpo-set",
               "reward.rm_max_length=64", "--grpo-set", "rollout.num_prompts=4",
               "--grpo-set", "rollout.num_generations=4", "--grpo-set", "rollout.batch_size=4",
               "--grpo-set", "algorithm.micro_batches=1", "--grpo-set",
               "algorithm.num_minibatches=1", "--grpo-set", "reward.rm_batch_size=4"])
    assert rc == 0
    (row,) = json.loads((tmp_path / "fit_table.json").read_text())["rows"]
    search = row["rollout_search"]
    assert search["key"] == "rollout.batch_size" and search["value"] == 16
    assert [t["value"] for t in search["tried"]] == [8, 16]  # of [4, 8, 16]
    assert search["report"]["fits"] is True
    assert "largest rollout batch that fits: 16" in (tmp_path / "fit_table.md").read_text()


# ---------------------------------------------------------------- command line
def test_cli_unknown_topology_exits_with_the_message_and_no_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "codescaler_jax.train_rm", "--config", "configs/rm_tiny.yaml",
         "--topology", "nope"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "error: unknown TPU slice 'nope'" in proc.stderr and "v5p-16" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_topology_without_libtpu_says_to_install_the_extra(monkeypatch, capsys):
    from codescaler_jax.train_grpo import main

    monkeypatch.setattr(topology, "libtpu_available", lambda: False)
    assert main(["--config", "configs/grpo_tiny.yaml", "--topology", "v5p-8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: compiling for a TPU slice needs the TPU compiler (libtpu): "
                   "pip install -e '.[tpu]'")


@needs_libtpu
def test_fit_table_writes_markdown_and_json(tmp_path):
    """The README table's script, on the tiny RM in place of the 8B recipe (same code path)."""
    from codescaler_jax.bench.fit_table import main

    rc = main(["--recipes", "rm", "--rm-config", "configs/rm_tiny.yaml", "--slices", "v5p-8",
               "--rm-set", "data.max_length=128", "--rm-set", "model.attention=xla",
               "--out", str(tmp_path)])
    assert rc == 0
    md = (tmp_path / "fit_table.md").read_text()
    assert md.startswith("| recipe | slice | program |") and "| rm | v5p-8 | train_step |" in md
    assert "- rm on v5p-8: the step fits" in md
    data = json.loads((tmp_path / "fit_table.json").read_text())
    (row,) = data["rows"]
    assert row["report"]["programs"]["train_step"]["fits"] is True
    assert row["wall_s"] > 0 and data["environment"]["libtpu"].startswith("0.0.42")


@needs_libtpu
def test_the_config_mesh_is_laid_over_the_slice(capsys):
    from codescaler_jax.models.sharding import MeshConfig, make_mesh
    from codescaler_jax.train_rm import main

    devs = topology.slice_devices(get_slice("v5p-16"))
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=2), devices=devs)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert {d.id for d in mesh.devices.flat} == {d.id for d in devs}
    # A mesh the slice cannot hold is a one-line error, not a traceback.
    rc = main(["--config", "configs/rm_tiny.yaml", "--topology", "v5p-8", "--set",
               "mesh.tensor=3"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: MeshConfig") and "Traceback" not in err
