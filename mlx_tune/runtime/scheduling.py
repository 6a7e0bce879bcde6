"""MLX's graph scheduling width on a CPU-only Linux MLX, set at process start.

MLX turns a graph into a dispatch order breadth-first up to ``MLX_BFS_MAX_WIDTH``
pending nodes (default 20), depth-first beyond, and its dispatching thread waits while
a stream has too much work queued. A training step's row lanes (``training.lanes``) are
two independent halves of the graph on two CPU streams: at width 20 the order holds long
runs of one lane, the other lane's thread starves, and the second core idles. Measured
on 4 x 512 text rows of SmolLM2-135M (LoRA on every linear): one lane 11.2 s a step; two
lanes 10.2 s at width 20 or 200, 8.0 s at 1000 (8.2 s at 100000); one lane at 1000, 11.0 s.
Peak MLX memory was the same at every width there (3.93 GB).

Not everywhere: the wide order also starts work early that the memory-bounded paths
keep back. With gradient checkpointing a tiny model's step peaked 25% above the
planner's figure (one recomputed block at a time), and at 2048-token rows (the flash
kernel's query blocks) 45% above. So the width is set only for a training run that has
lanes and neither of those paths (``training.lanes.wide_scheduling``): ``mlx-tune
train`` asks before anything loads, since MLX reads the variable once, at its first
evaluation. Only where MLX has no GPU backend (Linux without an ``mlx-cuda`` wheel):
Metal and CUDA order their command buffers by it. A value the user set wins.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping
from importlib import metadata

WIDTH_ENV, WIDTH = "MLX_BFS_MAX_WIDTH", "1000"
_GPU_WHEELS = ("mlx-cuda", "mlx-cuda-12", "mlx-cuda-13", "mlx-metal")


def cpu_only_mlx() -> bool:
    """True on Linux when no GPU build of MLX is installed (MLX computes on the CPU)."""
    if not sys.platform.startswith("linux"):
        return False
    for name in _GPU_WHEELS:
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        return False
    return True


def wide(env: MutableMapping[str, str] | None = None) -> bool:
    """True when the width set for MLX is at least ours (what row lanes need)."""
    value = (os.environ if env is None else env).get(WIDTH_ENV, "").strip()
    return value.isdigit() and int(value) >= int(WIDTH)


def enable(env: MutableMapping[str, str] | None = None) -> bool:
    """Set the width in ``env`` (default: this process's environment) where it applies;
    True when the width in force is ours or the user's (not MLX's default)."""
    if env is None:
        env = os.environ
    if env.get(WIDTH_ENV, "").strip():  # the user's own (an empty value counts as unset)
        return True
    if not cpu_only_mlx():
        return False
    env[WIDTH_ENV] = WIDTH
    return True
