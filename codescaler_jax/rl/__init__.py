"""Reinforcement learning: sampler, rewards, GRPO advantages and policy loss."""
