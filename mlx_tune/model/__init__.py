"""Model: a source (hub id, folder, ``.gguf``) in, an MLX model out.

Owns loading (``loading``), GGUF reading (``gguf``), quantized storage and matmul
(``quant``), the attention and head paths (``attention``) and published configs
(``known_configs``). May import ``runtime``, ``config`` and ``errors``.
"""
