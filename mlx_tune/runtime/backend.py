"""The one backend decision: which kernel path mlx_tune takes.

MLX runs on Metal (Apple silicon), CUDA or its CPU backend. Two code paths follow:

- ``cpu``: quantized matmuls run as dequantize + fp32 sgemm (OpenBLAS beats MLX's CPU
  ``quantized_matmul`` by far), models compute in float32, attention runs block-causal
  on two CPU streams, the loss keeps a dense fp32 head.
- ``accelerator``: ``mx.quantized_matmul`` layers, float16 compute at load, fused
  attention and a head used without dequantizing, as on Metal and CUDA.

By default the path follows MLX's default device. ``MLX_TUNE_KERNELS=accelerator``
forces the accelerator path on any device (so the code a Mac runs is exercised on a
Linux CPU, slowly but for real: ``make test-accelerator``); ``MLX_TUNE_KERNELS=cpu``
forces the CPU path. Every module asks here; nothing else looks at the device.
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Iterator
from typing import Literal

import mlx.core as mx

from mlx_tune.errors import UserError
from mlx_tune.runtime import scheduling

ENV = "MLX_TUNE_KERNELS"
KERNEL_PATHS = ("cpu", "accelerator")
KernelPath = Literal["cpu", "accelerator"]


def device_backend() -> str:
    """The hardware MLX computes on: ``metal``, ``cuda`` or ``cpu``."""
    if mx.default_device().type == mx.DeviceType.cpu:
        return "cpu"
    if getattr(mx, "cuda", None) is not None and mx.cuda.is_available():
        return "cuda"
    return "metal"


def forced_path() -> KernelPath | None:
    """The path ``MLX_TUNE_KERNELS`` asks for, or None when it is unset or empty."""
    value = os.environ.get(ENV, "").strip().lower()
    if not value:
        return None
    if value not in KERNEL_PATHS:
        raise UserError(f"{ENV}={os.environ[ENV]!r}: expected one of {', '.join(KERNEL_PATHS)} (or unset: by device)")
    return value  # type: ignore[return-value]


def kernel_path() -> KernelPath:
    """``cpu`` or ``accelerator``: the override if set, else by MLX's default device."""
    return forced_path() or ("cpu" if device_backend() == "cpu" else "accelerator")


def on_cpu() -> bool:
    """True when the CPU path runs (dequantize + sgemm, float32 compute)."""
    return kernel_path() == "cpu"


def compute_dtype() -> mx.Dtype:
    """The dtype models compute in after loading: float32 on the CPU path (MLX's CPU
    half-precision matmul is slow), float16 on the accelerator path."""
    return mx.float32 if on_cpu() else mx.float16


def planning_backend() -> str:
    """The backend the memory planner models by default: the device's, except that a
    forced path wins (``accelerator`` on a CPU plans the Metal path it runs)."""
    forced = forced_path()
    device = device_backend()
    if forced == "cpu":
        return "cpu"
    if forced == "accelerator" and device == "cpu":
        return "metal"
    if device == "cpu" and platform.system() == "Darwin" and platform.machine() == "arm64":
        return "metal"  # a Mac whose default device was set to the CPU still trains on Metal
    return device


_streams: list = []


def cpu_streams(n: int) -> list:
    """``n`` CPU streams, created once and reused (two chunks of work in flight overlap
    OpenBLAS with MLX's own element-wise work)."""
    while len(_streams) < n:
        _streams.append(mx.new_stream(mx.cpu))
    return _streams[:n]


LANES_ENV = "MLX_TUNE_ROW_LANES"


def row_lanes(wanted: int, world: int = 1, assume_wide: bool = False) -> int:
    """How many CPU streams a training step deals its rows over (``training.lanes``):
    ``wanted`` on MLX's CPU device, at most one per core, in a single process, where MLX's
    scheduling is wide (``runtime.scheduling``); ``MLX_TUNE_ROW_LANES`` overrides. Else 1:
    a GPU runs a batch's rows in one kernel, the ranks of a data-parallel run share the
    cores, and at MLX's default width the lanes ran slower than one stream (demo config,
    174 against 242 tokens/s). ``assume_wide``: the answer once the width is set."""
    if device_backend() != "cpu" or world > 1:
        return 1
    forced = os.environ.get(LANES_ENV, "").strip()
    if forced:
        if not forced.isdigit() or int(forced) < 1:
            raise UserError(f"{LANES_ENV}={forced!r}: expected a whole number of CPU streams, 1 or more (1: no lanes)")
        wanted = int(forced)
    elif not (assume_wide or scheduling.wide()):
        return 1  # at MLX's narrow default the lanes barely overlap, and single-threaded BLAS loses
    return max(1, min(wanted, os.cpu_count() or 1))


_in_lane = False


@contextlib.contextmanager
def row_lane(stream) -> Iterator[None]:
    """Build the ops of the block on ``stream`` (None: the default stream), as one of the
    row lanes of a training step (``training.lanes``). Inside a lane, code that would
    deal its own work over CPU streams (the block-causal attention) keeps to the lane:
    the lanes already fill the cores."""
    global _in_lane
    before, _in_lane = _in_lane, True
    try:
        with mx.stream(stream) if stream is not None else contextlib.nullcontext():
            yield
    finally:
        _in_lane = before


def in_row_lane() -> bool:
    """True while a row lane's ops are being built (``row_lane``)."""
    return _in_lane


def keep_freed_buffers(share: float = 0.25) -> None:
    """On MLX's CPU device, let its allocator keep freed buffers for reuse, up to ``share``
    of the system's memory. MLX's CPU default keeps 32 MB, so a training step's big
    activations go back to the C library and every step faults fresh pages in (the kernel
    zeroing them): a LoRA step of SmolLM2-135M on 4 x 512 tokens ran 23 s instead of 29.
    MLX's Metal allocator keeps up to its memory limit by default; the CPU allocator never
    gives cached buffers back under pressure, hence the smaller share. Peak MLX (active)
    memory is unchanged; the process's resident size includes the cached buffers."""
    if device_backend() != "cpu":
        return
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    mx.set_cache_limit(int(total * share))
