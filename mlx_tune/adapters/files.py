"""mlx_tune adapter folders on disk: the format, the base fingerprint, writing and reading.

An adapter folder is self-describing: ``adapters.safetensors`` holds
``<module path>.lora_a`` (in, r), ``.lora_b`` (r, out) and, for DoRA, ``.m`` (out,)
(mlx-lm's names and layouts, so ``mlx_lm`` can load it too), and ``adapter_config.json``
holds the shape of the adapter and the identity of its base. The config is written
last: its presence marks a complete folder. Folders written by ``mlx_lm.lora`` (rank and
scale under ``lora_parameters``) are read too.

The base fingerprint hashes every base weight's name and *logical* shape (a 4-bit
(out, in/8) uint32 weight counts as (out, in)), so an adapter trained on a 4-bit base
loads on the same model in fp16 and vice versa, but not on another model;
``base_storage_fingerprint`` also hashes the stored shapes and dtypes, for information.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import cast

import mlx.core as mx
import mlx.nn as nn

from mlx_tune import __version__
from mlx_tune.adapters.inject import active_name, base_entries, block_paths, wrappers
from mlx_tune.atomic import write_file_atomic, write_text_atomic
from mlx_tune.config import lora_hyperparameter_problems
from mlx_tune.errors import UserError
from mlx_tune.model.chat_templates import TEMPLATE_FILE, read_template, write_template

ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FORMAT = "mlx_tune.adapter.v1"


def fingerprint(model: nn.Module) -> dict[str, str]:
    """Hashes of the base weights: logical names+shapes, and stored names+shapes+dtypes."""
    logical, stored, _ = base_entries(model)
    arch = sorted((k, list(shape)) for k, (shape, _) in logical.items())
    storage = sorted((k, list(v.shape), str(v.dtype)) for k, v in stored.items())
    digest = lambda obj: hashlib.sha256(json.dumps(obj).encode()).hexdigest()[:16]  # noqa: E731
    return {"base_fingerprint": digest(arch), "base_storage_fingerprint": digest(storage)}


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


def write_adapter_files(out_dir: str | Path, weights: dict[str, mx.array], config: dict) -> Path:
    """Write ``adapters.safetensors`` then ``adapter_config.json`` (last: it marks completeness)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_file_atomic(out / ADAPTER_WEIGHTS, lambda p: mx.save_safetensors(str(p), weights, metadata={"format": "mlx"}))
    write_text_atomic(out / ADAPTER_CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n")
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


def save_adapter(model: nn.Module, out_dir: str | Path, lora_cfg=None, info=None, name: str | None = None,
                 chat_template: str | None = None, extra: dict | None = None,
                 base_weights: dict[str, mx.array] | None = None) -> Path:
    """Write adapter ``name`` (default: the active one) of ``model`` to ``out_dir``.

    ``chat_template`` (the Jinja text training rendered chats with, when the config supplied
    one) is stored as ``chat_template.jinja`` and named in the config, so the server and
    fuse render prompts exactly as training did; ``extra`` keys (training's ``step`` and
    metric value) go into adapter_config.json too. ``base_weights`` (base modules trained
    beside the adapter, ``adapters.trainable``) are stored under the model's names and
    listed as ``trained_weights``.
    """
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
    weights.update(base_weights or {})
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
        **({"trained_weights": sorted(base_weights)} if base_weights else {}),
        **(extra or {}),
    }
    template_path = Path(out_dir) / TEMPLATE_FILE
    if chat_template is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        write_template(out_dir, chat_template)
        cfg["chat_template_file"] = TEMPLATE_FILE
    elif template_path.is_file():  # a previous run's template must not outlive it
        template_path.unlink()
    if uniform:  # what mlx_lm.tuner.utils.load_adapters reads, so mlx-lm can use the adapter too
        cfg["fine_tune_type"] = first.kind
        cfg["num_layers"] = len(indices)
        cfg["lora_parameters"] = {"rank": first.rank, "scale": first.scale, "dropout": first.dropout_p, "keys": keys}
    return write_adapter_files(out_dir, weights, cfg)


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------


def read_json(path: Path) -> dict:
    """The JSON object in ``path`` (an adapter config); a UserError naming the file otherwise."""
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
        weights, metadata = cast("tuple[dict[str, mx.array], dict[str, str]]", mx.load(str(path), return_metadata=True))
    except Exception as exc:  # mlx raises RuntimeError / ValueError with a terse message
        raise UserError(f"{path}: cannot read adapter weights ({exc}); the file is corrupt or not safetensors") from None
    return weights, metadata or {}


def adapter_dir(path: str | Path) -> Path:
    """The adapter folder ``path`` names (a file in it names it too); UserError if there is none."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    if not path.is_dir():
        raise UserError(f"{path}: adapter folder not found")
    return path


def read_mlx_tune_adapter(folder: Path) -> tuple[dict, dict[str, mx.array], Path]:
    """(config, weights, weights file) of an mlx_tune (or mlx-lm) adapter folder."""
    if not (folder / ADAPTER_CONFIG).exists():
        raise UserError(f"{folder / ADAPTER_CONFIG}: file not found (the adapter folder is incomplete)")
    config = _from_mlx_lm(read_json(folder / ADAPTER_CONFIG))
    weights, _ = read_safetensors(folder / ADAPTER_WEIGHTS)
    return config, weights, folder / ADAPTER_WEIGHTS


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


def read_adapter_template(folder: str | Path) -> str | None:
    """The chat template an adapter folder carries (named by its config), or None."""
    folder = Path(folder)
    config_path = folder / ADAPTER_CONFIG
    if not config_path.is_file():
        return None
    name = read_json(config_path).get("chat_template_file")
    return read_template(folder) if name == TEMPLATE_FILE else None


def adapter_config_problems(config: dict, where: Path) -> list[str]:
    """What is wrong with an adapter config's rank / alpha / dropout, each prefixed with ``where``."""
    problems = lora_hyperparameter_problems(config.get("rank"), config.get("alpha"), config.get("dropout", 0.0), sep=": ")
    return [f"{where}: {p}" for p in problems]
