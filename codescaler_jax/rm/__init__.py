"""Reward-model training (Bradley-Terry loss, train step) and reward shaping."""
