"""Generation engines: turning prompts into responses with a policy model.

- ``sampler``: the jit-compiled decode loop over a static KV cache (``JaxSampler``), the
  ``Sampler`` interface the GRPO trainer and the evaluations use, and the ``SAMPLERS``
  registry of engines by name (config ``rollout.engine``).
- ``engine``: the continuous-batching engine (``ContinuousSampler``, engine ``continuous``):
  fixed decode slots refilled with waiting prompts as rows finish.
"""
