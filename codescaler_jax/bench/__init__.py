"""Benchmarks: each runs our code and a reference side by side and writes JSON."""
