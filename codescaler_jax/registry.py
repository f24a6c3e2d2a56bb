"""Named variants: a tiny name -> function registry, and every registry of the package.

A variant (a reward shaping, a reward, an advantage estimator, a loss aggregation, a KL
estimator, a rollout engine) is a new registered function rather than a new ``if`` branch.
Config fields hold the registered name; ``Registry.get`` turns it into the function and an
unknown name fails with a message listing the allowed names.

Each registry is declared here with the names of its built-in entries and the module that
defines them (``home``). Validating a config only needs the names, so it imports neither that
module nor jax; ``get`` imports the home module the first time a function is wanted. The
functions themselves are registered in their home module with ``@REGISTRY.register(name)``
(a test checks that the declared names and the registered built-ins agree), and a function
registered at run time (a plugin, a test) is known from then on.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    """Functions of one kind, looked up by name.

    Example::

        KL_ESTIMATORS: Registry[Callable] = Registry(
            "kl_estimator", home="codescaler_jax.rl.losses", names=("k1", "k2", "k3"))

        @KL_ESTIMATORS.register("k1")        # in codescaler_jax/rl/losses.py
        def _k1(logp, ref_logp): ...

        KL_ESTIMATORS.check("k1")            # names only: no import
        KL_ESTIMATORS.get("k1")              # imports the home module if needed
    """

    def __init__(
        self, kind: str, *, home: str | tuple[str, ...] | None = None,
        names: tuple[str, ...] = (),
    ):
        """``kind`` names what is registered (usually the config field; used in errors);
        ``home`` is the module (or modules) that register the built-in ``names``."""
        self.kind = kind
        self.homes: tuple[str, ...] = (home,) if isinstance(home, str) else tuple(home or ())
        self.declared = tuple(names)
        self._fns: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator registering ``fn`` under ``name``; a second function for one name fails."""

        def deco(fn: F) -> F:
            if name in self._fns:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._fns[name] = fn
            return fn

        return deco

    def _error(self, name: object) -> ValueError:
        return ValueError(f"{self.kind}: unknown value {name!r}; allowed: {sorted(self.names())}")

    def get(self, name: str) -> F:
        """The function registered as ``name``; ValueError naming the allowed names if none."""
        if name not in self._fns:
            for home in self.homes:
                importlib.import_module(home)  # registers the built-ins
        try:
            return self._fns[name]
        except KeyError:
            raise self._error(name) from None

    def check(self, name: str) -> None:
        """Raise the same ValueError as ``get`` when ``name`` is not a known name (declared
        or registered); imports nothing."""
        if name not in self:
            raise self._error(name)

    def names(self) -> tuple[str, ...]:
        """The declared names, then any others registered, in registration order."""
        return self.declared + tuple(n for n in self._fns if n not in self.declared)

    def registered(self) -> dict[str, F]:
        """The functions registered so far (the built-ins once the home module is imported)."""
        return dict(self._fns)

    def __contains__(self, name: object) -> bool:
        return name in self.declared or name in self._fns

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, names={self.names()})"


# Every registry, declared here so that a config names its entries without importing them.
SHAPERS: Registry[Any] = Registry(
    "shaping mode", home="codescaler_jax.rm.shaping",
    names=("softplus", "sigmoid", "raw", "raw_unguarded"),
)
REWARDS: Registry[Any] = Registry(
    "reward.name", home="codescaler_jax.rl.rewards",
    names=("codescaler", "execution", "mix", "token_fraction"),
)
ADVANTAGE_ESTIMATORS: Registry[Any] = Registry(
    "estimator", home="codescaler_jax.rl.advantages", names=("grpo", "rloo"),
)
LOSS_AGGREGATIONS: Registry[Any] = Registry(
    "loss_agg_mode", home="codescaler_jax.rl.losses",
    names=("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"),
)
KL_ESTIMATORS: Registry[Any] = Registry(
    "kl_estimator", home="codescaler_jax.rl.losses", names=("k1", "k2", "k3"),
)
SAMPLERS: Registry[Any] = Registry(
    "rollout.engine",
    home=("codescaler_jax.generate.sampler", "codescaler_jax.generate.engine"),
    names=("jax", "continuous"),
)
ALL: tuple[Registry[Any], ...] = (
    SHAPERS, REWARDS, ADVANTAGE_ESTIMATORS, LOSS_AGGREGATIONS, KL_ESTIMATORS, SAMPLERS,
)
