"""Qwen3 decoder with reward (scalar) and causal-LM heads, HF checkpoint I/O, mesh sharding."""
