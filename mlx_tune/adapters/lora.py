"""LoRA and DoRA layers over a frozen linear base, with several named adapters per base.

LoRA (Hu et al. 2021) adds a trainable low-rank update to a frozen weight W0 (out, in)::

    y = W0 x + b + s * B A dropout(x),   A: (r, in), B: (out, r),
    s = alpha / r            (or alpha / sqrt(r) with rsLoRA, Kalajdzievski 2023)

A starts uniform in [-1/sqrt(in), 1/sqrt(in)] (PEFT's ``kaiming_uniform_(a=sqrt(5))``
gives exactly this bound; mlx-lm uses the same) and B starts at zero, so a fresh
adapter leaves the model unchanged. A and B are stored transposed, the way mlx-lm
does: ``lora_a`` (in, r) and ``lora_b`` (r, out), so the update is ``x @ lora_a @ lora_b``.

DoRA (Liu et al. 2024) splits the adapted weight into a magnitude and a direction::

    W' = m * (W0 + s B A) / ||W0 + s B A||_row,   m: (out,) initialised to ||W0||_row
    y  = W' x + b

The row norm is treated as a constant in the backward pass (the paper's memory
trick, also in PEFT and mlx-lm), so the output is computed as
``m / ||W0 + s B A|| * (W0 x + s B A x)`` without materialising W'.

One wrapper (``LoRALinear``) holds the frozen base and a dict of named adapters
(``LoRAAdapter`` / ``DoRAAdapter``); ``active`` picks one (None: base only). Switching
adapters sets a name on each wrapper and never copies or touches base weights, which is
what the server relies on. Only the active adapter's parameters are trainable.

The base can be an ``nn.Linear``, an ``nn.QuantizedLinear`` or any layer exposing the
``mlx_tune.model.quant`` protocol (``dense_weight()`` / ``requantize_like()``, e.g. NF4).
``active`` and ``enabled`` are plain Python attributes: an ``mx.compile``'d step sees the
values at trace time, so recompile (or re-create the step) after switching.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

from mlx_tune.config import lora_hyperparameter_problems
from mlx_tune.model import quant


def check_hyperparameters(rank, alpha, dropout) -> None:
    """Reject bad adapter hyper-parameters with one clear message (ValueError)."""
    problems = lora_hyperparameter_problems(rank, alpha, dropout)
    if problems:
        raise ValueError("; ".join(problems))


def lora_scale(rank: int, alpha: float, use_rslora: bool = False) -> float:
    """s = alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return float(alpha) / (math.sqrt(rank) if use_rslora else rank)


def linear_dims(layer: nn.Module) -> tuple[int, int]:
    """(out, in) of a linear-like layer, without computing anything."""
    if isinstance(layer, nn.QuantizedLinear):
        out_dims, packed = layer.weight.shape
        return out_dims, packed * 32 // layer.bits
    if isinstance(layer, nn.Linear) and not hasattr(layer, "dense_weight"):
        return tuple(layer.weight.shape)
    # Any other protocol layer: the dense weight's shape is known lazily, nothing runs.
    return tuple(quant.dense_weight(layer).shape)


def is_packed(layer: nn.Module) -> bool:
    """A layer whose stored weight is not its logical weight (quantized, NF4, ...)."""
    return isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding)) or (
        callable(getattr(layer, "dense_weight", None)) and type(layer) is not nn.Linear
    ) or (quant.is_switch_linear(layer) and "scales" in layer)


def logical_shape(layer: nn.Module) -> tuple[int, ...]:
    """The weight's logical shape: a 4-bit (out, in/8) uint32 weight is (out, in)."""
    if isinstance(layer, nn.QuantizedEmbedding):
        rows, packed = layer.weight.shape
        return rows, packed * 32 // layer.bits
    if quant.is_switch_linear(layer):
        return quant.switch_dims(layer)
    return tuple(linear_dims(layer))


def is_linear_like(layer: nn.Module) -> bool:
    """A layer LoRA can wrap: nn.Linear, nn.QuantizedLinear or a quant-protocol layer."""
    return isinstance(layer, (nn.Linear, nn.QuantizedLinear)) or callable(getattr(layer, "dense_weight", None))


def _dense_dtype(layer: nn.Module) -> mx.Dtype:
    """dtype for a dequantized copy: the weight's for dense layers, the scales' for quantized."""
    if isinstance(layer, nn.QuantizedLinear):
        return layer.scales.dtype
    if isinstance(layer, nn.Linear):
        return layer.weight.dtype
    return getattr(layer, "dtype", mx.float32)


class LoRAAdapter(nn.Module):
    """One named low-rank update: ``s * (dropout(x) @ lora_a) @ lora_b``."""

    kind = "lora"
    param_keys = ("lora_a", "lora_b")

    def __init__(self, in_dims: int, out_dims: int, rank: int = 8, alpha: float = 16.0,
                 dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        self._start(in_dims, (in_dims, rank), (rank, out_dims), rank, alpha, dropout, use_rslora)

    def _start(self, in_dims: int, a_shape: tuple[int, ...], b_shape: tuple[int, ...], rank: int, alpha: float,
               dropout: float, use_rslora: bool) -> None:
        """The hyperparameters, A uniform in [-1/sqrt(in), 1/sqrt(in)] and B zero (a fresh
        adapter changes nothing); subclasses give their own shapes of A and B."""
        check_hyperparameters(rank, alpha, dropout)
        self.rank, self.alpha, self.use_rslora = rank, float(alpha), bool(use_rslora)
        self.scale = lora_scale(rank, alpha, use_rslora)
        self.dropout_p = float(dropout)
        self.dropout = nn.Dropout(p=dropout)
        bound = 1.0 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(low=-bound, high=bound, shape=a_shape)
        self.lora_b = mx.zeros(b_shape)

    def set_trainable(self, flag: bool) -> None:
        """Freeze or unfreeze this adapter's own arrays (it has no parametrised children).

        Module.freeze() walks the whole subtree (~10 us); the server switches adapters
        on hundreds of layers per request, so the frozen-key set is edited directly.
        """
        no_grad = getattr(self, "_no_grad", None)
        if no_grad is None:  # an MLX without the private set: the slow, public way
            self.unfreeze() if flag else self.freeze()
        elif flag:
            no_grad.clear()
        else:
            no_grad.update(self.param_keys)

    def delta(self) -> mx.array:
        """The dense update s * B A as an (out, in) float32 matrix."""
        return self.scale * (self.lora_b.T.astype(mx.float32) @ self.lora_a.T.astype(mx.float32))

    def __call__(self, x: mx.array, y: mx.array, base: nn.Module) -> mx.array:
        z = (self.dropout(x) @ self.lora_a) @ self.lora_b
        return y + (self.scale * z).astype(y.dtype)

    def fused_weight(self, w0: mx.array) -> mx.array:
        return w0 + self.delta()


class DoRAAdapter(LoRAAdapter):
    """LoRA plus a learned magnitude ``m`` (out,) over the row-normalised direction."""

    kind = "dora"
    param_keys = ("lora_a", "lora_b", "m")

    def __init__(self, in_dims: int, out_dims: int, rank: int = 8, alpha: float = 16.0,
                 dropout: float = 0.0, use_rslora: bool = False, w0: mx.array | None = None):
        super().__init__(in_dims, out_dims, rank, alpha, dropout, use_rslora)
        self.m = mx.linalg.norm(w0, axis=1) if w0 is not None else mx.ones((out_dims,))

    def __call__(self, x: mx.array, y: mx.array, base: nn.Module) -> mx.array:
        bias = base.get("bias") if isinstance(base, nn.Module) else None
        if bias is not None:
            y = y - bias  # the direction is normalised without the bias
        w0 = quant.dense_weight(base)
        z = (self.dropout(x) @ self.lora_a) @ self.lora_b
        out = y + (self.scale * z).astype(y.dtype)
        # The norm is a constant for the backward pass (DoRA section 4.3).
        denom = mx.stop_gradient(mx.linalg.norm(w0 + self.delta(), axis=1))
        out = (self.m / denom).astype(y.dtype) * out
        return out + bias if bias is not None else out

    def fused_weight(self, w0: mx.array) -> mx.array:
        w = w0 + self.delta()
        return (self.m / mx.linalg.norm(w, axis=1))[:, None] * w


ADAPTER_KINDS: dict[str, type[LoRAAdapter]] = {"lora": LoRAAdapter, "dora": DoRAAdapter}


class LoRALinear(nn.Module):
    """A frozen linear base plus named low-rank adapters; ``active`` picks one.

    ``y = base(x)`` when ``active`` is None or ``enabled`` is False, otherwise the
    active adapter's update is added (LoRA) or applied (DoRA), see the module docstring.
    """

    accepts = staticmethod(is_linear_like)  # the base layers this wrapper can adapt

    def __init__(self, base: nn.Module):
        super().__init__()
        if not self.accepts(base):
            raise TypeError(f"{type(base).__name__} is not a linear layer mlx_tune can adapt")
        self.base = base
        self.base.freeze()
        self.adapters: dict[str, LoRAAdapter] = {}
        self.active: str | None = None
        self.enabled = True
        # Adapters applied under the active one whatever ``enabled`` says: a frozen
        # reference (preference.reference) that the trained adapter stacks on.
        self.frozen: tuple[str, ...] = ()

    @classmethod
    def from_base(cls, layer: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                  use_rslora: bool = False, use_dora: bool = False, name: str = "default") -> LoRALinear:
        """Wrap ``layer`` (or add to it, if it already is a wrapper) with a fresh adapter ``name``."""
        wrapper = layer if isinstance(layer, LoRALinear) else cls(layer)
        wrapper.add_adapter(name, rank, alpha, dropout, use_rslora, use_dora=use_dora or cls is DoRALinear)
        wrapper.set_active(name)
        return wrapper

    @property
    def dims(self) -> tuple[int, int]:
        return linear_dims(self.base)

    def add_adapter(self, name: str, rank: int, alpha: float, dropout: float = 0.0,
                    use_rslora: bool = False, use_dora: bool = False) -> LoRAAdapter:
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        out_dims, in_dims = self.dims
        extra = {"w0": quant.dense_weight(self.base)} if use_dora else {}  # lazy: free if overwritten by a load
        adapter = ADAPTER_KINDS["dora" if use_dora else "lora"](in_dims, out_dims, rank, alpha, dropout, use_rslora, **extra)
        adapter.train(self.training)  # follow the model's train/eval mode (dropout)
        adapter.set_trainable(False)
        self.adapters[name] = adapter
        return adapter

    def remove_adapter(self, name: str) -> None:
        self.adapters.pop(name, None)
        if self.active == name:
            self.active = None

    def set_active(self, name: str | None) -> None:
        """Select the adapter used by ``__call__`` (None: base only); only it is trainable."""
        self.active = name
        for key, adapter in self.adapters.items():
            adapter.set_trainable(key == name)

    @property
    def adapter(self) -> LoRAAdapter | None:
        """The adapter applied in ``__call__`` right now, or None."""
        if not self.enabled or self.active is None:
            return None
        return self.adapters.get(self.active)

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        for name in self.frozen:
            y = self.adapters[name](x, y, self.base)
        adapter = self.adapter
        return y if adapter is None else adapter(x, y, self.base)

    def fuse(self, dequantize: bool = False) -> nn.Module:
        """A plain layer computing what this one computes now (active adapter merged).

        ``dequantize=False`` keeps the base's storage (re-quantizing a quantized base);
        ``dequantize=True`` returns an ``nn.Linear``.
        """
        def dense(weight: mx.array, bias: mx.array | None) -> nn.Module:
            out_dims, in_dims = weight.shape
            fused = nn.Linear(in_dims, out_dims, bias=bias is not None)
            fused.weight = weight.astype(_dense_dtype(self.base))
            if bias is not None:
                fused.bias = bias
            return fused

        return fuse_base(self.base, self.adapter, dequantize, dense)


def fuse_base(base: nn.Module, adapter, dequantize: bool,
              dense: Callable[[mx.array, mx.array | None], nn.Module]) -> nn.Module:
    """``base`` with ``adapter``'s delta merged into its weight (None: no adapter), in the
    base's storage (re-quantized where it is quantized), or as ``dense(weight, bias)``."""
    bias = base.get("bias")
    if adapter is None and not dequantize:
        return base
    weight = quant.dense_weight(base)
    if adapter is not None:
        weight = adapter.fused_weight(weight)
    if dequantize:
        return dense(weight, bias)
    return quant.requantize_like(base, weight, bias)


class DoRALinear(LoRALinear):
    """``LoRALinear`` whose ``from_base`` creates DoRA adapters (same interface)."""


def set_active(model: nn.Module, name: str | None) -> int:
    """Activate adapter ``name`` (None: none) on every wrapper of ``model``; returns how many have it."""
    count = 0
    for _, module in model.named_modules():
        if isinstance(module, LoRALinear):
            module.set_active(name)
            count += name in module.adapters
    return count
