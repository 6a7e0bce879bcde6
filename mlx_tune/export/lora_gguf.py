"""An adapter alone as a llama.cpp LoRA GGUF (``mlx-tune adapter export --format gguf``).

llama.cpp's ``convert_lora_to_gguf.py`` layout, so ``llama-cli -m base.gguf --lora
adapter.gguf`` and Ollama's ``ADAPTER`` line apply it without fusing:

* metadata ``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha``,
  ``general.architecture`` of the base;
* for each adapted weight ``blk.N.attn_q.weight`` two F32 tensors,
  ``blk.N.attn_q.weight.lora_a`` (rank x in) and ``.lora_b`` (out x rank).

llama.cpp adds ``(alpha / rank) * B @ A`` to the weight. Ours adds ``scale * (A_m B_m)^T``
with mlx's ``lora_a`` (in x rank) and ``lora_b`` (rank x out), so ``lora_a = A_m^T``,
``lora_b = B_m^T`` and ``alpha = scale * rank`` (which also covers rsLoRA's
``alpha / sqrt(rank)``). Llama-family Q and K rows are stored permuted for llama.cpp's
rotary layout; ``B``'s rows get the same permutation (``A`` acts on inputs, unchanged).
DoRA's magnitude vector and mixture-of-experts stacks have no llama.cpp LoRA form: refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_tune.atomic import write_file_atomic
from mlx_tune.errors import UserError
from mlx_tune.export.gguf import ARCHS, gguf_name, permute


def _base_heads(source: str | Path | None, model_type: str) -> tuple[int, int] | None:
    """(attention heads, key/value heads) of the base model, read from its config or GGUF header."""
    if source is None:
        return None
    path = Path(source).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
        heads = int(cfg["num_attention_heads"])
        return heads, int(cfg.get("num_key_value_heads", heads))
    if path.is_file() and path.suffix == ".gguf":
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()

        def value(key: str) -> int | None:
            field = reader.fields.get(f"{arch}.{key}")
            return int(field.parts[-1][0]) if field is not None else None

        heads = value("attention.head_count")
        return (heads, value("attention.head_count_kv") or heads) if heads else None
    return None


def export_lora_gguf(adapter_dir: str | Path, out_path: str | Path, base: str | Path | None = None) -> Path:
    """Write the mlx_tune (or PEFT) adapter in ``adapter_dir`` as a llama.cpp LoRA GGUF at ``out_path``."""
    from gguf import GGUFWriter

    from mlx_tune.adapters.peft import read_adapter

    config, weights, source = read_adapter(adapter_dir)
    out = Path(out_path)
    if out.suffix != ".gguf":
        raise UserError(f"{out}: the output is one file; give a name ending in .gguf")
    if config.get("use_dora"):
        raise UserError(f"{source.parent}: a DoRA adapter has no llama.cpp LoRA form (its magnitude vector); "
                        "fuse it instead (mlx-tune fuse ... fuse.format=gguf)")
    model_type = config.get("base_model_type")
    if model_type not in ARCHS:
        raise UserError(f"{source.parent}: base model type {model_type!r} has no GGUF LoRA export; supported: "
                        f"{', '.join(sorted(ARCHS))}")
    arch = ARCHS[model_type]
    heads = None
    if arch.permute_qk:
        heads = _base_heads(base or config.get("base_model"), model_type)
        if heads is None:
            raise UserError(f"{source.parent}: the base model {config.get('base_model')!r} cannot be read for its "
                            "attention heads (llama.cpp's Q/K layout needs them); pass --base BASE_FOLDER_OR_GGUF")
    rank, scale = int(config["rank"]), float(config["scale"])
    modules = sorted({k.rpartition(".")[0] for k in weights})
    tensors: list[tuple[str, np.ndarray]] = []
    for module in modules:
        name = gguf_name(module + ".weight", model_type)
        a = weights.get(f"{module}.lora_a")
        b = weights.get(f"{module}.lora_b")
        if name is None or a is None or b is None or a.ndim != 2:
            raise UserError(f"{source}: {module} has no llama.cpp LoRA form (only linear layers of the blocks and "
                            "the output head; mixture-of-experts stacks are not supported)")
        la = np.array(a.astype(mx.float32)).T.copy()
        lb = np.array(b.astype(mx.float32)).T.copy()
        if heads is not None and name.endswith(("attn_q.weight", "attn_k.weight")):
            lb = permute(lb, heads[0] if "attn_q" in name else heads[1])
        tensors += [(name + ".lora_a", la), (name + ".lora_b", lb)]

    def write(tmp: Path) -> None:
        w = GGUFWriter(str(tmp), arch.gguf_arch)
        w.add_string("general.type", "adapter")
        w.add_string("general.name", str(config.get("name") or Path(adapter_dir).name))
        w.add_string("adapter.type", "lora")
        w.add_float32("adapter.lora.alpha", scale * rank)
        for tname, data in tensors:
            w.add_tensor(tname, data)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    out.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(out, write)
    return out
