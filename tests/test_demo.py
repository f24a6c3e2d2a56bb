"""The method in miniature: best-of-N candidates, the SFT warm start, GRPO pass-rate probes,
the demo report pieces. Small problem subsets; the end-to-end SFT -> GRPO chain is slow."""

import dataclasses
import json

import numpy as np
import pytest

from codescaler_jax.code.extract import extract_code
from codescaler_jax.code.sandbox import Sandbox, SandboxConfig, tests_from_record
from codescaler_jax.data.candidates import best_of_n_candidates, problems_of_split
from codescaler_jax.data.problems import humaneval_problems, read_problems_jsonl
from codescaler_jax.data.splits import find_leaks
from codescaler_jax.data.tokenizer import load_tokenizer

FRACTIONS = {"held_out_fraction": 0.25, "validation_fraction": 0.125}


@pytest.fixture(scope="module")
def subset_file(tmp_path_factory):
    """24 HumanEval problems as a problems JSONL (a source the SFT data and probes read)."""
    from codescaler_jax.sft.data import write_problems

    path = tmp_path_factory.mktemp("problems") / "subset.jsonl"
    write_problems(humaneval_problems()[:24], path)
    return path


def test_best_of_n_candidates_carry_true_labels():
    held = problems_of_split(humaneval_problems()[:24], "held_out", **FRACTIONS)[:3]
    cs = best_of_n_candidates(held, n=8, passing=2, rewrites=1, rewrite_candidates=2,
                              mutants_per_positive=5, seed=0)
    assert cs.stats["problems_used"] == len(cs.problems) >= 2
    items, want = [], []
    for p, rs, ok, kinds in zip(cs.problems, cs.responses, cs.passed, cs.kinds):
        assert len(rs) == 8 and 1 <= sum(ok) <= 2
        assert all((k in ("canonical", "rewrite")) == o for k, o in zip(kinds, ok))
        for r, o in zip(rs, ok):
            ext = extract_code(r, mode="train")
            assert ext.valid  # every candidate is one fenced block that parses
            items.append((ext.code, tests_from_record(p.tests)))
            want.append(o)
    with Sandbox(SandboxConfig(time_limit_s=5.0, workers=2)) as sb:
        got = [r.passed for r in sb.run_many(items)]
    assert got == want
    again = best_of_n_candidates(held, n=8, passing=2, rewrites=1, rewrite_candidates=2,
                                 mutants_per_positive=5, seed=0)
    assert again.responses == cs.responses and again.passed == cs.passed


def test_sft_examples_hold_no_held_out_problem(subset_file):
    """Leakage: no held-out (or validation) problem id, prompt, docstring or solution text in
    any SFT example or in the problems GRPO trains on; the check itself can fail."""
    from codescaler_jax.sft.config import SFTDataSection
    from codescaler_jax.sft.data import build_examples

    section = SFTDataSection(source=str(subset_file), rewrites=1, rewrite_candidates=2,
                             max_response_tokens=160, **FRACTIONS)
    tok = load_tokenizer("qwen3")
    examples, used, stats = build_examples(section, tok, seed=0)
    problems = read_problems_jsonl(subset_file)
    train = {p.problem_id for p in problems_of_split(problems, "train", **FRACTIONS)}
    held = problems_of_split(problems, "held_out", **FRACTIONS)
    val = problems_of_split(problems, "validation", **FRACTIONS)
    assert examples and {e.problem_id for e in examples} <= train
    assert {p.problem_id for p in used} <= train
    assert stats["examples_by_kind"].get("rewrite", 0) > 0
    records = [(f"sft example {i}", e.problem_id, (e.prompt, e.response))
               for i, e in enumerate(examples)]
    records += [(f"grpo prompt {p.problem_id}", p.problem_id, (p.prompt, p.solution or ""))
                for p in used]
    assert not find_leaks(held + val, records)
    # Responses are fenced, chat-formatted, EOS-terminated: what the sampler will produce.
    e = examples[0]
    assert e.response.startswith("```python\n") and e.response.endswith("\n```")
    assert e.response_ids[-1] == tok.eos_token_id
    assert tok.decode(list(e.prompt_ids)).endswith("<|im_start|>assistant\n")
    planted = [("planted", "HumanEval/x", ("q", "```python\n" + held[0].solution + "\n```"))]
    assert find_leaks(held, planted)


def test_probe_cadence_and_claims():
    from codescaler_jax.demo import grpo_claims
    from codescaler_jax.rl.metrics import PassRateEvalSection, PassRateProbe

    probe = PassRateProbe(PassRateEvalSection(every=5), {}, None, max_prompt_length=8)
    assert [s for s in range(13) if probe.due(s, 12)] == [0, 5, 10, 12]
    probe.close()
    summary = {"steps": 4, "history": [{"valid_code_fraction": v} for v in (1.0, 0.9, 0.95)],
               "pass_rate_eval": [{"step": 0, "train/pass_rate": 0.25,
                                   "train/valid_code_fraction": 0.9},
                                  {"step": 4, "train/pass_rate": 0.5}]}
    c = grpo_claims(summary)
    assert c["train_pass_rate_gain"] == pytest.approx(0.25)
    assert c["rollout_valid_min"] == 0.9 and c["probe_valid_min"] == 0.9
    with pytest.raises(ValueError, match="pass_rate_eval.num_samples"):
        PassRateEvalSection(num_samples=0)


def test_plots_are_deterministic_pngs(tmp_path):
    from codescaler_jax.plots import bar_chart, line_chart

    for name in ("a", "b"):
        line_chart(tmp_path / f"{name}.png", {"x": ([0, 1, 2], [0.1, None, 0.3]),
                                              "y": ([0, 2], [0.5, 0.2])},
                   title="t", xlabel="step", ylabel="r")
        bar_chart(tmp_path / f"{name}_bar.png", {"RM": 0.5, "random": 0.25}, title="t",
                  ylabel="p")
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert (tmp_path / "a_bar.png").read_bytes() == (tmp_path / "b_bar.png").read_bytes()


_TINY_POLICY = ["policy.hidden_size=32", "policy.intermediate_size=64",
                "policy.num_hidden_layers=1", "policy.num_attention_heads=2",
                "policy.num_key_value_heads=1"]


def _figures(rows):
    """Per-step records without timings and throughputs (the only figures a seed does not
    fix)."""
    return json.dumps([{k: v for k, v in r.items() if "time" not in k and "per_s" not in k}
                       for r in rows], sort_keys=True)  # NaN-safe equality


@pytest.mark.slow
def test_sft_warm_start_feeds_grpo_with_probes(tmp_path, subset_file):
    """train_sft -> train_grpo (execution reward) from its export and problems: the SFT loss
    falls, both runs repeat exactly for the same seed (SFT losses; GRPO rewards, losses and
    probe pass rates), and GRPO logs the probes at steps 0, 1, 2."""
    import jax
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from codescaler_jax.config import load_config
    from codescaler_jax.models.sharding import MeshConfig, make_mesh
    from codescaler_jax.rl.config import GRPOConfig
    from codescaler_jax.rl.trainer import GRPOTrainer
    from codescaler_jax.sft.config import SFTConfig
    from codescaler_jax.sft.trainer import train_sft

    mesh = make_mesh(MeshConfig(), devices=jax.devices()[:1])

    def sft(run):
        cfg = load_config(SFTConfig, "configs/sft_tiny.yaml", [
            *_TINY_POLICY, f"run_dir={run}", f"data.source={subset_file}",
            "data.held_out_fraction=0.25", "data.validation_fraction=0.125", "data.rewrites=1",
            "data.rewrite_candidates=2", "data.max_problems=3", "data.max_response_tokens=64",
            "train.steps=6", "train.batch_size=4", "train.log_every=3",
            "optim.learning_rate=1e-2", "optim.warmup_steps=2"])
        return train_sft(cfg, progress=False, mesh=mesh)

    a, b = sft(tmp_path / "sft_a"), sft(tmp_path / "sft_b")
    assert a["history"] == b["history"]
    assert a["history"][-1]["loss"] < a["history"][0]["loss"]
    cfg = load_config(GRPOConfig, "configs/grpo_tiny.yaml", [
        f"run_dir={tmp_path / 'grpo'}", f"policy.init_from={tmp_path / 'sft_a' / 'hf'}",
        f"data.source={tmp_path / 'sft_a' / 'data' / 'problems.jsonl'}",
        "reward.name=execution", "reward.rm_path=null", "rollout.num_prompts=2",
        "rollout.num_generations=2",
        "rollout.max_new_tokens=16", "rollout.min_response_bucket=16", "rollout.batch_size=4",
        "algorithm.logprob_chunk=16", "train.steps=2", "train.save_every=0",
        "train.samples_every=0", "train.export_hf=false",
        "pass_rate_eval.every=1", "pass_rate_eval.train_prompts=2",
        f"pass_rate_eval.held_out_source={subset_file}", "pass_rate_eval.held_out_fraction=0.25",
        "pass_rate_eval.validation_fraction=0.125", "pass_rate_eval.held_out_prompts=2",
        "pass_rate_eval.num_samples=1"])
    summary = GRPOTrainer(cfg, progress=False, mesh=mesh).run()
    # Determinism: the same seed repeats every figure of the run (timings aside).
    again = GRPOTrainer(dataclasses.replace(cfg, run_dir=str(tmp_path / "grpo_again")),
                        progress=False, mesh=mesh).run()
    assert _figures(again["history"]) == _figures(summary["history"])
    assert _figures(again["pass_rate_eval"]) == _figures(summary["pass_rate_eval"])
    probes = summary["pass_rate_eval"]
    assert [p["step"] for p in probes] == [0, 1, 2]
    assert {"train/pass_rate", "held_out/pass_rate", "train/valid_code_fraction"} <= set(
        probes[0])
    assert all("pass_rate" in h for h in summary["history"])
    on_disk = json.loads((tmp_path / "grpo" / "summary.json").read_text())
    assert on_disk["pass_rate_eval"] == probes
    acc = EventAccumulator(str(tmp_path / "grpo" / "tb"))
    acc.Reload()
    assert {"eval/train/pass_rate", "eval/held_out/pass_rate", "train/reward/mean"} <= set(
        acc.Tags()["scalars"])
    assert np.isfinite([p["train/pass_rate"] for p in probes]).all()


def test_demo_config_sizes_every_stage():
    """configs/demo.yaml's overrides are keys of their stage configs (a renamed key fails here,
    not 20 minutes into the demo), and the sizes the README quotes are the ones it sets."""
    from codescaler_jax.config import load_config
    from codescaler_jax.demo import DemoConfig
    from codescaler_jax.rl.config import GRPOConfig
    from codescaler_jax.rm.config import RMTrainConfig
    from codescaler_jax.sft.config import SFTConfig

    d = load_config(DemoConfig, "configs/demo.yaml", [])
    rm = load_config(RMTrainConfig, d.rm_config, d.rm_overrides)
    assert rm.train.num_epochs == 1 and rm.data.max_pairs_per_problem == 8
    assert rm.data.pairs_recipe == "augmented" and rm.data.validation_fraction > 0
    # rm_tiny's own recipe (README): mean pooling, validated every 15 steps, best kept
    assert (rm.model.pooling, rm.train.eval_every, rm.train.select_best) == ("mean", 15, True)
    sft = load_config(SFTConfig, d.sft_config, d.sft_overrides)
    assert (sft.train.steps, sft.data.max_problems, sft.optim.learning_rate) == (200, 12, 1e-2)
    g = load_config(GRPOConfig, d.grpo_config, d.grpo_overrides)
    assert g.train.steps == 24 and g.pass_rate_eval.every == 8 and g.optim.learning_rate == 1e-4
    assert g.train.steps % g.pass_rate_eval.every == 0  # the last probe is after the last step
    # the policy GRPO trains is the one SFT exports; the probe's split is the SFT data's
    assert g.policy.hidden_size == sft.policy.hidden_size
    assert g.policy.num_hidden_layers == sft.policy.num_hidden_layers
    assert (g.pass_rate_eval.held_out_fraction, g.pass_rate_eval.validation_fraction) == (
        sft.data.held_out_fraction, sft.data.validation_fraction) == (
        rm.data.eval_fraction, rm.data.validation_fraction)
    # the rollout's sampler settings are the probe's (the same sampler): step 0 compares like
    # with like
    assert g.rollout.temperature == 0.6


def test_report_states_each_bar_and_whether_it_holds(tmp_path):
    """write_report on a synthetic result: every claim's table, a missed bar marked missed."""
    from codescaler_jax.demo import grpo_claims, write_report

    def grpo(gain):
        return {"steps": 2, "history": [{"step": s, "reward_mean": 0.5, "valid_code_fraction": v}
                                        for s, v in ((1, 0.95), (2, 0.85))],
                "pass_rate_eval": [{"step": 0, "train/pass_rate": 0.25, "held_out/pass_rate": 0.0},
                                   {"step": 2, "train/pass_rate": 0.25 + gain,
                                    "held_out/pass_rate": 0.0}]}

    res = {"seed": 0, "wall_s": 600.0, "load_start": (1.0, 1.0, 1.0),
           "load_end": (2.0, 2.0, 2.0), "stage_seconds": {"rm": 100.0},
           "rm": {"final_eval": {"accuracy": 0.7, "by_positive/rewrite/accuracy": 0.72,
                                 "by_kind/cut/accuracy": 0.8}},
           "best_of_n": {"problems": 33, "n": 8, "candidate_set": {"passing_per_problem": 2},
                         "label_mismatches": 0, "pass_rate": {"rm_pick": 0.5, "random_pick": 0.25,
                                                              "oracle": 1.0, "test_pick": 1.0},
                         "rm_minus_random": 0.25, "rm_seconds_warm": 1.0,
                         "rm_seconds_cold": 2.0, "test_seconds": 3.0},
           "grpo_rm": grpo(0.125), "grpo_execution": grpo(0.0)}
    res["grpo_rm_claims"] = grpo_claims(res["grpo_rm"])
    res["grpo_execution_claims"] = grpo_claims(res["grpo_execution"])
    text = write_report(tmp_path, res)
    assert "gain +12.5 points (holds)" in text
    assert "| gain (bar >= +10 points) | +12.5 points | +0.0 points |" in text
    assert "valid-code floor 85.0% (**missed**)" in text  # min over rollouts, bar 0.9
    assert "RM pick - random pick: +25.0 points (bar >= +15: holds)" in text
    assert "| by_positive/rewrite | 0.720 | >= 0.70: holds |" in text
    assert {p.name for p in tmp_path.glob("*.png")} == {"reward.png", "pass_rate.png",
                                                        "best_of_n.png"}
