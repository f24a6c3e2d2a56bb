"""Old location of ``Registry``, kept as a re-export for one release: use
``codescaler_jax.registry``, which also declares every registry of the package."""

from codescaler_jax.registry import Registry  # noqa: F401
