"""Writing a fused model: safetensors shards, MLX / Hugging Face folders, GGUF files.

Arrays are produced one unit (layer) at a time by ``export.units`` and streamed into
shards of at most ``SHARD_BYTES``, so a quantized output never needs the dense model in
memory. Every writer writes into a folder that ``export.fuse`` later commits whole
(``mlx_tune.atomic.commit_dir``); each file in it is written with ``mlx_tune.atomic`` too.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlx_tune.atomic import write_file_atomic, write_text_atomic
from mlx_tune.export.gguf import GGUFTensor, write_gguf
from mlx_tune.export.units import mlx_arrays, units

SHARD_BYTES = 2 << 30  # flush a safetensors shard at 2 GiB: bounds the memory of dense outputs
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}


def _write_shards(out: Path, produce: Iterator[dict[str, mx.array]], metadata: dict) -> None:
    """Save arrays as they come into shards of at most ``SHARD_BYTES`` (+ an index when several)."""
    parts: list[tuple[Path, list[str]]] = []
    pending: dict[str, mx.array] = {}
    size = 0
    total = 0

    def flush():
        nonlocal pending, size
        if not pending:
            return
        part = out / f".shard-{len(parts):05d}.safetensors"
        write_file_atomic(part, lambda tmp: mx.save_safetensors(str(tmp), pending, metadata=metadata))
        parts.append((part, sorted(pending)))
        pending, size = {}, 0

    for arrays in produce:
        mx.eval(arrays)  # one layer at a time: its dense / fused copy dies at the next iteration
        for k, v in arrays.items():
            pending[k] = v
            size += v.nbytes
            total += v.nbytes
        if size >= SHARD_BYTES:
            flush()
    flush()
    n = len(parts)
    weight_map = {}  # the final names need the count: renamed inside the folder, which is committed whole
    for i, (part, names) in enumerate(parts):
        final = out / ("model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors")
        os.replace(part, final)
        weight_map.update({k: final.name for k in names})
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        write_text_atomic(out / "model.safetensors.index.json", json.dumps(index, indent=2))


def _clean_config(config: dict) -> dict:
    drop = {"quantization", "quantization_config", "_name_or_path"}
    return {k: v for k, v in config.items() if k not in drop}


def _token_ids(config: dict, tokenizer) -> dict:
    """bos / eos ids for config.json: the source's, else the tokenizer's (all end-of-turn ids)."""
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    out = {}
    if config.get("bos_token_id") is None and getattr(hf, "bos_token_id", None) is not None:
        out["bos_token_id"] = hf.bos_token_id
    eos = sorted(getattr(tokenizer, "eos_token_ids", None) or [])
    if config.get("eos_token_id") is None and eos:
        out["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    return out


def _save_tokenizer(tokenizer, out: Path) -> None:
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    hf.save_pretrained(str(out))


def write_safetensors_folder(model, tokenizer, config: dict, out: Path, fmt: str, dense: bool, dtype: str,
                             keep: str | None) -> dict:
    """An MLX or Hugging Face folder; returns the config written."""
    mx_dtype = DTYPES[dtype]
    entries: dict[str, dict] = {}

    def produce():
        for unit in units(model):
            arrays, params = mlx_arrays(unit, dense, mx_dtype, keep)
            if params is not None:
                entries[unit.path] = params
            yield arrays

    _write_shards(out, produce(), {"format": "mlx" if fmt == "mlx" else "pt"})
    cfg = {**_clean_config(config), **_token_ids(config, tokenizer)}
    if entries:
        common = Counter(json.dumps(p, sort_keys=True) for p in entries.values()).most_common(1)[0][0]
        default = json.loads(common)
        qcfg: dict[str, Any] = dict(default)
        for path, p in sorted(entries.items()):
            if p != default:  # per-layer entries, read by mlx_lm.load's class_predicate
                qcfg[path] = p
        cfg["quantization"] = qcfg
        cfg["quantization_config"] = qcfg  # mlx-lm writes both
    if fmt == "hf":
        cfg.setdefault("architectures", [HF_ARCHITECTURES.get(cfg.get("model_type"), "AutoModelForCausalLM")])
        cfg["torch_dtype"] = dtype
    write_text_atomic(out / "config.json", json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    _save_tokenizer(tokenizer, out)
    return cfg


def gguf_tensors(model: nn.Module, gguf_type: str, keep: str | None):
    """The model's tensors for ``export.gguf.write_gguf``: adapted ones at Q8_0 / F16 when kept."""
    keep_type = {"8bit": "q8_0", "dense": "f16"}.get(keep or "")
    out = []
    for unit in units(model):
        for key in unit.keys():
            shape = unit.shape(key)
            qtype = "f32" if len(shape) == 1 else (keep_type if unit.adapted and keep_type else gguf_type)
            out.append(GGUFTensor(unit.name(key), shape, qtype,
                                  lambda u=unit, k=key: (_numpy(c) for c in u.dense_chunks(k))))
    return out


def _numpy(a: mx.array):
    import numpy as np

    return np.array(a.astype(mx.float32), copy=True)


def _gguf_source(info) -> Path | None:
    return Path(info.path) if getattr(info, "kind", None) == "gguf" else None


def write_gguf_file(model: nn.Module, tokenizer, info, out: Path, gguf_type: str, keep: str | None) -> Path:
    """``model-<gguf_type>.gguf`` in folder ``out``; returns its path."""
    path = out / f"model-{gguf_type}.gguf"
    name = Path(str(info.source)).stem if info is not None else None
    write_gguf(path, info.config, gguf_tensors(model, gguf_type, keep), gguf_type,
               getattr(tokenizer, "_tokenizer", tokenizer), source_gguf=_gguf_source(info), name=name)
    return path
