"""GRPO / RLOO advantages against values computed by hand or with plain Python ``statistics``."""

import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codescaler_jax.rl.advantages import (
    ADVANTAGE_ESTIMATORS,
    compute_advantages,
    token_advantages,
)

EPS = 1e-6


def _reference(rewards, g, estimator, scale):
    """Plain-Python advantages: loops, ``statistics.mean``/``stdev`` (ddof=1)."""
    out = []
    batch_std = statistics.stdev(rewards)
    for start in range(0, len(rewards), g):
        grp = rewards[start : start + g]
        if len(set(grp)) == 1:
            out += [0.0] * g
            continue
        for i, r in enumerate(grp):
            if estimator == "grpo":
                centered = r - statistics.mean(grp)
            else:
                others = grp[:i] + grp[i + 1 :]
                centered = r - sum(others) / len(others)
            if scale == "group":
                centered /= statistics.stdev(grp) + EPS
            elif scale == "batch":
                centered /= batch_std + EPS
            out.append(centered)
    return out


def test_grpo_group_hand_values():
    # Group [0, 1]: mean 0.5, std sqrt(0.5); A = +-0.5 / (0.70710678 + 1e-6) = +-0.70710578.
    # Group [3, 1]: mean 2, std sqrt(2);    A = +-1 / (1.41421356 + 1e-6) = +-0.70710628.
    adv = compute_advantages(jnp.array([0.0, 1.0, 3.0, 1.0]), num_generations=2)
    np.testing.assert_allclose(
        np.asarray(adv), [-0.70710578, 0.70710578, 0.70710628, -0.70710628], rtol=3e-7
    )


def test_grpo_group_g4_hand_values():
    # [1, 2, 3, 4]: mean 2.5; std = sqrt((2.25 + 0.25 + 0.25 + 2.25) / 3) = sqrt(5/3) = 1.29099445
    adv = compute_advantages(jnp.array([1.0, 2.0, 3.0, 4.0]), num_generations=4)
    expected = np.array([-1.5, -0.5, 0.5, 1.5]) / (1.2909944487358056 + EPS)
    np.testing.assert_allclose(np.asarray(adv), expected, rtol=1e-6)
    np.testing.assert_allclose(expected, [-1.16189, -0.38730, 0.38730, 1.16189], rtol=1e-5)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_against_python_statistics(estimator, scale):
    rewards = [0.2, 0.9, 0.4, 0.4, 0.1, 0.1, 0.1, 0.1, 1.3, 0.0, 0.7, 2.5]
    adv = compute_advantages(
        jnp.array(rewards), num_generations=4, estimator=estimator, scale_rewards=scale
    )
    np.testing.assert_allclose(
        np.asarray(adv), _reference(rewards, 4, estimator, scale), rtol=2e-6, atol=1e-6
    )


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_identical_groups_are_exactly_zero(scale):
    # float32 mean of eight 0.1s is 0.1 + 7.45e-9; divided by (std + 1e-6) that is not 0
    # unless the constant group is handled explicitly.
    rewards = jnp.array([0.1] * 8 + [0.0, 1.0] * 4, jnp.float32)
    adv = compute_advantages(rewards, num_generations=8, scale_rewards=scale)
    assert np.all(np.asarray(adv[:8]) == 0.0)
    assert np.all(np.asarray(adv[8:]) != 0.0)


def test_batch_scale_hand_values():
    # rewards [0, 2 | 1, 1]: group means 1 and 1; batch std of [0,2,1,1] = sqrt(2/3) = 0.81649658
    adv = compute_advantages(jnp.array([0.0, 2.0, 1.0, 1.0]), num_generations=2,
                             scale_rewards="batch")
    a = 1.0 / (0.816496580927726 + EPS)
    np.testing.assert_allclose(np.asarray(adv), [-a, a, 0.0, 0.0], rtol=1e-6)


def test_none_scale_is_group_mean_subtraction():
    adv = compute_advantages(jnp.array([1.0, 2.0, 3.0, 6.0]), num_generations=4,
                             scale_rewards="none")
    np.testing.assert_allclose(np.asarray(adv), [-2.0, -1.0, 0.0, 3.0], rtol=1e-6)


def test_rloo_hand_values():
    # [1, 2, 3, 4]: baselines are the means of the other three: 3, 8/3, 7/3, 2.
    adv = compute_advantages(jnp.array([1.0, 2.0, 3.0, 4.0]), num_generations=4,
                             estimator="rloo", scale_rewards="none")
    np.testing.assert_allclose(np.asarray(adv), [-2.0, -2 / 3, 2 / 3, 2.0], rtol=1e-6)


def test_jit_and_float64():
    rewards = jnp.array([0.3, 0.5, 0.9, 0.2, 0.2, 0.8])
    fn = jax.jit(compute_advantages, static_argnames=("num_generations", "estimator",
                                                      "scale_rewards", "eps"))
    np.testing.assert_allclose(
        np.asarray(fn(rewards, num_generations=3)),
        np.asarray(compute_advantages(rewards, num_generations=3)),
        rtol=1e-6,
    )
    with jax.enable_x64(True):
        r64 = [0.3, 0.5, 0.9, 0.2, 0.2, 0.8]
        adv = compute_advantages(jnp.array(r64, jnp.float64), num_generations=3)
        assert adv.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(adv), _reference(r64, 3, "grpo", "group"),
                                   rtol=1e-12)


def test_bad_arguments():
    r = jnp.zeros(6)
    with pytest.raises(ValueError, match=r"estimator.*'gae'.*\['grpo', 'rloo'\]"):
        compute_advantages(r, num_generations=3, estimator="gae")
    with pytest.raises(ValueError, match=r"scale_rewards.*'std'.*group"):
        compute_advantages(r, num_generations=3, scale_rewards="std")
    with pytest.raises(ValueError, match="multiple of num_generations"):
        compute_advantages(r, num_generations=4)
    with pytest.raises(ValueError, match="num_generations must be >= 2"):
        compute_advantages(r, num_generations=1)
    assert set(ADVANTAGE_ESTIMATORS.names()) == {"grpo", "rloo"}


def test_token_advantages():
    adv = jnp.array([0.5, -2.0])
    mask = jnp.array([[1, 1, 0], [1, 0, 0]])
    np.testing.assert_array_equal(
        np.asarray(token_advantages(adv, mask)), [[0.5, 0.5, 0.0], [-2.0, 0.0, 0.0]]
    )
