"""An adapter trained on top of a frozen one (``preference.reference: ADAPTER_DIR``).

DPO on top of an SFT adapter: the SFT adapter is loaded as ``reference`` and frozen under
the trained one on every layer it covers (``LoRALinear.frozen``), so

    policy    = base + s_ref B_ref A_ref + s B A
    reference = base + s_ref B_ref A_ref          (the trained adapter switched off)

with one copy of the weights. What is saved is one plain LoRA adapter computing both:
ranks side by side, the scales folded into B (alpha = rank, so s = 1),

    A' = [A_ref | A],  B' = [s_ref B_ref ; s B]   =>   s' B' A' = s_ref B_ref A_ref + s B A

(zeros where a layer has only one of the two), which serves and fuses like any adapter.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from mlx_tune.adapters.inject import wrappers
from mlx_tune.adapters.lora import LoRAAdapter, LoRALinear
from mlx_tune.adapters.manager import load_adapter
from mlx_tune.errors import UserError

REFERENCE = "reference"
STACKED = "stacked"


def load_reference(model: nn.Module, path: str | Path) -> int:
    """Load ``path`` as the frozen ``reference`` adapter under the active one; layers covered."""
    load_adapter(model, path, name=REFERENCE, activate=False)
    held = [(p, w) for p, w in wrappers(model) if REFERENCE in w.adapters]
    for p, w in held:
        if type(w) is not LoRALinear or w.adapters[REFERENCE].kind != "lora" or (
                w.active in w.adapters and w.adapters[w.active].kind != "lora"):
            raise UserError(f"preference.reference: {path}: only plain LoRA adapters on plain linear layers stack "
                            f"({p} is not one); fuse the reference adapter into the base instead")
        w.frozen = (REFERENCE,)
        w.adapters[REFERENCE].set_trainable(False)
    return len(held)


def _parts(adapter: LoRAAdapter | None, in_dims: int, out_dims: int, rank: int, dtype) -> tuple[mx.array, mx.array]:
    if adapter is None:
        return mx.zeros((in_dims, rank), dtype=dtype), mx.zeros((rank, out_dims), dtype=dtype)
    return adapter.lora_a.astype(dtype), (adapter.scale * adapter.lora_b.astype(mx.float32)).astype(dtype)


def build_stacked(model: nn.Module, active: str) -> int:
    """Add adapter ``stacked`` (reference and ``active`` as one LoRA, module doc) to every
    layer holding either; returns its rank. ``remove_stacked`` takes it away again."""
    held = [w for _, w in wrappers(model) if REFERENCE in w.adapters or active in w.adapters]
    r_ref = max((w.adapters[REFERENCE].rank for w in held if REFERENCE in w.adapters), default=0)
    r_new = max((w.adapters[active].rank for w in held if active in w.adapters), default=0)
    rank = r_ref + r_new
    for w in held:
        out_dims, in_dims = w.dims
        ref, new = w.adapters.get(REFERENCE), w.adapters.get(active)
        dtype = (new or ref).lora_a.dtype  # type: ignore[union-attr]
        a1, b1 = _parts(ref, in_dims, out_dims, r_ref, dtype)
        a2, b2 = _parts(new, in_dims, out_dims, r_new, dtype)
        adapter = w.add_adapter(STACKED, rank, float(rank))
        adapter.lora_a = mx.concatenate([a1, a2], axis=1)
        adapter.lora_b = mx.concatenate([b1, b2], axis=0)
    return rank


def remove_stacked(model: nn.Module) -> None:
    for _, w in wrappers(model):
        w.remove_adapter(STACKED)
