"""Validity-preserving reward shaping: RM scores + extraction validity -> per-response rewards.

The reference (recipe section 4.1) rewards a response with ``softplus(s)`` when its extracted code
is valid and 0 when there is no code. softplus is positive and monotone, so every valid solution
outranks every invalid one while the RM's order among valid solutions is kept. The alternatives
exist for ablations and are selected by name (``mode=``); a new variant is a new registered
function, not a new branch.

Shapers are pure jnp functions: ``shape_rewards`` jit-compiles with ``mode`` static and works on
sharded batches.

Numerical policy (the same for every mode, so rewards are always finite):
- scores are cast to float32; NaN is treated as the lowest possible score, +-inf as the largest /
  lowest finite float32;
- for the guarded positive modes (``softplus``, ``sigmoid``) a valid response gets at least
  ``float32.tiny`` (1.2e-38): in float32 softplus(s) and sigmoid(s) underflow to 0 below about
  s = -104, which would tie a valid response with "no code". With this floor, valid > invalid
  holds strictly for every score, NaN included.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from codescaler_jax.registry import SHAPERS

Shaper = Callable[[jax.Array, jax.Array, float], jax.Array]

_F32 = jnp.finfo(jnp.float32)


def register_shaper(name: str) -> Callable[[Shaper], Shaper]:
    """Decorator: make ``fn(scores [B] f32, valid [B] bool, floor) -> [B] f32`` a named mode
    (in ``codescaler_jax.registry.SHAPERS``)."""
    return SHAPERS.register(name)


def _sanitize(scores: jax.Array) -> jax.Array:
    s = jnp.asarray(scores, jnp.float32)
    return jnp.nan_to_num(s, nan=_F32.min, posinf=_F32.max, neginf=_F32.min)


def _positive_floor(x: jax.Array) -> jax.Array:
    return jnp.maximum(x, _F32.tiny)


@register_shaper("softplus")
def _softplus(scores: jax.Array, valid: jax.Array, floor: float) -> jax.Array:
    """Reference default: softplus(s) = log(1 + e^s) if valid else 0 (``floor`` unused)."""
    del floor
    # jax.nn.softplus is logaddexp(s, 0): no overflow for large s, no cancellation for small s.
    return jnp.where(valid, _positive_floor(jax.nn.softplus(scores)), 0.0)


@register_shaper("sigmoid")
def _sigmoid(scores: jax.Array, valid: jax.Array, floor: float) -> jax.Array:
    """sigmoid(s) if valid else 0: bounded in (0, 1) (``floor`` unused)."""
    del floor
    return jnp.where(valid, _positive_floor(jax.nn.sigmoid(scores)), 0.0)


@register_shaper("raw")
def _raw(scores: jax.Array, valid: jax.Array, floor: float) -> jax.Array:
    """s if valid else ``floor`` (default 0): the naive guard; a valid answer with a negative score
    then ranks below "no code", which is what softplus shaping prevents."""
    return jnp.where(valid, scores, jnp.float32(floor))


@register_shaper("raw_unguarded")
def _raw_unguarded(scores: jax.Array, valid: jax.Array, floor: float) -> jax.Array:
    """s whatever the validity (the reference with ``reward_shaping=False``)."""
    del valid, floor
    return scores


def shape_rewards(
    scores: jax.Array, valid: jax.Array, *, mode: str = "softplus", floor: float = 0.0
) -> jax.Array:
    """Rewards ``[B] float32`` from RM scores ``[B]`` and validity flags ``[B] bool``.

    ``mode`` names a registered shaper (`SHAPERS`: softplus, sigmoid, raw, raw_unguarded);
    ``floor`` is the "no code" reward of ``raw``. Under `jax.jit`, pass ``mode`` (and ``floor``)
    as static arguments, e.g. ``jax.jit(shape_rewards, static_argnames=("mode", "floor"))``.
    """
    if mode not in SHAPERS:
        raise ValueError(
            f"unknown shaping mode {mode!r}; registered: {', '.join(sorted(SHAPERS))}"
        )
    shaper = SHAPERS.get(mode)
    s = _sanitize(scores)
    v = jnp.asarray(valid).astype(jnp.bool_)
    if s.shape != v.shape:
        raise ValueError(f"scores {s.shape} and valid {v.shape} must have the same shape")
    return shaper(s, v, float(floor)).astype(jnp.float32)


shape_rewards_jit = jax.jit(shape_rewards, static_argnames=("mode", "floor"))
