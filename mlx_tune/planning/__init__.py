"""Planning: predicted peak training memory (``planner``) and its measurement
(``probe``). May import ``model`` (configs, GGUF metadata), ``training`` (the probe
runs the real step), ``runtime``, ``config`` and ``errors``.
"""
