"""Adapters: LoRA / DoRA layers and the files that hold them.

Owns the layers (``lora``: ``from_base``, ``__call__``, ``fuse``), injection into a
loaded model, adapter files (format, save / load, fingerprint), Hugging Face PEFT
interop (``peft``) and several named adapters on one model. May import ``model``,
``runtime``, ``config``, ``atomic`` and ``errors``.
"""
