"""Put adapters into a loaded model, save and load them, and keep several on one base.

``inject`` swaps the chosen linear layers of a loaded mlx-lm model for ``LoRALinear``
wrappers (the model classes stay mlx-lm's own) and freezes everything else.
An adapter on disk is self-describing: ``adapters.safetensors`` holds
``<module path>.lora_a`` (in, r), ``.lora_b`` (r, out) and, for DoRA, ``.m`` (out,)
(mlx-lm's names and layouts, so ``mlx_lm`` can load it too), and ``adapter_config.json``
holds the shape of the adapter and the identity of its base.

The base fingerprint hashes every base weight's name and *logical* shape (a 4-bit
(out, in/8) uint32 weight counts as (out, in)), so an adapter trained on a 4-bit base
loads on the same model in fp16 and vice versa, but not on another model;
``base_storage_fingerprint`` also hashes the stored shapes and dtypes, for information.

``AdapterManager`` keeps several named adapters on one base: ``activate`` only sets
a name on each wrapper, so switching costs microseconds per layer and no base weight
is ever copied. PEFT interop lives in ``peft_interop`` and is re-exported here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_tune import __version__
from mlx_tune.adapters.lora import LoRAAdapter, LoRALinear, check_hyperparameters, is_linear_like, linear_dims, set_active
from mlx_tune.errors import UserError

ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FORMAT = "mlx_tune.adapter.v1"

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


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """path -> layer for every adaptable linear (a wrapper counts as its base's path)."""
    found: dict[str, nn.Module] = {}
    wrapped = [p for p, _ in wrappers(model)]
    for path, module in model.named_modules():
        if not path or any(path.startswith(w + ".") for w in wrapped):
            continue
        if isinstance(module, LoRALinear) or is_linear_like(module):
            found[path] = module
    # A linear-like layer built from linear children (a storage wrapper) is adapted as a whole.
    return {p: m for p, m in sorted(found.items()) if not any(p.startswith(q + ".") for q in found)}


def _get_module(model: nn.Module, path: str) -> Any:
    node: Any = model
    for part in path.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, last = path.rpartition(".")
    parent = _get_module(model, parent_path) if parent_path else model
    if isinstance(parent, list):
        parent[int(last)] = new
    else:
        setattr(parent, last, new)


def _wrap(model: nn.Module, path: str, layer: nn.Module) -> LoRALinear:
    if isinstance(layer, LoRALinear):
        return layer
    wrapper = LoRALinear(layer)
    wrapper.train(model.training)
    _set_module(model, path, wrapper)
    return wrapper


def select_modules(model: nn.Module, lora_cfg) -> list[str]:
    """Paths of the layers ``lora_cfg`` targets (see ``LoraConfig``); UserError if none or unknown."""
    linears = linear_modules(model)
    blocks = block_paths(model)
    n = len(blocks) if lora_cfg.layers == "all" else min(int(lora_cfg.layers), len(blocks))
    chosen = tuple(b + "." for b in blocks[len(blocks) - n:])
    in_blocks = [p for p in linears if p.startswith(chosen)]
    targets = lora_cfg.target_modules
    if isinstance(targets, str) and targets not in ("all-linear",) and not targets.startswith("re:"):
        targets = [targets]

    if targets == "all-linear":
        selected = list(in_blocks)
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
            return path == name or path.endswith("." + name)

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


def inject(model: nn.Module, lora_cfg, name: str = "default") -> TrainableSummary:
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
    model.freeze()
    for path in paths:
        wrapper = _wrap(model, path, _get_module(model, path))
        wrapper.add_adapter(name, lora_cfg.rank, lora_cfg.alpha, lora_cfg.dropout, lora_cfg.use_rslora, lora_cfg.use_dora)
    set_active(model, name)
    return trainable_summary(model)


@dataclass
class TrainableSummary:
    trainable: int
    total: int
    base_params: int
    adapter_params: int
    base_bytes: int
    adapter_bytes: int
    adapted_modules: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
            f"trainable%: {self.percent:.4f} || frozen base: {self.base_bytes / 2**20:.2f} MiB, "
            f"adapters: {self.adapter_bytes / 2**20:.2f} MiB over {self.adapted_modules} modules"
        )


def _owner(key: str, modules: dict[str, nn.Module]) -> tuple[str, str]:
    """Split a parameter key into (owning module path, local name)."""
    path = key
    while path:
        path, _, _ = path.rpartition(".")
        if path in modules:
            return path, key[len(path) + 1:] if path else key
    return "", key


def _is_packed(module: nn.Module) -> bool:
    """A layer whose stored weight is not its logical weight (quantized, NF4, ...)."""
    return isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)) or (
        callable(getattr(module, "dense_weight", None)) and type(module) is not nn.Linear
    )


def _logical_shape(module: nn.Module) -> tuple[int, ...]:
    if isinstance(module, nn.QuantizedEmbedding):
        rows, packed = module.weight.shape
        return rows, packed * 32 // module.bits
    return linear_dims(module)


def base_entries(model: nn.Module) -> tuple[dict[str, tuple[tuple[int, ...], str]], dict[str, mx.array], dict[str, mx.array]]:
    """(logical name -> (logical shape, dtype), stored base arrays, adapter arrays).

    Names are those of the unwrapped model: a wrapper's ``base.`` segment is dropped.
    """
    modules = dict(model.named_modules())
    wrapped = {p for p, m in modules.items() if isinstance(m, LoRALinear)}
    logical: dict[str, tuple[tuple[int, ...], str]] = {}
    stored: dict[str, mx.array] = {}
    adapters: dict[str, mx.array] = {}
    for key, value in tree_flatten(model.parameters()):
        owner, local = _owner(key, modules)
        if isinstance(modules.get(owner), LoRAAdapter):
            adapters[key] = value
            continue
        name = _unwrapped(key, wrapped)
        stored[name] = value
        module = modules.get(owner)
        if module is not None and _is_packed(module):
            if local == "weight":
                logical[name] = (tuple(_logical_shape(module)), "packed")
            elif local == "bias":
                logical[name] = (tuple(value.shape), str(value.dtype))
            continue  # scales, biases, codes: storage only
        logical[name] = (tuple(value.shape), str(value.dtype))
    return logical, stored, adapters


def _unwrapped(key: str, wrapped: set[str]) -> str:
    """``a.q_proj.base.weight`` -> ``a.q_proj.weight`` when ``a.q_proj`` is a wrapper."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if parts[i] == "base" and ".".join(parts[:i]) in wrapped:
            return ".".join(parts[:i] + parts[i + 1:])
    return key


def fingerprint(model: nn.Module) -> dict[str, str]:
    """Hashes of the base weights: logical names+shapes, and stored names+shapes+dtypes."""
    logical, stored, _ = base_entries(model)
    arch = sorted((k, list(shape)) for k, (shape, _) in logical.items())
    storage = sorted((k, list(v.shape), str(v.dtype)) for k, v in stored.items())
    digest = lambda obj: hashlib.sha256(json.dumps(obj).encode()).hexdigest()[:16]  # noqa: E731
    return {"base_fingerprint": digest(arch), "base_storage_fingerprint": digest(storage)}


def trainable_summary(model: nn.Module) -> TrainableSummary:
    """Trainable / total parameters (logical counts: a 4-bit weight counts in/out, not packed words)."""
    logical, stored, adapters = base_entries(model)
    base_params = sum(int(_prod(shape)) for shape, _ in logical.values())
    adapter_params = sum(v.size for v in adapters.values())
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    return TrainableSummary(
        trainable=trainable,
        total=base_params + adapter_params,
        base_params=base_params,
        adapter_params=adapter_params,
        base_bytes=sum(v.nbytes for v in stored.values()),
        adapter_bytes=sum(v.nbytes for v in adapters.values()),
        adapted_modules=len(wrappers(model)),
    )


def _prod(shape) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out


# ---------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------


def _atomic_write_bytes(path: Path, write) -> None:
    """``write(tmp_path)`` then rename over ``path``: readers never see half a file."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_adapter_files(out_dir: str | Path, weights: dict[str, mx.array], config: dict) -> Path:
    """Write ``adapters.safetensors`` then ``adapter_config.json`` (last: it marks completeness)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write_bytes(out / ADAPTER_WEIGHTS,
                        lambda p: mx.save_safetensors(str(p), weights, metadata={"format": "mlx"}))
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    _atomic_write_bytes(out / ADAPTER_CONFIG, lambda p: p.write_text(text, encoding="utf-8"))
    return out


def _info_dict(info) -> dict:
    if info is None:
        return {"source": None, "kind": None, "model_type": None, "quantization": None}
    config = getattr(info, "config", None) or {}
    return {
        "source": getattr(info, "source", None),
        "kind": getattr(info, "kind", None),
        "model_type": config.get("model_type") if isinstance(config, dict) else None,
        "quantization": getattr(info, "quantization", None),
    }


def _layout(paths: list[str], blocks: list[str]) -> tuple[list[int], list[str], list[str]]:
    """(block indices, keys relative to a block, paths outside the blocks)."""
    indices, keys, outside = set(), set(), []
    for p in paths:
        for i, b in enumerate(blocks):
            if p.startswith(b + "."):
                indices.add(i)
                keys.add(p[len(b) + 1:])
                break
        else:
            outside.append(p)
    return sorted(indices), sorted(keys), outside


def active_name(model: nn.Module) -> str | None:
    names = {w.active for _, w in wrappers(model) if w.active in w.adapters}
    return names.pop() if len(names) == 1 else None


def save_adapter(model: nn.Module, out_dir: str | Path, lora_cfg=None, info=None, name: str | None = None) -> Path:
    """Write adapter ``name`` (default: the active one) of ``model`` to ``out_dir``."""
    name = name or active_name(model)
    held = [(p, w.adapters[name]) for p, w in wrappers(model) if name in w.adapters]
    if not held:
        raise UserError(f"no adapter {name!r} in the model to save" if name else "the model holds no active adapter to save")
    first = held[0][1]
    weights: dict[str, mx.array] = {}
    for path, adapter in held:
        shape = (adapter.rank, adapter.alpha, adapter.kind, adapter.use_rslora)
        if shape != (first.rank, first.alpha, first.kind, first.use_rslora):
            raise ValueError(f"adapter {name!r} has mixed rank/alpha/kind across layers ({path}); cannot describe it")
        weights[f"{path}.lora_a"] = adapter.lora_a
        weights[f"{path}.lora_b"] = adapter.lora_b
        if adapter.kind == "dora":
            weights[f"{path}.m"] = adapter.m
    paths = [p for p, _ in held]
    blocks = block_paths(model)
    indices, keys, outside = _layout(paths, blocks)
    top = list(range(len(blocks) - len(indices), len(blocks)))
    uniform = not outside and len(paths) == len(indices) * len(keys) and indices == top
    base = _info_dict(info)
    cfg = {
        "format": ADAPTER_FORMAT,
        "mlx_tune_version": __version__,
        "name": name,
        "rank": first.rank,
        "alpha": first.alpha,
        "dropout": first.dropout_p,
        "use_rslora": first.use_rslora,
        "use_dora": first.kind == "dora",
        "scale": first.scale,
        "target_modules": getattr(lora_cfg, "target_modules", sorted({p.rsplit(".", 1)[-1] for p in paths})),
        "layers": getattr(lora_cfg, "layers", "all" if len(indices) == len(blocks) else len(indices)),
        "include_lm_head": "lm_head" in paths,
        "modules": paths,
        "num_blocks": len(blocks),
        "base_model": base["source"],
        "base_kind": base["kind"],
        "base_model_type": base["model_type"],
        "base_quantization": base["quantization"],
        **fingerprint(model),
    }
    if uniform:  # what mlx_lm.tuner.utils.load_adapters reads, so mlx-lm can use the adapter too
        cfg["fine_tune_type"] = first.kind
        cfg["num_layers"] = len(indices)
        cfg["lora_parameters"] = {"rank": first.rank, "scale": first.scale, "dropout": first.dropout_p, "keys": keys}
    return write_adapter_files(out_dir, weights, cfg)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not a readable adapter config ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def read_safetensors(path: Path) -> tuple[dict[str, mx.array], dict[str, str]]:
    """Arrays and metadata of a safetensors file; a corrupt file is a UserError naming it."""
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        weights, metadata = mx.load(str(path), return_metadata=True)
    except Exception as exc:  # mlx raises RuntimeError / ValueError with a terse message
        raise UserError(f"{path}: cannot read adapter weights ({exc}); the file is corrupt or not safetensors") from None
    return weights, metadata or {}


def read_adapter(path: str | Path) -> tuple[dict, dict[str, mx.array], Path]:
    """(config, weights, weights file) of an mlx_tune adapter folder, or of a PEFT LoRA folder."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    if not path.is_dir():
        raise UserError(f"{path}: adapter folder not found")
    if not (path / ADAPTER_WEIGHTS).exists():
        from mlx_tune.adapters.peft import PEFT_WEIGHTS, peft_to_mlx

        if (path / PEFT_WEIGHTS).exists():
            config, weights = peft_to_mlx(path)
            return config, weights, path / PEFT_WEIGHTS
        raise UserError(f"{path}: no {ADAPTER_WEIGHTS} (mlx_tune) or {PEFT_WEIGHTS} (PEFT) in this folder")
    if not (path / ADAPTER_CONFIG).exists():
        raise UserError(f"{path / ADAPTER_CONFIG}: file not found (the adapter folder is incomplete)")
    config = _from_mlx_lm(_read_json(path / ADAPTER_CONFIG))
    weights, _ = read_safetensors(path / ADAPTER_WEIGHTS)
    return config, weights, path / ADAPTER_WEIGHTS


def _from_mlx_lm(config: dict) -> dict:
    """Read an adapter written by ``mlx_lm.lora`` (rank / scale under ``lora_parameters``) too."""
    params = config.get("lora_parameters")
    if "rank" in config or not isinstance(params, dict) or "rank" not in params:
        return config
    rank, scale = params["rank"], params.get("scale", 20.0)
    if config.get("fine_tune_type", "lora") not in ("lora", "dora"):
        raise UserError(f"fine_tune_type {config.get('fine_tune_type')!r}: only lora / dora adapters can be loaded")
    return {
        **config,
        "rank": rank,
        "alpha": float(scale) * rank if isinstance(scale, (int, float)) and isinstance(rank, int) else None,
        "dropout": params.get("dropout", 0.0),
        "use_dora": config.get("fine_tune_type") == "dora",
        "use_rslora": False,
    }


def _check_adapter_config(config: dict, where: Path) -> list[str]:
    problems = []
    for key in ("rank", "alpha"):
        value = config.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            problems.append(f"{key}: {value!r} must be a number > 0")
    dropout = config.get("dropout", 0.0)
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        problems.append(f"dropout: {dropout!r} must be in [0, 1)")
    return [f"{where}: {p}" for p in problems]


def load_adapter(model: nn.Module, path: str | Path, name: str | None = None, activate: bool = True) -> str:
    """Load an adapter folder into ``model`` as ``name``; returns the name.

    Every problem (another base, a missing module, a tensor of the wrong shape) is
    collected and reported in one UserError before the model is touched.
    """
    config, weights, weights_file = read_adapter(path)
    config_file = weights_file.with_name(ADAPTER_CONFIG)
    problems = _check_adapter_config(config, config_file)
    if problems:
        raise UserError("; ".join(problems))
    rank, use_dora = int(config["rank"]), bool(config.get("use_dora", False))
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
        out_dims, in_dims = linear_dims(layer.base if isinstance(layer, LoRALinear) else layer)
        expected = {"lora_a": (in_dims, rank), "lora_b": (rank, out_dims), "m": (out_dims,)}
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
        wrapper = _wrap(model, module_path, linears[module_path])
        adapter = wrapper.add_adapter(name, rank, float(config["alpha"]), float(config.get("dropout", 0.0)),
                                      bool(config.get("use_rslora", False)), use_dora)
        # The random init and DoRA's norm are lazy and never evaluated: overwritten here.
        for leaf, value in tensors.items():
            setattr(adapter, leaf, value)
    mx.eval([w.adapters[name].parameters() for _, w in wrappers(model) if name in w.adapters])
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
            _set_module(model, path, wrapper.base)
    return touched


def fuse_model(model: nn.Module, dequantize: bool = False) -> int:
    """Replace every wrapper by its fused plain layer (the active adapter merged); returns the count."""
    count = 0
    for path, wrapper in wrappers(model):
        _set_module(model, path, wrapper.fuse(dequantize=dequantize))
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


def __getattr__(attr: str):
    # PEFT interop is re-exported lazily so importing adapters stays light.
    if attr in ("export_peft", "import_peft"):
        from mlx_tune.adapters import peft as peft_interop

        return getattr(peft_interop, attr)
    raise AttributeError(attr)
