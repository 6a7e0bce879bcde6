"""Which weights a full or partial fine-tune trains, counted from the architecture alone.

The planner has no model to ask for ``named_modules()``, so the module paths are those of a
llama-style mlx-lm model built from ``Arch``: ``model.embed_tokens``, ``model.layers.<i>``
with ``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj`` (MoE blocks: ``mlp.switch_mlp.*``
and the router ``mlp.gate``), ``input_layernorm``, ``post_attention_layernorm``, then
``model.norm`` and ``lm_head`` (untied). A ``train.trainable`` regex is matched the way
``adapters.trainable`` matches it (``re.fullmatch``, a module takes everything under it).

Each trained weight costs, besides its forward use (``training.full``)::

    master   4 bytes (fp32; the stored half copy it replaces is not kept)
    gradient 4 bytes (fp32)
    states   4 bytes x k   (AdamW / Adam: k = 2, m and v; SGD: 0; Adafactor: ~0, factored)
    update   4 bytes x (1 + k) x 0.85   (the step's new weights and states, most of them
                                         alive with the old ones: calibrated, ``planner``)

so a full AdamW fine-tune needs about 26 bytes per weight before activations (checked
against a measured step in ``tests/test_full_finetune.py``; mixed-precision trainers that
keep a half copy for the forward and update in place reach about 16-18).
"""

from __future__ import annotations

import re

from mlx_tune.planning.arch import Arch

OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd": 0, "adafactor": 0}


def module_params(arch: Arch) -> dict[str, int]:
    """Leaf module path -> parameter count of a llama-style model with ``arch``'s shapes."""
    d = arch.hidden
    out: dict[str, int] = {"model.embed_tokens": arch.vocab * d, "model.norm": d}
    if not arch.tied:
        out["lm_head"] = arch.vocab * d
    for i in range(arch.layers):
        b = f"model.layers.{i}"
        moe = i >= arch.dense_layers  # planner convention: count where, not which, blocks are MoE
        linears = arch.attention_linears() if moe else arch.linears()
        for name, (n_in, n_out) in linears.items():
            group = "self_attn" if name in arch.attention_linears() else "mlp"
            out[f"{b}.{group}.{name}"] = n_in * n_out + (n_out if arch.attention_bias and group == "self_attn" else 0)
        if moe:
            for name, (n_in, n_out) in arch.expert_linears().items():
                out[f"{b}.mlp.switch_mlp.{name}"] = arch.num_experts * n_in * n_out
            out[f"{b}.mlp.gate"] = d * arch.num_experts
        if arch.qk_norm:
            out[f"{b}.self_attn.q_norm"] = out[f"{b}.self_attn.k_norm"] = arch.head_dim
        out[f"{b}.input_layernorm"] = out[f"{b}.post_attention_layernorm"] = d
    return out


def _trained(finetune: str, patterns: tuple[str, ...]):
    compiled = [re.compile(p) for p in patterns]

    def trained(path: str) -> bool:
        if finetune == "full" and not patterns:
            return True
        parts = path.split(".")
        prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
        return any(rx.fullmatch(p) for rx in compiled for p in prefixes)
    return trained


def trained_params(arch: Arch, finetune: str, patterns: tuple[str, ...]) -> int:
    """Weights trained besides a LoRA adapter (``lora``) or instead of it (``full``)."""
    trained = _trained(finetune, patterns)
    return sum(n for path, n in module_params(arch).items() if trained(path))


def head_trained(arch: Arch, finetune: str, patterns: tuple[str, ...]) -> bool:
    """Whether the LM head (the embedding, when tied) trains: the loss then keeps its fp32 gradient."""
    return _trained(finetune, patterns)("model.embed_tokens" if arch.tied else "lm_head")
