"""Adapters on a loaded model: load one from a folder, remove one, merge them into the base,
and keep several named ones on one base.

``load_adapter`` checks everything (the base fingerprint, every module and tensor shape)
before it touches the model. ``AdapterManager`` keeps several named adapters on one base:
``activate`` only sets a name on each wrapper, so switching costs microseconds per layer
and no base weight is ever copied.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from mlx_tune.adapters.files import ADAPTER_CONFIG, adapter_config_problems, fingerprint
from mlx_tune.adapters.inject import active_name, ensure_wrapper, linear_modules, set_module, wrappers
from mlx_tune.adapters.lora import set_active
from mlx_tune.adapters.peft import read_adapter
from mlx_tune.adapters.switch import adapter_shapes
from mlx_tune.adapters.trainable import apply_base_weights, base_weight_problems
from mlx_tune.errors import UserError


def load_adapter(model: nn.Module, path: str | Path, name: str | None = None, activate: bool = True) -> str:
    """Load an adapter folder into ``model`` as ``name``; returns the name.

    Every problem (another base, a missing module, a tensor of the wrong shape) is
    collected and reported in one UserError before the model is touched.
    """
    config, weights, weights_file = read_adapter(path)
    config_file = weights_file.with_name(ADAPTER_CONFIG)
    problems = adapter_config_problems(config, config_file)
    if problems:
        raise UserError("; ".join(problems))
    rank, use_dora = int(config["rank"]), bool(config.get("use_dora", False))
    # Base modules trained beside the adapter (train.trainable): they replace the base's weights.
    trained = {k: weights[k] for k in config.get("trained_weights") or [] if k in weights}
    problems += [f"{k}: listed in trained_weights, not in the file" for k in config.get("trained_weights") or []
                 if k not in weights]
    problems += base_weight_problems(model, trained)
    weights = {k: v for k, v in weights.items() if k not in trained}
    suffixes = (".lora_a", ".lora_b", ".m") if use_dora else (".lora_a", ".lora_b")
    by_module: dict[str, dict[str, mx.array]] = {}
    for key, value in weights.items():
        head, dot, leaf = key.rpartition(".")
        if not dot or "." + leaf not in suffixes:
            problems.append(f"{key}: unexpected tensor (expected {', '.join('<module>' + s for s in suffixes)})")
            continue
        by_module.setdefault(head, {})[leaf] = value
    want = config.get("base_fingerprint")
    if want:
        have = fingerprint(model)["base_fingerprint"]
        if want != have:
            problems.append(
                f"base mismatch: the adapter was made for {config.get('base_model') or 'another model'} "
                f"(fingerprint {want}), this model's fingerprint is {have}"
            )
    linears = linear_modules(model)
    for module_path, tensors in sorted(by_module.items()):
        layer = linears.get(module_path)
        if layer is None:
            problems.append(f"{module_path}: no such linear module in this model")
            continue
        expected = adapter_shapes(layer, rank)
        if use_dora and "m" not in expected:
            problems.append(f"{module_path}: a DoRA adapter cannot sit on an MoE expert layer")
            continue
        for leaf in (s[1:] for s in suffixes):
            if leaf not in tensors:
                problems.append(f"{module_path}.{leaf}: missing")
            elif tuple(tensors[leaf].shape) != expected[leaf]:
                problems.append(f"{module_path}.{leaf}: shape {tuple(tensors[leaf].shape)}, this model needs {expected[leaf]}")
    if not by_module and not problems:
        problems.append("the adapter holds no tensors")
    if problems:
        lines = "\n  ".join(problems)
        raise UserError(f"{weights_file}: adapter does not fit this model ({len(problems)} problem(s)):\n  {lines}")

    name = name or config.get("name") or "default"
    if any(name in w.adapters for _, w in wrappers(model)):
        raise UserError(f"adapter {name!r} is already loaded; remove it first or pick another name")
    for module_path, tensors in by_module.items():
        wrapper = ensure_wrapper(model, module_path, linears[module_path])
        adapter = wrapper.add_adapter(name, rank, float(config["alpha"]), float(config.get("dropout", 0.0)),
                                      bool(config.get("use_rslora", False)), use_dora)
        # The random init and DoRA's norm are lazy and never evaluated: overwritten here.
        for leaf, value in tensors.items():
            setattr(adapter, leaf, value)
    mx.eval([w.adapters[name].parameters() for _, w in wrappers(model) if name in w.adapters])
    if trained:
        apply_base_weights(model, trained)
    if activate:
        set_active(model, name)
    return name


def unload_adapter(model: nn.Module, name: str) -> int:
    """Remove adapter ``name``; wrappers left empty give their base layer back. Returns layers touched."""
    touched = 0
    for path, wrapper in wrappers(model):
        if name in wrapper.adapters:
            wrapper.remove_adapter(name)
            touched += 1
        if not wrapper.adapters:
            set_module(model, path, wrapper.base)
    return touched


def merge_adapters(model: nn.Module, dequantize: bool = False) -> int:
    """Replace every wrapper by a plain layer with its active adapter merged into the weight
    (``LoRALinear.fuse``: W0 + s B A, re-quantized like the base unless ``dequantize``);
    returns how many layers were replaced."""
    count = 0
    for path, wrapper in wrappers(model):
        set_module(model, path, wrapper.fuse(dequantize=dequantize))
        count += 1
    return count


class AdapterManager:
    """Several named adapters on one loaded base; switching never copies base weights."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.paths: dict[str, str] = {}
        self._wrappers = [w for _, w in wrappers(model)]
        self.active: str | None = active_name(model)
        for _, w in wrappers(model):
            for key in w.adapters:
                self.paths.setdefault(key, "(in memory)")

    def names(self) -> list[str]:
        return sorted(self.paths)

    def add(self, name: str, path: str | Path) -> str:
        """Load the adapter at ``path`` as ``name`` without activating it."""
        if name in self.paths:
            raise UserError(f"adapter {name!r} is already loaded; remove it first or pick another name")
        load_adapter(self.model, path, name=name, activate=False)
        self.paths[name] = str(path)
        self._wrappers = [w for _, w in wrappers(self.model)]
        # Keep the current selection on the layers that were just wrapped.
        self._set(self.active)
        return name

    def activate(self, name: str | None) -> None:
        """Use adapter ``name`` from now on (None: the base model alone)."""
        if name is not None and name not in self.paths:
            raise UserError(f"adapter {name!r} is not loaded; loaded: {', '.join(self.names()) or 'none'}")
        self._set(name)

    def _set(self, name: str | None) -> None:
        for wrapper in self._wrappers:
            wrapper.set_active(name)
        self.active = name

    def remove(self, name: str) -> None:
        if name not in self.paths:
            raise UserError(f"adapter {name!r} is not loaded; loaded: {', '.join(self.names()) or 'none'}")
        unload_adapter(self.model, name)
        del self.paths[name]
        self._wrappers = [w for _, w in wrappers(self.model)]
        if self.active == name:
            self.active = None
