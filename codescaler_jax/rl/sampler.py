"""Old location of the sampler, kept as a re-export for one release.

The sampler lives in ``codescaler_jax.generate.sampler`` (evaluation imports it from there, so
``eval/`` no longer depends on ``rl/``); import it from there.
"""

from codescaler_jax.generate.sampler import *  # noqa: F401,F403
