"""Rollout engines: the static decode loop (``rl.sampler``) and the continuous-batching one."""
