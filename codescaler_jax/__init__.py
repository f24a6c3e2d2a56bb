"""codescaler-jax: execution-free reward models for code (CodeScaler) in JAX/Flax.

Sub-packages, one concept each: ``models`` (Qwen3 decoder, RM/LM heads, HF I/O, sharding),
``code`` (extraction, validity, sandbox), ``data`` (problems, pairs, Grain pipelines,
tokenizer), ``rm`` (Bradley-Terry loss, train step, reward shaping), ``rl`` (sampler, GRPO),
``eval`` (metrics, best-of-N), ``bench`` (benchmarks).
"""

__version__ = "0.1.0"
