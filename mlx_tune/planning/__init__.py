"""Planning: predicted peak training memory (``planner``, from the shapes ``arch`` reads
off a model's config; the weights a full or partial fine-tune trains: ``full``) and its
measurement (``probe``). May import ``model`` (configs,
GGUF metadata), ``training`` (the probe runs the real step), ``runtime``, ``config`` and
``errors``.
"""
