"""LoRA on mixture-of-experts expert stacks: one low-rank update per expert.

mlx-lm keeps an MoE layer's experts as one stacked weight ``W0`` (E, out, in)
(``SwitchLinear`` / ``QuantizedSwitchLinear`` inside ``SwitchGLU``) and computes, for a
token ``x`` routed to experts ``e in idx(x)``, ``y_e = W0[e] x (+ b[e])`` with
``mx.gather_mm``. The adapter adds one LoRA per expert, as mlx-lm's ``LoRASwitchLinear``::

    y_e = W0[e] x + b[e] + s * B[e] A[e] dropout(x),   A: (E, r, in), B: (E, out, r)

stored in mlx-lm's layout (``lora_a`` (E, r, in), ``lora_b`` (E, out, r)), so an adapter
folder loads in mlx-lm too. A starts uniform in [-1/sqrt(in), 1/sqrt(in)], B at zero:
a fresh adapter leaves every expert unchanged. Only the experts a token is routed to
receive gradient, exactly as their base weights would. The router (``gate`` / ``router``)
is a plain linear layer beside the stack and stays frozen unless it is named.

Fusing stores ``W0[e] + s B[e] A[e]`` per expert, re-quantized like the base (or dense).
DoRA on expert stacks is not offered (its row norm would be per expert and per row; no
tool reads such files).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from mlx_tune.adapters.lora import LoRAAdapter, LoRALinear, fuse_base
from mlx_tune.model import quant


class SwitchLoRAAdapter(LoRAAdapter):
    """One LoRA per expert: ``s * B[e] A[e] dropout(x)`` for the experts ``indices`` name."""

    mixable = False  # the server's row mixing handles (x @ A) @ B layers only

    def __init__(self, num_experts: int, in_dims: int, out_dims: int, rank: int = 8, alpha: float = 16.0,
                 dropout: float = 0.0, use_rslora: bool = False):
        nn.Module.__init__(self)
        self._start(in_dims, (num_experts, rank, in_dims), (num_experts, out_dims, rank), rank, alpha, dropout,
                    use_rslora)

    def delta(self) -> mx.array:
        """The dense updates s * B[e] A[e] as one (E, out, in) float32 array."""
        return self.scale * (self.lora_b.astype(mx.float32) @ self.lora_a.astype(mx.float32))

    def apply(self, x: mx.array, y: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        z = mx.gather_mm(self.dropout(x), self.lora_a.swapaxes(-1, -2), rhs_indices=indices,
                         sorted_indices=sorted_indices)
        z = mx.gather_mm(z, self.lora_b.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices)
        return y + (self.scale * z).astype(y.dtype)


def adapter_shapes(layer: nn.Module, rank: int) -> dict[str, tuple[int, ...]]:
    """Shapes of ``lora_a`` / ``lora_b`` (/ ``m``) for a rank-``rank`` adapter on ``layer``."""
    base = layer.base if isinstance(layer, LoRALinear) else layer
    if quant.is_switch_linear(base):
        experts, out_dims, in_dims = quant.switch_dims(base)
        return {"lora_a": (experts, rank, in_dims), "lora_b": (experts, out_dims, rank)}
    from mlx_tune.adapters.lora import linear_dims

    out_dims, in_dims = linear_dims(base)
    return {"lora_a": (in_dims, rank), "lora_b": (rank, out_dims), "m": (out_dims,)}


class LoRASwitchLinear(LoRALinear):
    """A frozen expert stack plus named per-expert adapters (the ``LoRALinear`` interface).

    Called as the stack is, ``layer(x, indices, sorted_indices)``; ``active``, ``enabled``,
    adding, removing and switching adapters work as on ``LoRALinear``.
    """

    accepts = staticmethod(quant.is_switch_linear)

    @property
    def dims(self) -> tuple[int, int, int]:  # type: ignore[override]
        return quant.switch_dims(self.base)

    def add_adapter(self, name: str, rank: int, alpha: float, dropout: float = 0.0,
                    use_rslora: bool = False, use_dora: bool = False) -> LoRAAdapter:
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        if use_dora:
            raise ValueError("DoRA is not available on MoE expert layers; set use_dora: false or leave the experts out")
        experts, out_dims, in_dims = self.dims
        adapter = SwitchLoRAAdapter(experts, in_dims, out_dims, rank, alpha, dropout, use_rslora)
        adapter.train(self.training)
        adapter.set_trainable(False)
        self.adapters[name] = adapter
        return adapter

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:  # type: ignore[override]
        y = self.base(x, indices, sorted_indices=sorted_indices)
        adapter = self.adapter
        if isinstance(adapter, SwitchLoRAAdapter):
            return adapter.apply(x, y, indices, sorted_indices)
        # The server's row-mixing pseudo adapter: expert adapters are never mixed
        # (SwitchLoRAAdapter.mixable), so no row of a mixed batch has one on this layer.
        return y

    def fuse(self, dequantize: bool = False) -> nn.Module:
        """A plain expert stack computing what this one computes now (active adapter merged)."""
        def dense(weight: mx.array, bias: mx.array | None) -> nn.Module:
            from mlx_lm.models.switch_layers import SwitchLinear

            experts, out_dims, in_dims = weight.shape
            fused = SwitchLinear(in_dims, out_dims, experts, bias=False)
            fused.weight = weight.astype(self.base["scales"].dtype if "scales" in self.base else self.base["weight"].dtype)
            if bias is not None:
                fused.bias = bias
            return fused

        return fuse_base(self.base, self.adapter, dequantize, dense)


def wrapper_class(layer: nn.Module) -> type[LoRALinear]:
    """The wrapper that adapts ``layer``: ``LoRASwitchLinear`` for expert stacks, else ``LoRALinear``."""
    return LoRASwitchLinear if quant.is_switch_linear(layer) else LoRALinear


def moe_routers(linears: dict[str, nn.Module]) -> set[str]:
    """Paths of router layers: plain linears beside an expert stack's container.

    ``mlp.switch_mlp.gate_proj`` is an expert stack, ``mlp.switch_mlp`` its container,
    ``mlp`` the MoE block; linears directly in the block (``mlp.gate``, gpt-oss'
    ``mlp.router``, qwen2-moe's ``mlp.shared_expert_gate``) route tokens.
    """
    blocks = set()
    for path, layer in linears.items():
        base = layer.base if isinstance(layer, LoRALinear) else layer
        if quant.is_switch_linear(base):
            blocks.add(path.rsplit(".", 2)[0])
    return {p for p, layer in linears.items()
            if p.rpartition(".")[0] in blocks and not quant.is_switch_linear(getattr(layer, "base", layer))}
