"""Rows on different LoRA adapters in one forward pass: a per-row adapter index.

For a batch whose row ``i`` asks for adapter ``a(i)`` (or none, the base alone), every
adapted layer computes

    y_i = W0 x_i + b + [a(i) != none] * s_a(i) * B_a(i) A_a(i) x_i

as ``y + sum_k where(index == k, s_k B_k A_k x, 0)`` over the adapters present in the
batch: the base matmul is shared by all rows, and each present adapter adds one rank-r
product (cheap next to the base) masked to its rows. DoRA adapters rescale the base
output and are not mixed (the engine gives them a batch of their own).

How it plugs in, without copying mlx-lm's generator: ``RowRouter`` is the model handed to
``mlx_lm.generate.BatchGenerator``; before each forward pass it learns which requests
the rows are (``uids`` of the calling batch, which a small shim on mlx-lm's two batch
classes records) and writes the slot index into a ``RowRoute`` shared by a pseudo
adapter (``RowMixAdapter``) registered on every ``LoRALinear`` under the name ``ROUTE``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

ROUTE = "__rows__"


class RowRoute:
    """What the current forward pass mixes: per-row slot index and slot -> adapter name."""

    def __init__(self):
        self.index: mx.array | None = None
        self.slots: list[tuple[int, str]] = []
        self.most_mixed = 0  # most distinct choices (adapters, base) seen in one pass


class _Ref:
    """Holds a reference outside the module tree (a Module attribute would become a child)."""

    def __init__(self, value):
        self.value = value


class RowMixAdapter(nn.Module):
    """The pseudo adapter a ``LoRALinear`` uses while rows are mixed (see module docstring)."""

    kind = "rows"

    def __init__(self, route: RowRoute, adapters: dict):
        super().__init__()
        self._route = _Ref(route)
        self._adapters = _Ref(adapters)

    def set_trainable(self, flag: bool) -> None:  # nothing to train
        pass

    def __call__(self, x: mx.array, y: mx.array, base: nn.Module) -> mx.array:
        route = self._route.value
        adapters = self._adapters.value
        out = y
        for slot, name in route.slots:
            adapter = adapters.get(name)
            if adapter is None:  # this adapter leaves this layer alone
                continue
            z = adapter.scale * ((x @ adapter.lora_a) @ adapter.lora_b)
            mask = (route.index == slot).reshape((-1,) + (1,) * (y.ndim - 1))
            out = out + mx.where(mask, z, 0).astype(y.dtype)
        return out


def install(wrappers, route: RowRoute) -> None:
    """Give every wrapper the pseudo adapter (idempotent) and make it the active one."""
    for w in wrappers:
        if ROUTE not in w.adapters:
            w.adapters[ROUTE] = RowMixAdapter(route, w.adapters)
        w.active = ROUTE


def mixable(wrappers, name: str | None) -> bool:
    """Whether rows on adapter ``name`` can share a pass (the base and plain LoRA can)."""
    if name is None:
        return True
    held = [w.adapters[name] for w in wrappers if name in w.adapters]
    return all(a.kind == "lora" and getattr(a, "mixable", True) for a in held)


class RowRouter:
    """The model as ``BatchGenerator`` sees it: sets the row index, then runs the model."""

    def __init__(self, model: nn.Module, route: RowRoute, adapter_of: Callable[[int], str | None]):
        self._model = model
        self._route = route
        self._adapter_of = adapter_of
        self.rows: list[int] = []

    def __call__(self, inputs, *args, **kwargs):
        names = [self._adapter_of(uid) for uid in self.rows]
        if len(names) != inputs.shape[0]:
            raise RuntimeError(f"row routing lost track: {len(names)} request ids for {inputs.shape[0]} rows")
        present = sorted({n for n in names if n is not None})
        slot = {n: k for k, n in enumerate(present)}
        self._route.slots = list(enumerate(present))
        self._route.most_mixed = max(self._route.most_mixed, len(set(names)))
        self._route.index = mx.array([slot.get(n, -1) for n in names], dtype=mx.int32)
        return self._model(inputs, *args, **kwargs)

    def __getattr__(self, name):  # layers, make_cache, args, ...: the model's own
        return getattr(self._model, name)


@functools.cache
def install_row_shim() -> bool:
    """Record the calling batch's request ids on a ``RowRouter`` before each forward pass.

    mlx-lm calls the model in exactly two places: ``GenerationBatch._step`` and
    ``PromptProcessingBatch.prompt``; in both, ``self.uids`` lists the rows of the
    input. The shim does nothing for any other model. Returns False (and mixing stays
    off) when this mlx-lm lays its batches out differently.
    """
    import importlib

    g = importlib.import_module("mlx_lm.generate")  # ``mlx_lm.generate`` is also a function

    gen_cls, prompt_cls = getattr(g, "GenerationBatch", None), getattr(g, "PromptProcessingBatch", None)
    if not (callable(getattr(gen_cls, "_step", None)) and callable(getattr(prompt_cls, "prompt", None))):
        return False

    def recording(method):
        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            if isinstance(self.model, RowRouter):
                self.model.rows = list(self.uids)
            return method(self, *args, **kwargs)

        wrapper._mlx_tune_shim = True
        return wrapper

    for cls, name in ((gen_cls, "_step"), (prompt_cls, "prompt")):
        if not getattr(getattr(cls, name), "_mlx_tune_shim", False):
            setattr(cls, name, recording(getattr(cls, name)))
    return True
