"""Model: a source (hub id, folder, ``.gguf``) in, an MLX model out.

Owns loading (``loading``), GGUF reading (``gguf``), affine storage, the quantized
matmul and the frozen-layer protocol (``quant``), NF4 storage (``nf4``), whole-model
quantization (``quantize``), the packing-aware attention (``attention``), the model's
body and head with its logit map (``head``), the packing proof (``packing``), published
configs (``known_configs``) and chat templates for models without one (``chat_templates``).
May import ``runtime``, ``config``, ``atomic`` and ``errors``.
"""
