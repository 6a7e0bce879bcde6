"""Base modules trained by name (``train.trainable``) and the base weights an adapter carries.

``train.trainable: [regex, ...]`` names module paths as ``model.named_modules()`` spells
them (``model.embed_tokens``, ``model.layers.3``, ``model.layers.0.input_layernorm``); a
module whose path *fully* matches one regex is trained with everything under it
(``re.fullmatch``, as PEFT matches a ``target_modules`` string, so ``model.layers.1`` does
not also take ``model.layers.10``).

With ``finetune: lora`` these modules are trained besides the adapter (PEFT's
``modules_to_save``): their weights are written into ``adapters.safetensors`` under the
model's own names (``model.norm.weight``; mlx-lm's ``load_weights(strict=False)`` takes them
too) and listed in ``adapter_config.json`` as ``trained_weights``; loading the adapter
replaces those base weights (``apply_base_weights``), fusing writes them. They must be
dense and hold no LoRA layer (a LoRA-wrapped linear is already trained through its adapter).

Loading such an adapter changes the base for everything served on that model (other
adapters and base-only requests too): serve it alone, or fuse it.
"""

from __future__ import annotations

import re
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlx_tune.adapters.lora import LoRAAdapter, LoRALinear, is_packed
from mlx_tune.errors import UserError

EXAMPLES = 6  # module paths shown when a regex matches nothing


def _flat(tree: Any) -> list[tuple[str, mx.array]]:
    return cast("list[tuple[str, mx.array]]", tree_flatten(tree))


def example_paths(model: nn.Module) -> list[str]:
    """A few real module paths of ``model``: the top level and the first block's kinds."""
    paths = [p for p, _ in model.named_modules() if p]
    first = [p for p in paths if not re.search(r"\.([1-9]\d*)(\.|$)", p)]  # block 0 and the rest
    picked = sorted(first, key=lambda p: (p.count("."), p))
    return sorted(picked[:EXAMPLES])


def match_modules(model: nn.Module, patterns: list[str]) -> list[str]:
    """Paths of the modules some regex of ``patterns`` fully matches (outermost first).

    A regex that matches nothing is a one-line UserError listing a few real paths.
    """
    paths = [p for p, _ in model.named_modules() if p]
    compiled = [re.compile(p) for p in patterns]
    for rx in compiled:
        if not any(rx.fullmatch(p) for p in paths):
            raise UserError(f"train.trainable: {rx.pattern!r} matches no module path; paths look like "
                            f"{', '.join(example_paths(model))} (the regex must match a whole path)")
    chosen = [p for p in paths if any(rx.fullmatch(p) for rx in compiled)]
    return sorted(p for p in chosen if not any(p.startswith(q + ".") for q in chosen))


def unfreeze_modules(model: nn.Module, paths: list[str], *, lora: bool) -> None:
    """Make every parameter under ``paths`` trainable.

    ``lora``: the modules train besides an adapter, so they must hold no LoRA layer, not sit
    inside one, and be dense (a packed weight has no gradient).
    """
    modules = dict(model.named_modules())
    wrapped = [p for p, m in modules.items() if isinstance(m, LoRALinear)]
    for path in paths:
        module = modules[path]
        if lora:
            inside = [w for w in wrapped if w == path or path.startswith(w + ".") or w.startswith(path + ".")]
            if inside:
                raise UserError(f"train.trainable: {path} holds the LoRA layer {inside[0]}; with finetune: lora "
                                "name modules outside the adapter (norms, embeddings, an un-adapted lm_head) "
                                "or use train.finetune: full")
        packed = [p for p, m in module.named_modules() if is_packed(m)]
        if packed:
            where = f"{path}.{packed[0]}" if packed[0] else path
            raise UserError(f"train.trainable: {where} is quantized and cannot be trained; set quantize: null "
                            "on a dense source (or train.dequantize: true on a quantized one)")
        module.unfreeze()


def trained_base_weights(model: nn.Module) -> dict[str, mx.array]:
    """The trainable parameters outside LoRA adapters, by their path in ``model``."""
    modules = dict(model.named_modules())
    adapter_paths = [p for p, m in modules.items() if isinstance(m, LoRAAdapter)]
    return {k: v for k, v in _flat(model.trainable_parameters())
            if not any(k.startswith(a + ".") for a in adapter_paths)}


def _model_keys(model: nn.Module) -> dict[str, str]:
    """Unwrapped parameter name -> its key in ``model`` (a wrapper's base adds ``.base``)."""
    out = {}
    wrapped = {p for p, m in model.named_modules() if isinstance(m, LoRALinear)}
    for key, _ in _flat(model.parameters()):
        owner, _, leaf = key.rpartition(".")
        if owner.endswith(".base") and owner[: -len(".base")] in wrapped:
            out[owner[: -len(".base")] + "." + leaf] = key
        elif ".adapters." not in key:
            out[key] = key
    return out


def base_weight_problems(model: nn.Module, weights: dict[str, mx.array]) -> list[str]:
    """What stops ``weights`` (trained base weights of an adapter) from replacing ``model``'s."""
    keys = _model_keys(model)
    params = dict(_flat(model.parameters()))
    modules = dict(model.named_modules())
    problems = []
    for name, value in sorted(weights.items()):
        key = keys.get(name)
        if key is None:
            problems.append(f"{name}: trained base weight with no such weight in this model")
        elif is_packed(modules.get(key.rpartition(".")[0], nn.Module())):
            problems.append(f"{name}: the model stores this weight quantized; load the base dense (quantize: null)")
        elif tuple(params[key].shape) != tuple(value.shape):
            problems.append(f"{name}: shape {tuple(value.shape)}, this model has {tuple(params[key].shape)}")
    return problems


def apply_base_weights(model: nn.Module, weights: dict[str, mx.array]) -> None:
    """Replace ``model``'s base weights by ``weights`` (checked by ``base_weight_problems``)."""
    keys = _model_keys(model)
    model.update(tree_unflatten([(keys[k], v) for k, v in weights.items()]))
    mx.eval(model.parameters())
