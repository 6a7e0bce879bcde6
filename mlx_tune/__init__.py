"""mlx_tune: LoRA and QLoRA fine-tuning of open LLMs on MLX.

The pipeline, one module per stage: ``data`` (raw files to JSONL) -> ``batching``
(tokens, masks, packing) -> ``loading`` (hub / folder / GGUF to an MLX model) ->
``lora`` + ``adapters`` (trainable low-rank layers) -> ``trainer`` -> ``fuse`` ->
``server`` -> ``evaluation`` (test_mlx.py).
"""

__version__ = "0.1.0"
