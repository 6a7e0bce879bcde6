"""A model source (hub repo id, local folder, ``.gguf`` file) to a ready MLX model.

``load_model(source, quantize)`` returns ``(model, tokenizer, info)``: an mlx-lm model
(its own architectures, never copies), mlx-lm's ``TokenizerWrapper`` and a ``ModelInfo``.

Quantizing a dense source happens at load, block by block on lazily loaded weights,
so peak memory stays near the quantized size plus one block of dense weights.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import mlx.nn as nn

if TYPE_CHECKING:  # mlx-lm's tokenizer module is imported late: it pulls in transformers
    from mlx_lm.tokenizer_utils import TokenizerWrapper

from mlx_tune.config import QuantizeConfig
from mlx_tune.errors import ModelLoadError
from mlx_tune.model import hub
from mlx_tune.runtime import backend

_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.tiktoken", "*.txt"]


@dataclass
class ModelInfo:
    """Where a model came from and how its base weights are stored."""

    source: str
    kind: str  # "hub" | "folder" | "gguf"
    path: str
    config: dict = field(default_factory=dict)
    quantization: dict | None = None  # {"mode", "bits", "group_size"} or None (dense)
    load_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def load_model(
    source: str | os.PathLike,
    quantize: QuantizeConfig | None = None,
    *,
    dequantize: bool = False,
    trust_remote_code: bool = False,
) -> tuple[nn.Module, TokenizerWrapper, ModelInfo]:
    """Load ``source`` as ``(model, tokenizer, info)``.

    ``quantize`` quantizes a dense source (a quantized source with another format is
    dequantized and re-quantized, with a note in ``info.notes``); ``None`` keeps the
    source's storage as it is; ``dequantize=True`` gives dense weights whatever the source.
    """
    start = time.perf_counter()
    source = str(source)
    path = Path(source).expanduser()
    if path.suffix.lower() == ".gguf" or path.is_file():
        if not path.exists():
            raise ModelLoadError(f"{path}: GGUF file not found")
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{path}: is a file but not a .gguf model; give a model folder, a .gguf file or a hub repo id")
        model, tokenizer, info = _load_gguf(path, quantize)
    elif path.is_dir() and not (path / "config.json").is_file() and len(list(path.glob("*.gguf"))) == 1:
        # A fused GGUF folder (the file, its Modelfile and fuse report): the one .gguf in it.
        model, tokenizer, info = _load_gguf(next(path.glob("*.gguf")), quantize)
    elif path.is_dir():
        model, tokenizer, info = _load_folder(path, source, "folder", trust_remote_code)
    elif _looks_like_path(source):
        raise ModelLoadError(f"{source}: no such file or folder")
    else:
        folder = hub.download(source, _HUB_PATTERNS)  # fails within ~2 s when the hub is unreachable
        model, tokenizer, info = _load_folder(folder, source, "hub", trust_remote_code)

    if dequantize:
        if info.quantization:
            _dequantize_model(model)
            info.notes.append(f"dequantized from {info.quantization}")
        info.quantization = None
    elif quantize is not None:
        _quantize(model, quantize, info)
    model.eval()
    info.load_seconds = time.perf_counter() - start
    return model, tokenizer, info


def _looks_like_path(source: str) -> bool:
    # Hub ids are "owner/name"; anything else with separators or dots is meant as a path.
    return (
        source.startswith((".", "/", "~"))
        or source.count("/") != 1
        or source.endswith((".gguf", ".safetensors", ".json"))
        or os.sep != "/" and os.sep in source
    )


def _read_config(path: Path) -> dict:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"{path}: no config.json; a model folder needs config.json, *.safetensors and tokenizer files")
    try:
        return json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{cfg_file}: not valid JSON ({exc})") from None


def _check_safetensors(path: Path) -> None:
    """Open each weight file's header now so a corrupt file is named, not a deep traceback."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        if list(path.glob("*.bin")) or list(path.glob("*.pt")):
            raise ModelLoadError(
                f"{path}: only pickle weights (*.bin / *.pt) found; mlx_tune loads safetensors or GGUF only "
                "(convert with transformers: model.save_pretrained(dir, safe_serialization=True))"
            )
        raise ModelLoadError(f"{path}: no *.safetensors weight files")
    for f in files:
        try:
            size = f.stat().st_size
            with open(f, "rb") as fh:
                header_len = int.from_bytes(fh.read(8), "little")
                if size < 8 or header_len <= 0 or 8 + header_len > size:
                    raise ValueError("header length past the end of the file")
                header = json.loads(fh.read(header_len))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if 8 + header_len + end > size:
                raise ValueError(f"truncated: data needs {8 + header_len + end} bytes, file has {size}")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"{f}: corrupt or truncated safetensors file ({exc})") from None


def _load_folder(path: Path, source: str, kind: str, trust_remote_code: bool):
    from mlx_lm.utils import load_model as mlx_lm_load_model
    from mlx_lm.utils import load_tokenizer

    config = _read_config(path)
    _check_safetensors(path)
    try:
        model, config = mlx_lm_load_model(path, lazy=True)
    except ValueError as exc:
        raise ModelLoadError(f"{path}: cannot build the model ({str(exc).splitlines()[0]})") from None
    try:
        tokenizer = load_tokenizer(
            path, tokenizer_config_extra={"trust_remote_code": trust_remote_code},
            eos_token_ids=config.get("eos_token_id"),
        )
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ModelLoadError(f"{path}: cannot build the tokenizer ({type(exc).__name__}: {first})") from None
    q = config.get("quantization") or config.get("quantization_config")
    quant = {"mode": q.get("mode", "affine"), "bits": q.get("bits"), "group_size": q.get("group_size")} if q else None
    return model, tokenizer, ModelInfo(source=source, kind=kind, path=str(path), config=config, quantization=quant)


def _load_gguf(path: Path, quantize: QuantizeConfig | None):
    from mlx_tune.model import gguf as G

    # The architecture and tensor types are checked from the header, before any weight is read
    # (and before importing mlx-lm and transformers, which take seconds).
    header = G.read_gguf_header(path)
    config, arch = G.gguf_config(header.metadata, {t.name for t in header.tensors}, path, G.rope_tensors(path, header))

    from mlx.utils import tree_flatten
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    flat: Any = tree_flatten(model.parameters())
    params = {k: tuple(v.shape) for k, v in flat}
    tensors, metadata = G.read_gguf(path, header)
    weights, unknown = G.gguf_weights(tensors, config, arch, metadata, params)
    if unknown:
        raise ModelLoadError(f"{path}: tensors mlx_tune cannot place: {', '.join(sorted(unknown)[:5])}")
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)  # e.g. Gemma 3 drops its lm_head when the file ties it
    try:
        hf_tokenizer = G.build_tokenizer(metadata, path)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot build the tokenizer from GGUF metadata ({exc})") from None

    requant = quantize or QuantizeConfig()
    dense_names = {k for k, v in weights.items() if isinstance(v, G.Dequantized)}
    for name in dense_names:
        weights[name] = weights[name].array

    # Which layers hold quantized tensors, and at how many bits (GGUF files mix Q4 and Q8).
    def layer_quant(prefix: str, module: nn.Module):
        if f"{prefix}.scales" in weights:
            w, s = weights[f"{prefix}.weight"], weights[f"{prefix}.scales"]
            in_dims = s.shape[-1] * 32
            return {"group_size": 32, "bits": w.shape[-1] * 32 // in_dims}
        if f"{prefix}.weight" in dense_names and hasattr(module, "to_quantized") and requant.mode == "affine":
            return {"group_size": requant.group_size, "bits": requant.bits}
        return False

    nn.quantize(model, class_predicate=layer_quant)
    # Tensors of block types with no exact MLX layout (K-quants, Q5_0/Q5_1, IQ, TQ) were
    # dequantized: quantize them into the layers' MLX format.
    for name in dense_names:
        prefix = name.rsplit(".", 1)[0]
        if f"{prefix}.scales" in weights:
            continue
        module = dict(model.named_modules()).get(prefix)
        if module is not None and hasattr(module, "scales"):
            w, s, *b = mx.quantize(weights[name], group_size=module.group_size, bits=module.bits)
            weights[name], weights[f"{prefix}.scales"] = w, s
            if b:
                weights[f"{prefix}.biases"] = b[0]
    compute_dtype = backend.compute_dtype()
    weights = {
        k: (v.astype(compute_dtype) if mx.issubdtype(v.dtype, mx.floating) and not k.endswith((".scales", ".biases")) else v)
        for k, v in weights.items()
    }
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as exc:
        first = str(exc).splitlines()[0]
        raise ModelLoadError(f"{path}: weights do not fit the {config['model_type']} architecture ({first})") from None
    mx.eval(model.parameters())

    tokenizer = TokenizerWrapper(hf_tokenizer, eos_token_ids=G.eos_token_ids(metadata))
    from collections import Counter

    # Report the bits most linear layers use (GGUF files keep embeddings at 8 bits).
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear

    linear = (nn.QuantizedLinear, QuantizedSwitchLinear)
    counts = Counter(m.bits for _, m in model.named_modules() if isinstance(m, linear))
    bits = counts.most_common(1)[0][0] if counts else None
    info = ModelInfo(
        source=str(path), kind="gguf", path=str(path), config=config,
        quantization={"mode": "affine", "bits": bits, "group_size": 32} if bits else None,
    )
    if dense_names:
        info.notes.append(f"{len(dense_names)} tensors of block types with no exact MLX layout (K-quant, Q5_0/Q5_1, IQ, "
                          f"TQ) re-quantized to affine {requant.bits}-bit g{requant.group_size}")
    return model, tokenizer, info


def _dequantize_model(model: nn.Module) -> None:
    from mlx_lm.utils import dequantize_model

    dequantize_model(model)
    if backend.on_cpu():
        model.update(_cast_floats(model.parameters(), mx.float32))
    mx.eval(model.parameters())


def _cast_floats(tree: Any, dtype) -> Any:
    from mlx.utils import tree_map

    return tree_map(lambda a: a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating) else a, tree)


def _quantize(model: nn.Module, qcfg: QuantizeConfig, info: ModelInfo) -> None:
    """Quantize (or re-quantize) the base as ``qcfg`` says, one block at a time."""
    have = info.quantization
    if have and (have.get("mode", "affine"), have.get("bits"), have.get("group_size")) == (
            qcfg.mode, qcfg.bits, qcfg.group_size):
        return
    if have:
        if info.kind == "gguf":
            # Re-quantizing GGUF's native 4/8-bit blocks would only add error.
            info.notes.append(f"kept the GGUF file's quantization {have}; "
                              f"requested {qcfg.mode} {qcfg.bits}-bit g{qcfg.group_size} ignored")
            return
        info.notes.append(f"re-quantized from {have} to {qcfg.mode} {qcfg.bits}-bit g{qcfg.group_size}")
        _dequantize_model(model)
    if qcfg.mode == "nf4":
        from mlx_tune.model.quantize import quantize_model

        quantize_model(model, qcfg)
    else:
        blocks = list(getattr(getattr(model, "model", model), "layers", []))
        for block in blocks:
            nn.quantize(block, group_size=qcfg.group_size, bits=qcfg.bits)
            mx.eval(block.parameters())  # materialise this block's 4-bit weights, free its dense ones
        # Embeddings and the LM head, as mlx-lm quantizes them.
        nn.quantize(
            model, group_size=qcfg.group_size, bits=qcfg.bits,
            class_predicate=lambda p, m: hasattr(m, "to_quantized") and not hasattr(m, "scales")
            and m.weight.shape[-1] % qcfg.group_size == 0,
        )
        mx.eval(model.parameters())
    info.quantization = {"mode": qcfg.mode, "bits": qcfg.bits, "group_size": qcfg.group_size}
