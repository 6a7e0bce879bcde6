"""Training: batches in, a trained adapter out.

Owns the losses, the loop, recompute (gradient checkpointing), callbacks (metrics,
progress, plot), the best step / keep-best / early stopping (``best``), run trackers
(``tracking``), checkpoints and the library entry point. May import ``data``, ``model``,
``adapters``, ``runtime``, ``config``, ``atomic``, ``errors``, ``evaluation`` (the eval
prompts are answered by ``evaluation.live`` during training) and ``export`` (a full
fine-tune writes its model folder with ``export.full``), and, for GRPO (``grpo``,
``grpo_loss``, ``grpo_rollout``, ``rewards``), ``server``'s sampler and tool-call parser.
What a run trains (an adapter, every weight, or the ``train.trainable`` modules) is
``full``; preference methods are ``preference`` (plumbing) and ``preference_losses``.

The entry point is ``training.run.run_train(cfg)``; it is not re-exported here, so that
importing a light module such as ``training.loss_shapes`` (the planner does) does not
load the model, data and adapter stages.
"""
