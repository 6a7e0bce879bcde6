"""What a run trains (``train.finetune``, ``train.trainable``) and what it writes at the end.

* ``finetune: lora`` (default): a LoRA adapter (``adapters.inject``); the modules matching
  ``train.trainable`` train besides it and are saved with it (``adapters.trainable``).
* ``finetune: full``: every weight of a dense base, or with ``train.trainable`` only the
  matching modules (a partial fine-tune: embeddings and norms, the top blocks). The output
  is a model folder in Hugging Face layout at ``OUTPUT_DIR/model`` (``export.full``).

Master weights: the trained weights are cast to float32 for the whole run and written back
in the source dtype on save. A half-precision (bf16 / fp16) AdamW update ``w - lr * u``
loses every step smaller than half a unit of the weight's last place (bf16 has an 8-bit
mantissa: with lr 1e-5 most updates of an O(1) weight round to nothing), so the weights the
optimizer updates must be fp32. Keeping them fp32 also for the forward (rather than a half
copy per step) is the simplest correct form: the matmuls of trained layers run in fp32, at
4 bytes a weight plus fp32 gradients and AdamW's two fp32 moments (``planning.full``).

A quantized base cannot be fully fine-tuned (a packed weight has no gradient): the check
comes before the model is loaded (``quantize:`` set) or right after (a quantized source),
with the way out in the message.
"""

from __future__ import annotations

import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlx_tune import adapters
from mlx_tune.adapters.lora import is_packed
from mlx_tune.adapters.stack import STACKED, build_stacked, remove_stacked
from mlx_tune.adapters.trainable import match_modules, trained_base_weights, unfreeze_modules
from mlx_tune.config import PREFERENCE_METHODS, Config
from mlx_tune.errors import UserError
from mlx_tune.export.full import TRAINING_FILE, model_dir, write_model_folder

HALF = (mx.float16, mx.bfloat16)


@dataclass
class Setup:
    """What ``prepare`` made trainable: the summary line and each trained weight's source dtype."""

    summary: str
    source_dtypes: dict[str, mx.Dtype] = field(default_factory=dict)
    dtype: str = "float32"  # the source's most common floating dtype (the saved model's)


def check_config(cfg: Config) -> None:
    """Refuse a full fine-tune of a base the config quantizes, before loading anything."""
    if cfg.train.dequantize and cfg.quantize is not None:
        raise UserError("train.dequantize: true loads the source dense, but quantize: is set (the default is "
                        "4-bit) and would quantize it again; set quantize: null")
    if cfg.train.finetune == "full" and cfg.quantize is not None:
        raise UserError("train.finetune: full trains dense weights but quantize: is set (the default is 4-bit); "
                        "set quantize: null (a quantized source also needs train.dequantize: true)")


def _dtype_name(model: nn.Module) -> str:
    arrays = [v for _, v in cast("list[tuple[str, mx.array]]", tree_flatten(model.parameters()))]
    counts = Counter(v.dtype for v in arrays if mx.issubdtype(v.dtype, mx.floating))
    common = counts.most_common(1)[0][0] if counts else mx.float32
    return {mx.float16: "float16", mx.bfloat16: "bfloat16"}.get(common, "float32")


def prepare(model: nn.Module, info, cfg: Config) -> Setup:
    """Make what ``cfg`` trains trainable (the rest frozen) and its weights fp32 masters."""
    tc = cfg.train
    dtype = _dtype_name(model)
    if tc.finetune == "lora":
        summary = str(adapters.inject(model, cfg.lora))
        if tc.trainable:
            unfreeze_modules(model, match_modules(model, tc.trainable), lora=True)
    else:
        packed = [p for p, m in model.named_modules() if is_packed(m)]
        if packed or info.quantization:
            raise UserError(f"train.finetune: full: {cfg.model} is stored quantized ({info.quantization or packed[0]}); "
                            "set train.dequantize: true (with quantize: null) to train dense weights made from it, "
                            "or use a dense source")
        if tc.trainable:
            model.freeze()
            unfreeze_modules(model, match_modules(model, tc.trainable), lora=False)
        else:
            model.unfreeze()
        summary = ""
    trained: dict[str, mx.array] = dict(tree_flatten(model.trainable_parameters()))
    source = {k: v.dtype for k, v in trained.items()}
    masters = [(k, v.astype(mx.float32)) for k, v in trained.items() if v.dtype in HALF]
    if masters:
        model.update(tree_unflatten(masters))
        mx.eval(model.parameters())
    if tc.finetune == "full":
        s = adapters.trainable_summary(model)
        summary = (f"full fine-tune: trainable params: {s.trainable:,} || all params: {s.total:,} || "
                   f"trainable%: {s.percent:.4f} || master weights fp32 ({len(masters)} of {len(trained)} cast "
                   f"from {dtype})")
    elif tc.trainable:
        extra = trained_base_weights(model)
        summary += f"; besides the adapter: {sum(v.size for v in extra.values()):,} base params in {len(extra)} weights"
    return Setup(summary, source, dtype)


def save_outputs(model: nn.Module, tokenizer, info, cfg: Config, setup: Setup, *, template: str | None,
                 kept: dict) -> Path:
    """The adapter folder (lora) or ``OUTPUT_DIR/model`` (full); returns what was written."""
    out = Path(cfg.output_dir)
    _drop_other_output(out, cfg.train.finetune)
    if cfg.train.finetune == "lora":
        extra = {k: v.astype(setup.source_dtypes.get(k, v.dtype)) for k, v in trained_base_weights(model).items()}
        if cfg.preference.reference and cfg.train.method in PREFERENCE_METHODS:
            # The trained adapter and the frozen one it stacks on, saved as one adapter.
            active = adapters.active_name(model) or "default"
            rank = build_stacked(model, active)
            try:
                return adapters.save_adapter(model, out, None, info, name=STACKED, chat_template=template,
                                             extra={**kept, "name": active, "stacked_on": cfg.preference.reference,
                                                    "stacked_rank": rank}, base_weights=extra or None)
            finally:
                remove_stacked(model)
        return adapters.save_adapter(model, out, cfg.lora, info, chat_template=template, extra=kept,
                                     base_weights=extra or None)
    meta = {"finetune": "full", "trainable": cfg.train.trainable or "all", "base_model": info.source, **kept}
    return write_model_folder(model, tokenizer, info, model_dir(out), setup.dtype, template=template, meta=meta)


def _drop_other_output(out: Path, finetune: str) -> None:
    """An earlier run's output of the other kind must not outlive it (serve and fuse would pick it)."""
    if finetune == "lora":
        if (model_dir(out) / TRAINING_FILE).is_file():  # only a folder a full run wrote
            shutil.rmtree(model_dir(out))
        return
    for name in (adapters.ADAPTER_CONFIG, adapters.ADAPTER_WEIGHTS):  # the config first: it marks a complete folder
        if (out / name).is_file():
            (out / name).unlink()
