"""Supervised fine-tuning of the policy: the warm start GRPO begins from."""
