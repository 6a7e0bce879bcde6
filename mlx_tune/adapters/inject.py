"""Where adapters sit in a loaded model: finding the layers, wrapping them, counting.

``inject`` swaps the chosen linear layers of a loaded mlx-lm model for ``LoRALinear``
wrappers (the model classes stay mlx-lm's own) and freezes everything else. A wrapper's
base keeps its own path, so the model's names are those of the unwrapped model once the
``base.`` segment is dropped (``base_entries``). ``trainable_summary`` counts logical
parameters: a 4-bit (out, in/8) uint32 weight counts as out x in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_tune.adapters.lora import (
    LoRAAdapter,
    LoRALinear,
    check_hyperparameters,
    is_linear_like,
    is_packed,
    logical_shape,
    set_active,
)
from mlx_tune.adapters.switch import moe_routers, wrapper_class
from mlx_tune.config import LoraConfig
from mlx_tune.errors import UserError
from mlx_tune.model.quant import is_switch_linear

# ---------------------------------------------------------------------------
# Finding modules
# ---------------------------------------------------------------------------


def block_paths(model: nn.Module) -> list[str]:
    """Paths of the transformer blocks (``model.layers``), bottom to top."""
    layers = getattr(model, "layers", None)
    if layers is None:
        raise UserError(f"{type(model).__name__} has no `layers` list of transformer blocks; cannot place adapters")
    index = {id(block): i for i, block in enumerate(layers)}
    paths: list[str | None] = [None] * len(layers)
    for path, module in model.named_modules():
        i = index.get(id(module))
        if i is not None and paths[i] is None:
            paths[i] = path
    return [p for p in paths if p is not None]


def wrappers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """Every ``LoRALinear`` in the model with its path, in a stable order."""
    return sorted(((p, m) for p, m in model.named_modules() if isinstance(m, LoRALinear)), key=lambda t: t[0])


def active_name(model: nn.Module) -> str | None:
    """The adapter every wrapper has active, or None (none, or not the same everywhere)."""
    names = {w.active for _, w in wrappers(model) if w.active in w.adapters}
    return names.pop() if len(names) == 1 else None


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """path -> layer for every adaptable linear (a wrapper counts as its base's path).

    MoE expert stacks (``SwitchLinear``, weight (experts, out, in)) count as linears."""
    found: dict[str, nn.Module] = {}
    wrapped = [p for p, _ in wrappers(model)]
    for path, module in model.named_modules():
        if not path or any(path.startswith(w + ".") for w in wrapped):
            continue
        if isinstance(module, LoRALinear) or is_linear_like(module) or is_switch_linear(module):
            found[path] = module
    # A linear-like layer built from linear children (a storage wrapper) is adapted as a whole.
    return {p: m for p, m in sorted(found.items()) if not any(p.startswith(q + ".") for q in found)}


def get_module(model: nn.Module, path: str) -> Any:
    """The module at dotted ``path`` (list indices included: ``model.layers.3.mlp``)."""
    node: Any = model
    for part in path.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at dotted ``path`` in place of what is there."""
    parent_path, _, last = path.rpartition(".")
    parent = get_module(model, parent_path) if parent_path else model
    if isinstance(parent, list):
        parent[int(last)] = new
    else:
        setattr(parent, last, new)


def ensure_wrapper(model: nn.Module, path: str, layer: nn.Module) -> LoRALinear:
    """``layer`` (at ``path``) as a ``LoRALinear``: itself if it is one, else wrapped in place."""
    if isinstance(layer, LoRALinear):
        return layer
    wrapper = wrapper_class(layer)(layer)
    wrapper.train(model.training)
    set_module(model, path, wrapper)
    return wrapper


def select_modules(model: nn.Module, lora_cfg) -> list[str]:
    """Paths of the layers ``lora_cfg`` targets (see ``LoraConfig``); UserError if none or unknown.

    MoE: ``all-linear`` takes the expert stacks too (unless ``include_experts`` is false) but
    never the routers; a name reaches expert stacks by their own path (``switch_mlp.gate_proj``)
    or their container's (``experts``, ``switch_mlp``), and a router only when named (``gate``).
    """
    linears = linear_modules(model)
    routers = moe_routers(linears)
    experts = {p for p, m in linears.items() if is_switch_linear(getattr(m, "base", m))}
    blocks = block_paths(model)
    n = len(blocks) if lora_cfg.layers == "all" else min(int(lora_cfg.layers), len(blocks))
    chosen = tuple(b + "." for b in blocks[len(blocks) - n:])
    in_blocks = [p for p in linears if p.startswith(chosen)]
    targets = lora_cfg.target_modules
    if isinstance(targets, str) and targets not in ("all-linear",) and not targets.startswith("re:"):
        targets = [targets]

    if targets == "all-linear":
        skip = routers | (set() if getattr(lora_cfg, "include_experts", True) else experts)
        selected = [p for p in in_blocks if p not in skip]
        if getattr(lora_cfg, "include_lm_head", False):
            if "lm_head" not in linears:
                raise UserError("lora.include_lm_head: this model has no separate lm_head (its embeddings are tied)")
            selected.append("lm_head")
    elif isinstance(targets, str):  # "re:<regex>", full match on the module path as in PEFT
        try:
            pattern = re.compile(targets[3:])
        except re.error as exc:
            raise UserError(f"lora.target_modules: {targets!r} is not a valid regex ({exc})") from None
        outside = {p for p in linears if not any(p.startswith(b + ".") for b in blocks)}
        selected = [p for p in list(in_blocks) + sorted(outside) if pattern.fullmatch(p)]
        if not selected:
            example = next(iter(in_blocks), "model.layers.0.self_attn.q_proj")
            raise UserError(f"lora.target_modules: {targets!r} matches no linear module; paths look like {example!r}")
    else:
        def matches(path: str, name: str) -> bool:
            if path == name or path.endswith("." + name):
                return True
            parent = path.rpartition(".")[0]  # an expert stack is reached through its container too
            return path in experts and (parent == name or parent.endswith("." + name))

        unknown = [t for t in targets if not any(matches(p, t) for p in linears)]
        if unknown:
            names = sorted({p.rsplit(".", 1)[-1] for p in linears})
            raise UserError(
                f"lora.target_modules: {', '.join(map(repr, unknown))} not found in the model; "
                f"linear modules that exist: {', '.join(names)} (or use 'all-linear')"
            )
        selected = [p for p in linears if any(matches(p, t) for t in targets)
                    and (p.startswith(chosen) or not any(p.startswith(b + ".") for b in blocks))]
    if not selected:
        raise UserError(f"lora: target_modules={lora_cfg.target_modules!r} with layers={lora_cfg.layers!r} selects no module")
    return sorted(selected)


# ---------------------------------------------------------------------------
# Injection and the trainable summary
# ---------------------------------------------------------------------------


def inject(model: nn.Module, lora_cfg: LoraConfig, name: str = "default") -> TrainableSummary:
    """Wrap the targeted layers with a fresh adapter ``name``, freeze the rest, activate it.

    Calling it again with another name adds a second adapter next to the first.
    """
    try:  # bad rank / alpha / dropout: refuse before touching the model
        check_hyperparameters(lora_cfg.rank, lora_cfg.alpha, lora_cfg.dropout)
    except ValueError as exc:
        raise UserError(f"lora: {exc}") from None
    paths = select_modules(model, lora_cfg)
    if any(name in w.adapters for _, w in wrappers(model)):
        raise UserError(f"adapter {name!r} is already in the model; pick another name")
    linears = linear_modules(model)
    n_experts = sum(is_switch_linear(getattr(linears[p], "base", linears[p])) for p in paths)
    if lora_cfg.use_dora and n_experts:
        raise UserError("lora.use_dora: DoRA is not available on MoE expert layers; set lora.include_experts: false "
                        "or name only non-expert target_modules")
    model.freeze()
    for path in paths:
        wrapper = ensure_wrapper(model, path, get_module(model, path))
        wrapper.add_adapter(name, lora_cfg.rank, lora_cfg.alpha, lora_cfg.dropout, lora_cfg.use_rslora, lora_cfg.use_dora)
    set_active(model, name)
    summary = trainable_summary(model)
    if any(is_switch_linear(getattr(m, "base", m)) for m in linears.values()):  # an MoE model: say what was taken
        taken = f"{n_experts} expert layers adapted (one LoRA per expert)" if n_experts else "expert layers not adapted"
        if lora_cfg.target_modules == "all-linear":
            taken = (f"all-linear: experts included, {taken}" if getattr(lora_cfg, "include_experts", True)
                     else "all-linear: experts excluded (lora.include_experts: false)")
        summary.note = f"{taken}; routers frozen" if not set(paths) & moe_routers(linears) else f"{taken}; routers adapted"
    return summary


@dataclass
class TrainableSummary:
    trainable: int
    total: int
    base_params: int
    adapter_params: int
    base_bytes: int
    adapter_bytes: int
    adapted_modules: int
    note: str = ""  # e.g. what all-linear took on an MoE model

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
            f"trainable%: {self.percent:.4f} || frozen base: {self.base_bytes / 2**20:.2f} MiB, "
            f"adapters: {self.adapter_bytes / 2**20:.2f} MiB over {self.adapted_modules} modules"
            + (f" ({self.note})" if self.note else "")
        )


def _owner(key: str, modules: dict[str, nn.Module]) -> tuple[str, str]:
    """Split a parameter key into (owning module path, local name)."""
    path = key
    while path:
        path, _, _ = path.rpartition(".")
        if path in modules:
            return path, key[len(path) + 1:] if path else key
    return "", key


def _unwrapped(key: str, wrapped: set[str]) -> str:
    """``a.q_proj.base.weight`` -> ``a.q_proj.weight`` when ``a.q_proj`` is a wrapper."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if parts[i] == "base" and ".".join(parts[:i]) in wrapped:
            return ".".join(parts[:i] + parts[i + 1:])
    return key


def base_entries(model: nn.Module) -> tuple[dict[str, tuple[tuple[int, ...], str]], dict[str, mx.array], dict[str, mx.array]]:
    """(logical name -> (logical shape, dtype), stored base arrays, adapter arrays).

    Names are those of the unwrapped model: a wrapper's ``base.`` segment is dropped.
    """
    modules = dict(model.named_modules())
    wrapped = {p for p, m in modules.items() if isinstance(m, LoRALinear)}
    logical: dict[str, tuple[tuple[int, ...], str]] = {}
    stored: dict[str, mx.array] = {}
    adapters: dict[str, mx.array] = {}
    for key, value in _flat(model.parameters()):
        owner, local = _owner(key, modules)
        if isinstance(modules.get(owner), LoRAAdapter):
            adapters[key] = value
            continue
        name = _unwrapped(key, wrapped)
        stored[name] = value
        module = modules.get(owner)
        if module is not None and is_packed(module):
            if local == "weight":
                logical[name] = (tuple(logical_shape(module)), "packed")
            elif local == "bias":
                logical[name] = (tuple(value.shape), str(value.dtype))
            continue  # scales, biases, codes: storage only
        logical[name] = (tuple(value.shape), str(value.dtype))
    return logical, stored, adapters


def _flat(tree: Any) -> list[tuple[str, mx.array]]:
    """``tree_flatten`` of a parameter tree (its leaves are arrays; the stub says Any | str)."""
    return cast("list[tuple[str, mx.array]]", tree_flatten(tree))


def _prod(shape) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out


def trainable_summary(model: nn.Module) -> TrainableSummary:
    """Trainable / total parameters (logical counts: a 4-bit weight counts in/out, not packed words)."""
    logical, stored, adapters = base_entries(model)
    base_params = sum(int(_prod(shape)) for shape, _ in logical.values())
    adapter_params = sum(v.size for v in adapters.values())
    trainable = sum(v.size for _, v in _flat(model.trainable_parameters()))
    return TrainableSummary(
        trainable=trainable,
        total=base_params + adapter_params,
        base_params=base_params,
        adapter_params=adapter_params,
        base_bytes=sum(v.nbytes for v in stored.values()),
        adapter_bytes=sum(v.nbytes for v in adapters.values()),
        adapted_modules=len(wrappers(model)),
    )
