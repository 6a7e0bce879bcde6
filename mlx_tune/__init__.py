"""mlx_tune: LoRA and QLoRA fine-tuning of open LLMs on MLX.

One folder per stage of the data flow, in the order a record travels:
``data`` (raw files to records, tokens, packed batches) -> ``model`` (hub / folder /
GGUF to an MLX model) -> ``adapters`` (LoRA layers, adapter files) -> ``training``
(losses, loop, checkpoints) -> ``export`` (fuse, writers, fidelity) -> ``server`` ->
``evaluation`` (test_mlx.py). ``runtime`` decides the backend, ``planning`` predicts
memory, ``cli`` is the thin command layer and ``testing`` builds tiny models.
"""

__version__ = "0.1.0"
