"""Reward shaping: values against a float64 numpy reference, the validity guard, the numerical
policy (strict valid > invalid for the positive modes, finite rewards), jit and sharding."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from codescaler_jax.rm.shaping import SHAPERS, shape_rewards, shape_rewards_jit

EXTREMES = [-1e4, -1e3, -200.0, -104.0, -88.0, -20.0, -0.03, 0.0, 6.54, 20.0, 88.0, 1e3, 1e4,
            float("nan"), float("inf"), float("-inf")]


def softplus64(s: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, s.astype(np.float64))


def test_modes_registered():
    assert {"softplus", "sigmoid", "raw", "raw_unguarded"} <= set(SHAPERS)


def test_softplus_matches_float64_reference():
    s = np.linspace(-30, 30, 1001).astype(np.float32)
    valid = np.ones_like(s, dtype=bool)
    got = np.asarray(shape_rewards(s, valid))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, softplus64(s), rtol=2e-6, atol=1e-30)
    # Hand values: softplus(0) = ln 2; the README example scores 6.54 and -0.03.
    hand = shape_rewards(jnp.array([0.0, 6.54, -0.03]), jnp.array([True, True, True]))
    np.testing.assert_allclose(
        hand, [math.log(2.0), math.log1p(math.exp(6.54)), math.log1p(math.exp(-0.03))],
        rtol=1e-6)


def test_sigmoid_and_raw_modes():
    s = np.array([-3.0, 0.0, 2.5], np.float32)
    v = np.array([True, False, True])
    np.testing.assert_allclose(shape_rewards(s, v, mode="sigmoid"),
                               [1 / (1 + math.exp(3.0)), 0.0, 1 / (1 + math.exp(-2.5))], rtol=1e-6)
    np.testing.assert_array_equal(shape_rewards(s, v, mode="raw"), [-3.0, 0.0, 2.5])
    np.testing.assert_array_equal(shape_rewards(s, v, mode="raw", floor=-5.0), [-3.0, -5.0, 2.5])
    np.testing.assert_array_equal(shape_rewards(s, v, mode="raw_unguarded"), s)


@pytest.mark.parametrize("mode", ["softplus", "sigmoid"])
def test_invalid_always_below_valid(mode):
    """Whatever the scores, including extremes, inf and nan (the float32 floor keeps softplus
    and sigmoid of very negative scores above the 0 of "no code")."""
    s = np.array(EXTREMES * 2, np.float32)
    valid = np.array([True] * len(EXTREMES) + [False] * len(EXTREMES))
    r = np.asarray(shape_rewards(s, valid, mode=mode))
    assert np.all(np.isfinite(r))
    assert np.all(r[~valid] == 0.0)
    assert r[valid].min() > r[~valid].max()
    # Randomised as well.
    rng = np.random.default_rng(0)
    s = (rng.standard_normal(4096) * 10 ** rng.uniform(-2, 4, 4096)).astype(np.float32)
    valid = rng.random(4096) < 0.5
    r = np.asarray(shape_rewards(s, valid, mode=mode))
    assert r[valid].min() > 0.0 and np.all(r[~valid] == 0.0)


@pytest.mark.parametrize("mode", ["softplus", "sigmoid", "raw"])
def test_order_among_valid_is_kept(mode):
    s = np.sort(np.random.default_rng(1).standard_normal(512).astype(np.float32) * 50)
    r = np.asarray(shape_rewards(s, np.ones(512, bool), mode=mode))
    assert np.all(np.diff(r) >= 0)  # monotone (saturation may tie, never invert)


def test_numerical_policy_nan_and_inf():
    s = np.array([np.nan, np.inf, -np.inf, np.nan], np.float32)
    v = np.array([True, True, True, False])
    tiny = np.finfo(np.float32).tiny
    sp = np.asarray(shape_rewards(s, v))
    assert sp[0] == tiny and sp[2] == tiny and sp[3] == 0.0  # nan -> lowest score
    assert sp[1] == np.finfo(np.float32).max
    for mode in SHAPERS:
        assert np.all(np.isfinite(np.asarray(shape_rewards(s, v, mode=mode))))
    raw = np.asarray(shape_rewards(s, v, mode="raw_unguarded"))
    assert raw[0] == np.finfo(np.float32).min


def test_the_naive_guard_can_rank_valid_below_no_code():
    """Why softplus: with raw scores a valid answer scored -0.03 ranks below no code (0)."""
    s = np.array([-0.03, 5.0], np.float32)
    v = np.array([True, False])
    raw = np.asarray(shape_rewards(s, v, mode="raw"))
    assert raw[0] < raw[1]
    sp = np.asarray(shape_rewards(s, v))
    assert sp[0] > sp[1]


def test_jit_matches_eager_and_dtypes():
    s = jnp.asarray(np.linspace(-50, 50, 64), jnp.bfloat16)
    v = jnp.arange(64) % 3 != 0
    for mode in SHAPERS:
        eager = shape_rewards(s, v, mode=mode)
        jitted = shape_rewards_jit(s, v, mode=mode).block_until_ready()
        assert jitted.dtype == jnp.float32 and jitted.shape == (64,)
        np.testing.assert_array_equal(np.asarray(eager), np.asarray(jitted))


def test_sharded_batch():
    devices = np.array(jax.devices())
    mesh = Mesh(devices, ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    n = 16 * len(devices)
    s = jax.device_put(jnp.linspace(-10.0, 10.0, n), sharding)
    v = jax.device_put(jnp.arange(n) % 2 == 0, sharding)
    r = shape_rewards_jit(s, v).block_until_ready()
    expected = np.where(np.arange(n) % 2 == 0, softplus64(np.linspace(-10.0, 10.0, n)), 0.0)
    np.testing.assert_allclose(np.asarray(r), expected, rtol=2e-6)
    assert r.sharding.is_equivalent_to(sharding, 1)


def test_errors():
    with pytest.raises(ValueError, match="unknown shaping mode 'tanh'.*softplus"):
        shape_rewards(jnp.zeros(2), jnp.ones(2, bool), mode="tanh")
    with pytest.raises(ValueError, match="same shape"):
        shape_rewards(jnp.zeros(2), jnp.ones(3, bool))
