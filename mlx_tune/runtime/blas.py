"""Fast BLAS on Linux: run MLX's CPU backend with Debian's OpenBLAS preloaded.

MLX's Linux CPU wheel links a reference BLAS (~6 GFLOP/s for fp32 matmul). Preloading
OpenBLAS makes the dynamic linker resolve ``cblas_sgemm`` to it (~340 GFLOP/s, same
results). A preload only works from process start, so Python entry points re-exec
themselves once with ``LD_PRELOAD`` set; shell entry points export it directly.

OpenBLAS's idle worker threads spin (``sched_yield`` in a loop) for 2^28 cycles after
each call before sleeping. Between the sgemms of a training step MLX runs its own
element-wise work (and two CPU streams in attention), so on two cores those spinners
take the cores MLX needs: ~12% of a LoRA step's CPU samples were ``sched_yield``.
``OPENBLAS_THREAD_TIMEOUT`` (log2 of the spin cycles, 4..30) is set with the preload
so workers sleep at once; a user's own value wins. Large sgemms are unaffected
(one wake-up per call), small ones run single-threaded anyway.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Iterator
from pathlib import Path

OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib64/libopenblas.so.0",
)
# Set by the re-exec so a failed preload can never loop.
_GUARD = "MLX_TUNE_BLAS_REEXEC"
# Users can opt out (for example to compare against the reference BLAS).
_OPT_OUT = "MLX_TUNE_NO_OPENBLAS"
# Read once when OpenBLAS starts, so it travels with the preload (scripts/with_blas too).
THREAD_TIMEOUT_ENV, THREAD_TIMEOUT = "OPENBLAS_THREAD_TIMEOUT", "4"


def find_openblas() -> str | None:
    """Path of a pthread OpenBLAS shared library, or None (always None off Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    override = os.environ.get("MLX_TUNE_OPENBLAS")
    if override and Path(override).is_file():
        return override
    return next((p for p in OPENBLAS_CANDIDATES if Path(p).is_file()), None)


def openblas_loaded() -> bool:
    """True when an OpenBLAS library is mapped into this process."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    return "libopenblas" in maps


def sgemm_provider() -> str | None:
    """The shared object that ``cblas_sgemm`` resolves to in this process (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        addr = ctypes.cast(ctypes.CDLL(None).cblas_sgemm, ctypes.c_void_p).value
    except (AttributeError, OSError):
        return None
    if addr is None:
        return None
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split()
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if lo <= addr < hi and len(parts) >= 6:
            return parts[5]
    return None


def preload_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of ``env`` with OpenBLAS added to LD_PRELOAD where it applies (and its
    worker threads told to sleep rather than spin between calls)."""
    env = dict(os.environ if env is None else env)
    lib = find_openblas()
    if lib and env.get(_OPT_OUT) != "1" and lib not in env.get("LD_PRELOAD", ""):
        env["LD_PRELOAD"] = ":".join(filter(None, [lib, env.get("LD_PRELOAD")]))
        env.setdefault(THREAD_TIMEOUT_ENV, THREAD_TIMEOUT)
    return env


def ensure_fast_blas(argv: list[str] | None = None) -> None:
    """Re-exec the current Python command with OpenBLAS preloaded, once, if needed.

    Call it first thing in an entry point, before anything imports mlx. It returns
    without doing anything on macOS, when OpenBLAS is absent or already loaded, when
    the user opted out, or after one re-exec. It also gives MLX's CPU JIT its vector
    flags (``runtime.jit``), which needs no re-exec.
    """
    from mlx_tune.runtime import jit

    jit.enable()
    if find_openblas() is None or os.environ.get(_OPT_OUT) == "1":
        return
    if os.environ.get(_GUARD) == "1" or openblas_loaded():
        return
    env = preload_env()
    env[_GUARD] = "1"
    args = list(sys.argv if argv is None else argv)
    if getattr(sys, "orig_argv", None) and argv is None:
        # Keeps "-m package" and interpreter flags exactly as the user ran them.
        args = list(sys.orig_argv)[1:]
    try:
        os.execve(sys.executable, [sys.executable, *args], env)
    except OSError:
        return  # Slow BLAS is still correct; `mlx-tune doctor` will say so.


@functools.lru_cache(maxsize=1)
def _openblas():
    """The process's OpenBLAS (ctypes), or None where ``cblas_sgemm`` is not OpenBLAS's.
    Looked up once: a preload is fixed at process start, and a step asks every micro-batch."""
    if not openblas_loaded():
        return None
    import ctypes

    lib = ctypes.CDLL(None)
    if not hasattr(lib, "openblas_set_num_threads") or not hasattr(lib, "openblas_get_num_threads"):
        return None
    return lib


@contextlib.contextmanager
def blas_threads(n: int) -> Iterator[bool]:
    """OpenBLAS's thread count set to ``n`` inside the block, restored after it; yields
    whether it applied (False without OpenBLAS). The count is read at every call, so it
    bounds the sgemms that MLX's stream threads run while the block is open: two streams
    each running a single-threaded sgemm keep both cores busy (``training.lanes``)."""
    lib = _openblas()
    if lib is None:
        yield False
        return
    before = int(lib.openblas_get_num_threads())
    lib.openblas_set_num_threads(n)
    try:
        yield True
    finally:
        lib.openblas_set_num_threads(before)
