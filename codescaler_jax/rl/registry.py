"""A tiny name -> function registry, so a variant (an advantage estimator, a loss
aggregation, a KL estimator) is a new registered function rather than a new ``if`` branch.

Config fields hold the registered name; ``Registry.get`` turns it into the function and an
unknown name fails with a message listing the allowed names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    """Functions of one kind, looked up by name.

    Example::

        KL_ESTIMATORS: Registry[Callable] = Registry("kl_estimator")

        @KL_ESTIMATORS.register("k1")
        def _k1(logp, ref_logp): ...

        KL_ESTIMATORS.get("k1")
    """

    def __init__(self, kind: str):
        """``kind`` names what is registered (usually the config field); used in errors."""
        self.kind = kind
        self._fns: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator registering ``fn`` under ``name``; a second function for one name fails."""

        def deco(fn: F) -> F:
            if name in self._fns:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._fns[name] = fn
            return fn

        return deco

    def get(self, name: str) -> F:
        """The function registered as ``name``; ValueError naming the allowed names if none."""
        try:
            return self._fns[name]
        except KeyError:
            raise ValueError(
                f"{self.kind}: unknown value {name!r}; allowed: {sorted(self._fns)}"
            ) from None

    def check(self, name: str) -> None:
        """Raise the same ValueError as ``get`` when ``name`` is not registered."""
        self.get(name)

    def names(self) -> tuple[str, ...]:
        """Registered names, in registration order."""
        return tuple(self._fns)

    def __contains__(self, name: object) -> bool:
        return name in self._fns

    def __iter__(self) -> Iterator[str]:
        return iter(self._fns)
