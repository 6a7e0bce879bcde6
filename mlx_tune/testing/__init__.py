"""Testing: tiny models built from mlx-lm's real classes, for tests and benchmarks.
Imports only mlx and mlx-lm.
"""
