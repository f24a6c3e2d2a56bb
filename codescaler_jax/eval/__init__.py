"""Evaluation: pairwise accuracy, RM-Bench, Avg@k, best-of-N."""
