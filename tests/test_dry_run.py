"""--dry-run: abstract parameters, the train step lowered and compiled for the mesh, memory and
FLOPs from XLA, without loading weights or data."""

import pytest

from codescaler_jax.config import load_config
from codescaler_jax.rm.config import RMTrainConfig
from codescaler_jax.train_rm import dry_run, main


def _check(report, cfg):
    assert report["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert report["devices"].startswith("8 x ")
    mem = report["per_device_memory"]
    assert mem["arguments_gib"] > 0 and mem["total_gib"] >= mem["arguments_gib"]
    # XLA's FLOPs per device times 8 devices cover the analytic matmul FLOPs of the step
    # (remat recomputes the forward, so XLA's figure may be larger, never much smaller),
    # unless loops hide them: XLA counts a scanned layer stack's body once.
    xla_total = report["xla_flops_per_step_per_device"] * 8
    loops = report["scan_layers"] or cfg.train.grad_accum_steps > 1
    assert report["xla_flops_counts_loop_bodies_once"] == loops
    if report["xla_flops_counts_loop_bodies_once"]:
        assert 0 < xla_total < report["analytic_flops_per_step_total"]
    else:
        assert xla_total > 0.9 * report["analytic_flops_per_step_total"]


def test_dry_run_small_shape_of_the_8b_recipe():
    cfg = load_config(
        RMTrainConfig,
        "configs/rm_codescaler_8b.yaml",
        [
            "model.size=qwen3_0_6b",
            "model.num_hidden_layers=2",  # compile time: 2 of the 28 layers
            "model.scan_layers=false",  # unrolled, so that XLA counts every layer's FLOPs
            "model.attention=xla",  # no block loop either (CPU auto runs chunked at 256)
            "data.max_length=256",
            "train.global_batch_size=16",
        ],
    )
    report = dry_run(cfg)
    _check(report, cfg)
    # Qwen3-0.6B shapes: 151936 x 1024 embedding + 2 layers + final norm + score head
    layer = 1024 * 128 * (16 + 2 * 8) + 16 * 128 * 1024 + 3 * 1024 * 3072 + 2 * 1024 + 2 * 128
    assert report["params"] == 151936 * 1024 + 2 * layer + 1024 + 1024
    assert report["param_dtype"] == "bfloat16" and report["remat"] is True
    assert report["scan_layers"] is False


@pytest.mark.slow
def test_dry_run_8b_recipe_on_8_fake_devices(capsys):
    assert main(["--config", "configs/rm_codescaler_8b.yaml", "--dry-run", "--json", "-"]) == 0
    import json

    report = json.loads(capsys.readouterr().out)
    cfg = load_config(RMTrainConfig, "configs/rm_codescaler_8b.yaml")
    _check(report, cfg)
    assert 7.5e9 < report["params"] < 7.7e9
    assert report["seq_len"] == 4096 and report["global_batch_pairs"] == 128
    assert report["scan_layers"] is True  # the named size's default


def test_cli_dry_run_prints_the_table_and_writes_json(tmp_path, capsys):
    import json

    out = tmp_path / "r.json"
    assert main(["--config", "configs/rm_tiny.yaml", "--dry-run", "--set", "data.max_length=128",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "target: 8 x cpu (local devices)" in text and "train_step" in text
    assert "train_step: no HBM verdict (local devices)" in text
    report = json.loads(out.read_text())
    assert report["programs"]["train_step"]["fits"] is None and report["fits"] is None
    assert report["per_device_memory"]["total_gib"] > 0 and report["suggestions"] == []
