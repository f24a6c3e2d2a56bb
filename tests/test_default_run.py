"""The embedded default, end to end (about 10 minutes on 2 cores: slow-marked).

`python -m codescaler_jax.train_rm --config configs/rm_tiny.yaml` must reach held-out pairwise
accuracy >= 0.65 on problems it never trained on, above the untrained model of the same run.
"""

import json

import pytest

from codescaler_jax.train_rm import main


@pytest.mark.slow
def test_rm_tiny_default_reaches_the_accuracy_target(tmp_path):
    assert main(["--config", "configs/rm_tiny.yaml", "--set", f"run_dir={tmp_path}",
                 "--no-progress"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    untrained = summary["untrained_eval"]["accuracy"]
    trained = summary["final_eval"]["accuracy"]
    assert summary["data"]["eval_problems"] >= 30 and summary["data"]["eval_pairs"] >= 200
    assert trained >= 0.65 and trained > untrained
    assert (tmp_path / "hf" / "config.json").is_file()
