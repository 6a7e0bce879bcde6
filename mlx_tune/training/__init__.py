"""Training: batches in, a trained adapter out.

Owns the losses, the loop, recompute (gradient checkpointing), callbacks (metrics,
progress, plot), checkpoints and the library entry point. May import ``data``,
``model``, ``adapters``, ``runtime``, ``config``, ``atomic`` and ``errors``.
"""
