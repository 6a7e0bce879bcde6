"""Export: a model plus adapter in, fused files out.

Owns fuse (``fuse``: options, checks, the write / load back / compare loop, the report),
the model as units of arrays (``units``), the writers (``writers``: safetensors shards,
MLX / Hugging Face folders; ``gguf``: GGUF files) and the fidelity report
(``fidelity``), and a full fine-tune's model folder and its export (``full``). May
import ``model``, ``adapters``, ``runtime``, ``config``, ``atomic`` and ``errors``.
"""
