"""Hugging Face PEFT LoRA folders <-> mlx_tune adapter folders, exactly.

PEFT stores, for a module at path P of the transformers model::

    base_model.model.P.lora_A.weight        (r, in)    = mlx_tune lora_a.T
    base_model.model.P.lora_B.weight        (out, r)   = mlx_tune lora_b.T
    base_model.model.P.lora_magnitude_vector (out,)    = mlx_tune m (DoRA)

mlx-lm models use the transformers module paths (``model.layers.N.self_attn.q_proj``),
so the mapping is a prefix and a transpose. The maths agrees too: scaling is
lora_alpha / r (lora_alpha / sqrt(r) with use_rslora), A and B play the same roles.
The exported safetensors carries the mlx_tune adapter config in its metadata so that
import restores it (fingerprint included) and the round trip is exact.

``read_adapter`` reads either kind of folder, so everything that loads an adapter takes both.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlx.core as mx

from mlx_tune import __version__
from mlx_tune.adapters.files import (
    ADAPTER_FORMAT,
    ADAPTER_WEIGHTS,
    adapter_dir,
    read_adapter_template,
    read_json,
    read_mlx_tune_adapter,
    read_safetensors,
    write_adapter_files,
)
from mlx_tune.atomic import write_file_atomic, write_text_atomic
from mlx_tune.config import lora_hyperparameter_problems
from mlx_tune.errors import UserError
from mlx_tune.model.chat_templates import write_template

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
PREFIX = "base_model.model."
_META_KEY = "mlx_tune_adapter_config"

# mlx_tune leaf -> (PEFT suffix, transpose?)
_LEAVES = {"lora_a": (".lora_A.weight", True), "lora_b": (".lora_B.weight", True), "m": (".lora_magnitude_vector", False)}
_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+?)\.(?P<leaf>lora_A|lora_B|lora_magnitude_vector)"
                       r"(?:\.[A-Za-z0-9_]+)?(?:\.weight)?$")
_PEFT_LEAF = {"lora_A": "lora_a", "lora_B": "lora_b", "lora_magnitude_vector": "m"}


def _peft_targets(config: dict) -> tuple[list[str] | str, list[int] | None]:
    """target_modules (+ layers_to_transform) that select exactly ``config['modules']`` in PEFT."""
    modules = config["modules"]
    by_name: dict[str, set[int]] = {}
    outside = []
    for path in modules:
        m = re.match(r"^(?:.*\.)?layers\.(\d+)\.(.+)$", path)
        if m is None:
            outside.append(path)
            continue
        by_name.setdefault(m.group(2).rsplit(".", 1)[-1], set()).add(int(m.group(1)))
    layer_sets = {frozenset(v) for v in by_name.values()}
    names = sorted(by_name)
    total = config.get("num_blocks")
    product = len(layer_sets) <= 1 and sum(len(v) for v in by_name.values()) + len(outside) == len(modules)
    if product and not outside:
        layers = sorted(next(iter(layer_sets))) if layer_sets else []
        all_layers = total is not None and layers == list(range(total))
        return names, None if all_layers else layers
    if product and not by_name:
        return sorted(p.rsplit(".", 1)[-1] for p in outside), None
    # Anything irregular: a regex that full-matches exactly the adapted paths.
    return "^(" + "|".join(re.escape(p) for p in modules) + ")$", None


def read_adapter(path: str | Path) -> tuple[dict, dict[str, mx.array], Path]:
    """(config, weights, weights file) of an mlx_tune adapter folder, or of a PEFT LoRA folder."""
    folder = adapter_dir(path)
    if (folder / ADAPTER_WEIGHTS).exists():
        return read_mlx_tune_adapter(folder)
    if (folder / PEFT_WEIGHTS).exists():
        config, weights = peft_to_mlx(folder)
        return config, weights, folder / PEFT_WEIGHTS
    raise UserError(f"{folder}: no {ADAPTER_WEIGHTS} (mlx_tune) or {PEFT_WEIGHTS} (PEFT) in this folder")


def export_peft(adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Write ``adapter_dir`` (an mlx_tune adapter) as a PEFT LoRA folder in ``out_dir``."""
    config, weights, source = read_adapter(adapter_dir)
    if config.get("format") != ADAPTER_FORMAT:
        raise UserError(f"{source.parent}: not an mlx_tune adapter folder (adapter_config.json has no format {ADAPTER_FORMAT!r})")
    stacked = sorted(k.rpartition(".")[0] for k, v in weights.items() if k.endswith(".lora_a") and v.ndim == 3)
    if stacked:
        # PEFT adapts per-expert nn.Linear modules, or (target_parameters) transformers' own fused
        # expert tensors, whose layout differs from mlx-lm's SwitchLinear stacks: no faithful form.
        raise UserError(f"{source.parent}: PEFT has no standard form for per-expert LoRA on MoE expert stacks "
                        f"({stacked[0]}{f' and {len(stacked) - 1} more' if len(stacked) > 1 else ''}); "
                        "use the mlx_tune adapter folder (mlx-lm reads it) or fuse the model")
    tensors = {}
    trained = sorted(config.get("trained_weights") or [])  # base modules trained beside the adapter
    for key in trained:  # PEFT's modules_to_save: saved under the base model's own names
        tensors[PREFIX + key] = weights.pop(key)
    for key, value in weights.items():
        path, _, leaf = key.rpartition(".")
        if leaf not in _LEAVES:
            raise UserError(f"{source}: unexpected tensor {key!r}")
        suffix, transpose = _LEAVES[leaf]
        tensors[PREFIX + path + suffix] = value.T if transpose else value
    targets, layers = _peft_targets(config)
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": config.get("base_model"),
        "r": config["rank"],
        "lora_alpha": config["alpha"],
        "lora_dropout": config.get("dropout", 0.0),
        "target_modules": targets,
        "layers_to_transform": layers,
        "layers_pattern": "layers" if layers is not None else None,
        "use_rslora": bool(config.get("use_rslora", False)),
        "use_dora": bool(config.get("use_dora", False)),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": sorted({k.rpartition(".")[0].rpartition(".")[2] for k in trained}) or None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", _META_KEY: json.dumps(config, sort_keys=True)}
    write_file_atomic(out / PEFT_WEIGHTS, lambda p: mx.save_safetensors(str(p), tensors, metadata=metadata))
    write_text_atomic(out / PEFT_CONFIG, json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
    template = read_adapter_template(source.parent)
    if template is not None:  # transformers reads chat_template.jinja beside the adapter's tokenizer files
        write_template(out, template)
    return out


def peft_to_mlx(peft_dir: str | Path) -> tuple[dict, dict[str, mx.array]]:
    """(mlx_tune adapter config, weights) read from a PEFT LoRA folder."""
    peft_dir = Path(peft_dir)
    config_file, weights_file = peft_dir / PEFT_CONFIG, peft_dir / PEFT_WEIGHTS
    if not weights_file.exists() and (peft_dir / "adapter_model.bin").exists():
        raise UserError(f"{peft_dir / 'adapter_model.bin'}: pickle weights are not read; save the adapter with safetensors")
    if not config_file.exists():
        raise UserError(f"{config_file}: file not found (not a PEFT adapter folder)")
    pc = read_json(config_file)
    problems = []
    if pc.get("peft_type") != "LORA":
        problems.append(f"peft_type is {pc.get('peft_type')!r}; only LORA adapters can be imported")
    if pc.get("fan_in_fan_out"):
        problems.append("fan_in_fan_out: true (Conv1D / GPT-2 style layers) is not supported")
    if pc.get("bias", "none") != "none":
        problems.append(f"bias: {pc.get('bias')!r}; only 'none' is supported (LoRA without trained biases)")
    for key in ("rank_pattern", "alpha_pattern"):
        if pc.get(key):
            problems.append(f"{key}: per-module ranks/alphas are not supported")
    problems += lora_hyperparameter_problems(pc.get("r"), pc.get("lora_alpha"), pc.get("lora_dropout") or 0.0,
                                             names=("r", "lora_alpha", "lora_dropout"), sep=": ")
    if problems:
        raise UserError(f"{config_file}: " + "; ".join(problems))
    raw, metadata = read_safetensors(weights_file)
    weights: dict[str, mx.array] = {}
    trained: dict[str, mx.array] = {}  # modules_to_save: whole base weights, under the base's names
    bad = []
    for key, value in raw.items():
        m = _PEFT_KEY.match(key)
        if m is None and pc.get("modules_to_save") and key.startswith(PREFIX):
            trained[key[len(PREFIX):]] = value
            continue
        if m is None:
            bad.append(key)
            continue
        leaf = _PEFT_LEAF[m.group("leaf")]
        weights[f"{m.group('path')}.{leaf}"] = value.T if _LEAVES[leaf][1] else value
    if bad:
        raise UserError(f"{weights_file}: tensors that are not LoRA A/B/magnitude: {', '.join(bad[:5])}"
                        + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))
    modules = sorted({k.rpartition(".")[0] for k in weights})
    targets = pc.get("target_modules")
    layers = pc.get("layers_to_transform")
    config = {
        "format": ADAPTER_FORMAT,
        "mlx_tune_version": __version__,
        "name": "default",
        "target_modules": ("re:" + targets) if isinstance(targets, str) else targets,
        "layers": "all" if not layers else (len(layers) if isinstance(layers, list) else 1),
        "include_lm_head": "lm_head" in modules,
        "modules": modules,
        "base_model": pc.get("base_model_name_or_path"),
        "base_kind": None,
        "base_model_type": None,
        "base_quantization": None,
    }
    if _META_KEY in metadata:  # written by export_peft: restore what PEFT has no field for
        try:
            config.update(json.loads(metadata[_META_KEY]))
        except json.JSONDecodeError:
            pass
    # PEFT's own fields win: a user may have edited them after export.
    rank, alpha = pc["r"], pc["lora_alpha"]
    config.update({
        "rank": int(rank),
        "alpha": float(alpha),
        "dropout": float(pc.get("lora_dropout") or 0.0),
        "use_rslora": bool(pc.get("use_rslora", False)),
        "use_dora": bool(pc.get("use_dora", False)),
        "scale": float(alpha) / (rank ** 0.5 if pc.get("use_rslora") else rank),
        "modules": modules,
    })
    if trained:
        config["trained_weights"] = sorted(trained)
    else:
        config.pop("trained_weights", None)
    return config, {**weights, **trained}


def import_peft(peft_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the PEFT LoRA folder ``peft_dir`` as an mlx_tune adapter folder in ``out_dir``."""
    config, weights = peft_to_mlx(peft_dir)
    return write_adapter_files(out_dir, weights, config)
