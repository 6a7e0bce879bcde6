"""Testing: tiny models built from mlx-lm's real classes, for tests and benchmarks
(``tiny``), and the registry of tested model families with the README table rendered from
it (``families``). Imports mlx and mlx-lm; ``families`` reads the GGUF reader's and
writer's architecture lists (``model.gguf``, ``export.gguf``) inside its table functions.
"""
