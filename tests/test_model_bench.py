"""The model benchmark's FLOP formula and a tiny end-to-end run (no timing assertions)."""

import json

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from codescaler_jax.bench import model as bench
from codescaler_jax.models.qwen3 import Qwen3Config, Qwen3RewardModel


def test_flop_formula_matches_xla_cost_analysis():
    """6*N*tokens + 12*L*B*T^2*H*D against the FLOPs XLA counts in the compiled step."""
    b, t, layers, heads, hd = 2, 128, 1, 2, 64
    cfg = Qwen3Config(vocab_size=512, hidden_size=128, intermediate_size=384,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=1, head_dim=hd, tie_word_embeddings=False)
    graphdef, params = nnx.split(Qwen3RewardModel(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    ids = jnp.ones((b, t), jnp.int32)
    step = jax.jit(lambda p: jax.value_and_grad(
        lambda p: nnx.merge(graphdef, p)(ids, ids).mean())(p))
    counted = step.lower(params).compile().cost_analysis()["flops"]
    n = sum(x.size for x in jax.tree.leaves(params)) - cfg.vocab_size * cfg.hidden_size
    formula = bench.model_flops(n, layers, b, t, heads, hd)
    # XLA also counts elementwise work (norms, softmax, SiLU), a few percent at this size.
    assert formula <= counted <= 1.06 * formula, (formula, counted)


@pytest.mark.slow
def test_benchmark_runs_and_writes_json(tmp_path):
    out = tmp_path / "model.json"
    bench.main(["--hidden", "64", "--layers", "1", "--heads", "2", "--kv-heads", "1",
                "--head-dim", "32", "--vocab", "256", "--seq", "32", "--batch", "2",
                "--repeat", "1", "--warmup", "0", "--matmul-size", "128", "--no-xla-flags",
                "--out", str(out)])
    data = json.loads(out.read_text())
    for side in ("ours", "torch"):
        assert data[side]["tokens_per_s"] > 0 and 0 < data[side]["mfu"]
    assert data["ratio_ours_over_torch"] == data["ours"]["tokens_per_s"] / data["torch"][
        "tokens_per_s"]
    assert data["tokens_per_step"] == 64 and "6 * non_embedding_params" in data["flops_formula"]
    assert data["environment"]["backend"] == "cpu"
