"""GRPO policy loss: hand-computed per-token values, aggregation modes, KL estimators, entropy,
and exactness of the aggregate under micro-batching and an 8-device data-sharded mesh."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from codescaler_jax.rl.losses import (
    LOSS_AGGREGATIONS,
    PolicyLossConfig,
    WeightedMean,
    aggregate_loss,
    entropy_from_logits,
    finalize_metrics,
    kl_penalty,
    loss_denominator,
    policy_loss,
    ppo_clip_loss,
)

MODES = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


# ------------------------------------------------------------------------------------------
# Per-token PPO loss (defaults epsilon 0.2, epsilon_high 0.28, dual_clip 3.0)

# (advantage, ratio, loss, clipped_high, clipped_low, dual_clipped, d loss / d logp)
CASES = [
    (1.0, 1.1, -1.1, 0, 0, 0, -1.1),  # A > 0, inside the clip range: -A r, grad -A r
    (2.0, 1.5, -2.56, 1, 0, 0, 0.0),  # A > 0, above 1 + 0.28: -2 * 1.28, no gradient
    (1.0, 0.5, -0.5, 0, 0, 0, -0.5),  # A > 0, below 1 - 0.2: the max keeps -A r
    (-1.0, 0.5, 0.8, 0, 1, 0, 0.0),  # A < 0, below 1 - 0.2: clipped to 0.8, no gradient
    (-1.0, 1.5, 1.5, 0, 0, 0, 1.5),  # A < 0, above 1.28 but under the cap 3: -A r
    (-0.5, 2.0, 1.0, 0, 0, 0, 1.0),  # A < 0: 0.5 * 2 = 1.0 under the cap 0.5 * 3 = 1.5
    (-1.0, 4.0, 3.0, 0, 0, 1, 0.0),  # A < 0, ratio 4 > 3: dual-clip cap -3A = 3, no gradient
    (0.0, 2.0, 0.0, 0, 0, 0, 0.0),  # A = 0: no loss, no gradient
]


def test_ppo_clip_per_token_hand_values():
    adv = jnp.array([[c[0] for c in CASES]])
    ratio = np.array([[c[1] for c in CASES]])
    old = jnp.full(adv.shape, -1.3)
    logp = old + jnp.log(jnp.asarray(ratio, jnp.float32))

    loss, m = ppo_clip_loss(logp, old, adv)
    np.testing.assert_allclose(np.asarray(loss)[0], [c[2] for c in CASES], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(m["clipped_high"])[0], [c[3] for c in CASES])
    np.testing.assert_array_equal(np.asarray(m["clipped_low"])[0], [c[4] for c in CASES])
    np.testing.assert_array_equal(np.asarray(m["dual_clipped"])[0], [c[5] for c in CASES])
    np.testing.assert_allclose(np.asarray(m["ratio"]), ratio, rtol=1e-6)
    # approx_kl is (r - 1) - log r: for r = 1.1, 0.1 - 0.0953101798 = 0.0046898202.
    np.testing.assert_allclose(float(m["approx_kl"][0, 0]), 0.0046898202, rtol=1e-4)

    grad = jax.grad(lambda lp: jnp.sum(ppo_clip_loss(lp, old, adv)[0]))(logp)
    np.testing.assert_allclose(np.asarray(grad)[0], [c[6] for c in CASES], rtol=1e-6, atol=1e-6)


def test_without_dual_clip_the_negative_advantage_loss_is_unbounded():
    loss, m = ppo_clip_loss(jnp.log(jnp.array([[4.0]])), jnp.zeros((1, 1)),
                            jnp.array([[-1.0]]), dual_clip=None)
    np.testing.assert_allclose(float(loss[0, 0]), 4.0, rtol=1e-6)
    assert float(m["dual_clipped"][0, 0]) == 0.0


def test_symmetric_clip_when_epsilon_high_is_none():
    cfg = PolicyLossConfig(epsilon_high=None)
    assert cfg.clip_high == 0.2
    loss, _ = ppo_clip_loss(jnp.log(jnp.array([[1.5]])), jnp.zeros((1, 1)), jnp.array([[1.0]]),
                            epsilon=cfg.epsilon, epsilon_high=cfg.clip_high)
    np.testing.assert_allclose(float(loss[0, 0]), -1.2, rtol=1e-6)


def test_log_ratio_clamp():
    # logp - old = +50 and -50 are clamped to +-20 before exp.
    # Token 0: A = -1, no dual clip, so the loss is -A e^20 = 485165195.4 (e^50 would be 5.2e21).
    # Token 1: A = +1, r = e^-20 = 2.0611536e-9 (e^-50 = 1.9e-22): max(-r, -0.8) = -r.
    logp = jnp.array([[50.0, -50.0]])
    old = jnp.zeros((1, 2))
    adv = jnp.array([[-1.0, 1.0]])
    loss, m = ppo_clip_loss(logp, old, adv, dual_clip=None)
    np.testing.assert_allclose(np.asarray(loss)[0], [485165195.4097903, -2.061153622e-9], rtol=1e-5)
    np.testing.assert_allclose(float(m["approx_kl"][0, 0]), math.exp(20) - 1 - 20, rtol=1e-5)
    # The clamp also stops the gradient at the saturated tokens.
    grad = jax.grad(lambda lp: jnp.sum(ppo_clip_loss(lp, old, adv, dual_clip=None)[0]))(logp)
    np.testing.assert_array_equal(np.asarray(grad), [[0.0, 0.0]])
    # With the clamp at 60 instead, the same token's loss is e^50.
    loss60, _ = ppo_clip_loss(logp, old, adv, dual_clip=None, log_ratio_clamp=60.0)
    np.testing.assert_allclose(float(loss60[0, 0]), math.exp(50), rtol=1e-5)


# ------------------------------------------------------------------------------------------
# Aggregation on a ragged mask

VALUES = [
    [1.0, 2.0, 3.0, 4.0],
    [5.0, 6.0, np.nan, np.inf],  # non-finite values at padded positions must not leak
    [7.0, np.nan, 0.0, 0.0],
    [9.0, 9.0, 9.0, 9.0],  # an all-padding row (fills a static batch): not a sequence
]
MASK = [[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
# Sequence sums 10, 11, 7 (total 28 over 7 tokens); sequence means 2.5, 5.5, 7.
EXPECTED = {
    "token-mean": 28 / 7,
    "seq-mean-token-sum": 28 / 3,
    "seq-mean-token-mean": (2.5 + 5.5 + 7.0) / 3,
    "seq-mean-token-sum-norm": 28 / 4 / 3,  # C = T = 4 by default
}


@pytest.mark.parametrize("mode", MODES)
def test_aggregation_modes_hand_values(mode):
    got = aggregate_loss(jnp.array(VALUES), jnp.array(MASK), mode)
    np.testing.assert_allclose(float(got), EXPECTED[mode], rtol=1e-6)


def test_sum_norm_constant_and_global_denominator():
    values, mask = jnp.array(VALUES), jnp.array(MASK)
    got = aggregate_loss(values, mask, "seq-mean-token-sum-norm", norm_constant=8.0)
    np.testing.assert_allclose(float(got), 28 / 8 / 3, rtol=1e-6)
    # A micro-batch made of rows 0 and 3 divides by the mini-batch's 7 tokens: 10 / 7.
    den = loss_denominator(mask, "token-mean")
    assert float(den) == 7.0
    got = aggregate_loss(values[::3], mask[::3], "token-mean", global_denominator=den)
    np.testing.assert_allclose(float(got), 10 / 7, rtol=1e-6)
    assert float(loss_denominator(mask, "seq-mean-token-mean")) == 3.0


# ------------------------------------------------------------------------------------------
# KL estimators and entropy


def test_kl_estimators_hand_values():
    logp = jnp.array([[-1.0, -2.0, -30.0]])
    ref = jnp.array([[-2.0, -1.0, -1.0]])
    # k1 = logp - ref; k2 = (logp - ref)^2 / 2; k3 = e^d - d - 1 with d = ref - logp.
    # Third token: k1 = -29, k2 = 420.5, k3 = e^20 - 21 (d = 29 clamped to 20); all clamped to 10.
    expected = {
        "k1": [1.0, -1.0, -10.0],
        "k2": [0.5, 0.5, 10.0],
        "k3": [math.exp(-1) - (-1) - 1, math.e - 2, 10.0],
    }
    for name, want in expected.items():
        got = kl_penalty(logp, ref, estimator=name, clamp=10.0)
        np.testing.assert_allclose(np.asarray(got)[0], want, rtol=1e-6, err_msg=name)
    unclamped = kl_penalty(logp, ref, estimator="k3", clamp=None)
    np.testing.assert_allclose(float(unclamped[0, 2]), math.exp(20) - 21, rtol=1e-5)
    np.testing.assert_allclose(float(kl_penalty(logp, ref, estimator="k2", clamp=None)[0, 2]),
                               420.5, rtol=1e-6)


def test_kl_term_in_policy_loss():
    # logp == old and A = 0: the PPO term is 0, the loss is beta * token-mean(k3).
    logp = jnp.array([[-1.0, -2.0, 0.0]])
    ref = jnp.array([[-2.0, -1.0, 5.0]])
    mask = jnp.array([[1, 1, 0]])
    cfg = PolicyLossConfig(beta=0.1, kl_estimator="k3")
    loss, metrics = policy_loss(logp, logp, jnp.zeros(1), mask, cfg=cfg, ref_logp=ref)
    k3 = [math.exp(-1), math.e - 2]  # 0.36787944, 0.71828183
    np.testing.assert_allclose(float(loss), 0.1 * sum(k3) / 2, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["kl"].value), sum(k3) / 2, rtol=1e-6)
    with pytest.raises(ValueError, match="ref_logp is required"):
        policy_loss(logp, logp, jnp.zeros(1), mask, cfg=cfg)
    # beta = 0: no reference needed, no KL metric.
    loss0, metrics0 = policy_loss(logp, logp, jnp.zeros(1), mask, cfg=PolicyLossConfig())
    assert float(loss0) == 0.0 and "kl" not in metrics0


def test_entropy_hand_values_and_torch():
    logits = jnp.array(
        [[[0.0, 0.0, 0.0, 0.0], [0.0, math.log(2), -jnp.inf, -jnp.inf],
          [0.0, -jnp.inf, -jnp.inf, -jnp.inf], [1000.0, 1000.0, -jnp.inf, -1e30]]]
    )
    # ln 4; p = (1/3, 2/3): -(1/3 ln 1/3 + 2/3 ln 2/3); a one-hot: 0; two equal huge logits: ln 2.
    want = [math.log(4), 0.6365141682948128, 0.0, math.log(2)]
    np.testing.assert_allclose(np.asarray(entropy_from_logits(logits))[0], want, rtol=1e-6)
    got_bf16 = entropy_from_logits(jnp.zeros((1, 1, 8), jnp.bfloat16))
    assert got_bf16.dtype == jnp.float32
    np.testing.assert_allclose(float(got_bf16[0, 0]), math.log(8), rtol=1e-6)

    rnd = np.random.default_rng(0).normal(size=(2, 3, 11)).astype(np.float32) * 4
    ref = torch.distributions.Categorical(logits=torch.from_numpy(rnd)).entropy().numpy()
    np.testing.assert_allclose(np.asarray(entropy_from_logits(jnp.asarray(rnd))), ref, rtol=1e-5)


# ------------------------------------------------------------------------------------------
# Config validation


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"loss_agg_mode": "seq-mean"}, r"loss_agg_mode.*'seq-mean'.*'token-mean'"),
        ({"kl_estimator": "k4"}, r"kl_estimator.*'k4'.*\['k1', 'k2', 'k3'\]"),
        ({"epsilon": 0.0}, "epsilon must be"),
        ({"epsilon_high": -0.1}, "epsilon_high must be"),
        ({"dual_clip": 1.0}, "dual_clip must be > 1"),
        ({"beta": -1.0}, "beta must be"),
        ({"kl_clamp": 0.0}, "kl_clamp must be"),
        ({"loss_agg_constant": 0.0}, "loss_agg_constant must be"),
    ],
)
def test_config_validation(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        PolicyLossConfig(**kwargs)


def test_config_defaults_are_the_recipe():
    cfg = PolicyLossConfig()
    assert (cfg.epsilon, cfg.epsilon_high, cfg.dual_clip) == (0.2, 0.28, 3.0)
    assert (cfg.loss_agg_mode, cfg.beta, cfg.kl_estimator) == ("token-mean", 0.0, "k3")
    assert set(LOSS_AGGREGATIONS.names()) == set(MODES)


# ------------------------------------------------------------------------------------------
# Exactness: micro-batches and sharding give the full mini-batch's loss and gradient


def _logp(w, x, tokens):
    """Sampled-token log-probs of a toy policy: logits = x @ w. [B,T,D], [D,V] -> [B,T]."""
    logp_all = jax.nn.log_softmax(x @ w, axis=-1)
    return jnp.take_along_axis(logp_all, tokens[..., None], axis=-1)[..., 0]


def _problem(batch, dtype, seed=0, t=6, v=5, d=3):
    k = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(k[0], (batch, t, d), dtype)
    w = jax.random.normal(k[1], (d, v), dtype)
    tokens = jax.random.randint(k[2], (batch, t), 0, v)
    # Old and reference policies far enough from w that every clip branch is hit.
    old = _logp(w + 0.8 * jax.random.normal(k[3], (d, v), dtype), x, tokens)
    ref = _logp(w + 0.5 * jax.random.normal(k[4], (d, v), dtype), x, tokens)
    adv = jax.random.normal(k[5], (batch,), dtype)
    lengths = jnp.array([6, 1, 4, 0, 3, 6, 2, 5] * (batch // 8))  # ragged, one empty row / 8
    mask = (jnp.arange(t)[None, :] < lengths[:, None]).astype(jnp.int32)
    return w, (x, tokens, old, ref, adv, mask)


def _loss_fn(w, batch, cfg, den):
    x, tokens, old, ref, adv, mask = batch
    return policy_loss(_logp(w, x, tokens), old, adv, mask, cfg=cfg, ref_logp=ref,
                       global_denominator=den)


_grad = jax.jit(jax.value_and_grad(_loss_fn, has_aux=True), static_argnums=2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("mode", MODES)
def test_micro_batches_sum_to_full_batch_gradient(mode, dtype):
    with jax.enable_x64(dtype == jnp.float64):
        cfg = PolicyLossConfig(loss_agg_mode=mode, beta=0.05, loss_agg_constant=6.0)
        w, batch = _problem(8, dtype, seed=3)
        (loss, metrics), grad = _grad(w, batch, cfg, None)
        m = finalize_metrics(metrics)
        # The data reaches every branch of the loss, so the test covers them.
        assert m["clipfrac_high"] > 0 and m["clipfrac_low"] > 0 and m["dual_clipfrac"] > 0

        den = loss_denominator(batch[-1], mode, norm_constant=6.0)
        mb_loss, mb_grad, mb_metrics = 0.0, jnp.zeros_like(w), None
        naive_grad = jnp.zeros_like(w)
        for i in range(4):
            micro = tuple(a[2 * i : 2 * i + 2] for a in batch)
            (l_i, met_i), g_i = _grad(w, micro, cfg, den)
            mb_loss, mb_grad = mb_loss + l_i, mb_grad + g_i
            mb_metrics = met_i if mb_metrics is None else jax.tree.map(jnp.add, mb_metrics, met_i)
            # What exactness rules out: each micro-batch normalised by its own count, averaged.
            naive_grad = naive_grad + _grad(w, micro, cfg, None)[1] / 4

        tol = 1e-6 if dtype == jnp.float32 else 1e-12
        assert grad.dtype == dtype
        np.testing.assert_allclose(float(mb_loss), float(loss), rtol=tol, atol=tol)
        np.testing.assert_allclose(np.asarray(mb_grad), np.asarray(grad), rtol=tol, atol=tol)
        for name, value in finalize_metrics(mb_metrics).items():
            np.testing.assert_allclose(float(value), float(m[name]), rtol=tol, atol=tol,
                                       err_msg=name)
        assert np.max(np.abs(np.asarray(naive_grad - grad))) > 1e-3


@pytest.fixture(scope="module")
def mesh():
    assert len(jax.devices()) == 8, "tests/conftest.py sets 8 fake CPU devices"
    return Mesh(np.array(jax.devices()).reshape(8), ("data",))


@pytest.mark.parametrize("mode", MODES)
def test_sharded_jit_equals_single_device(mesh, mode):
    cfg = PolicyLossConfig(loss_agg_mode=mode, beta=0.05)
    w, batch = _problem(16, jnp.float32, seed=1)
    one = jax.devices()[0]
    (loss1, _), grad1 = _grad(jax.device_put(w, one), jax.device_put(batch, one), cfg, None)
    grad1.block_until_ready()

    sharded = jax.device_put(batch, NamedSharding(mesh, P("data")))
    assert len(sharded[0].sharding.device_set) == 8
    (loss8, metrics8), grad8 = _grad(jax.device_put(w, NamedSharding(mesh, P())), sharded,
                                     cfg, None)
    grad8.block_until_ready()
    np.testing.assert_allclose(float(loss8), float(loss1), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grad8), np.asarray(grad1), rtol=1e-6, atol=1e-6)
    assert isinstance(metrics8["pg_loss"], WeightedMean)


@pytest.mark.parametrize("mode", MODES)
def test_shard_map_with_global_denominator_equals_single_device(mesh, mode):
    """Each device computes its shard's loss over the global denominator; gradients psum."""
    cfg = PolicyLossConfig(loss_agg_mode=mode, beta=0.05)
    w, batch = _problem(16, jnp.float32, seed=2)
    (loss1, _), grad1 = _grad(w, batch, cfg, None)
    grad1.block_until_ready()
    den = loss_denominator(batch[-1], mode)

    def per_shard(w, batch, den):
        (loss, _), grad = jax.value_and_grad(_loss_fn, has_aux=True)(w, batch, cfg, den)
        return jax.lax.psum(loss, "data"), jax.lax.psum(grad, "data")

    fn = jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=(P(), P("data"), P()),
                               out_specs=(P(), P()), check_vma=False))
    loss8, grad8 = fn(w, batch, den)
    grad8.block_until_ready()
    np.testing.assert_allclose(float(loss8), float(loss1), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grad8), np.asarray(grad1), rtol=1e-6, atol=1e-6)
