"""Export: a model plus adapter in, fused files out.

Owns fuse (``fuse``), the writers (MLX, Hugging Face, GGUF: ``gguf``) and the
fidelity report (``fidelity``). May import ``model``, ``adapters``, ``runtime``,
``config``, ``atomic`` and ``errors``.
"""
