"""Vector instructions for MLX's CPU JIT kernels on x86-64 Linux.

Under ``mx.compile`` MLX's CPU backend fuses element-wise work into C++ kernels it
builds at run time with ``g++ -std=c++17 -O3 ...`` and caches in
``<tmp>/mlx/<version>/cpu``. It adds ``-mavx2 -mfma -mf16c`` only when MLX itself was
built with AVX2, which the PyPI Linux wheel is not, so every fused ``exp`` runs one
element at a time and each of its six ``std::fma`` becomes a call into libm: ~25 ns
per element, 15% of a LoRA step's CPU samples. With the flags GCC vectorises those
loops (a fused ``exp`` over 100M floats: 2.7 s -> 1.0 s here).

``enable()`` puts a ``g++`` wrapper first on this process's PATH (MLX runs the compiler
through ``popen``, so children inherit it too) that adds the flags when the CPU has
them, and drops cached kernels built without them, so they are rebuilt once. The
wrapper names every library it builds (its soname, ``MARK``): one without it came
from a plain build. Results are the same up to float rounding (fused
multiply-adds), which upstream MLX accepts on its AVX2 builds. The wrapper also gives
GCC a precompiled copy of the header every kernel includes (``build_pch``): a kernel
builds in ~0.3 s instead of ~1.4 s, which is most of a cold first run (``tests/test_losses.py``
with an empty kernel cache: 88 s, 17 s warm).

Opt out with ``MLX_TUNE_NO_JIT_FLAGS=1``. Nothing changes on macOS, Arm, without
``g++``, or on a CPU without AVX2/FMA/F16C.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

OPT_OUT = "MLX_TUNE_NO_JIT_FLAGS"
FLAGS = "-mavx2 -mfma -mf16c"
MARK = "libmlx-tune-avx2.so"  # the soname of every kernel the wrapper builds
_CPU_FLAGS = ("avx2", "fma", "f16c")
PREAMBLE = "mlx/backend/cpu/compiled_preamble.h"  # what every kernel's source includes
PCH_OPTIONS = "-std=c++17 -O3 -Wall -fPIC"  # MLX's own options for its kernels (jit_compiler.cpp)


def cpu_has_flags(cpuinfo: str | None = None) -> bool:
    """True when /proc/cpuinfo lists AVX2, FMA and F16C (x86-64 Linux only)."""
    if cpuinfo is None:
        if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "AMD64"):
            return False
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return all(f in flags for f in _CPU_FLAGS)


def cache_root() -> Path:
    """Where mlx_tune keeps the wrapper: ``$XDG_CACHE_HOME/mlx_tune`` (``~/.cache/mlx_tune``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mlx_tune"


def mlx_kernel_dir(version: str) -> Path:
    """MLX's CPU kernel cache: ``std::filesystem::temp_directory_path() / mlx / version / cpu``
    (libstdc++ reads TMPDIR, TMP, TEMP, TEMPDIR in that order, else /tmp)."""
    tmp = next((os.environ[k] for k in ("TMPDIR", "TMP", "TEMP", "TEMPDIR") if os.environ.get(k)), "/tmp")
    return Path(tmp) / "mlx" / version / "cpu"


def wrapper_text(compiler: str, pch_dir: Path | None = None) -> str:
    # MLX builds into a temporary library name and renames it, so the mark travels
    # inside the library: its soname. The precompiled preamble's folder goes first on
    # the include path: GCC takes a .gch found there for the header MLX includes.
    pch = f' -I "{pch_dir}"' if pch_dir is not None else ""
    return (
        "#!/bin/sh\n"
        "# mlx_tune (mlx_tune/runtime/jit.py): MLX's CPU JIT with vector instructions.\n"
        f'exec "{compiler}" {FLAGS} -Wl,-soname,{MARK}{pch} "$@"\n'
    )


def install_wrapper(root: Path, compiler: str, pch_dir: Path | None = None) -> Path:
    """Write the ``g++`` wrapper under ``root/jit-bin`` (atomically, only when it changed); its folder."""
    bin_dir = root / "jit-bin"
    target = bin_dir / "g++"
    text = wrapper_text(compiler, pch_dir)
    if not (target.is_file() and target.read_text() == text and os.access(target, os.X_OK)):
        bin_dir.mkdir(parents=True, exist_ok=True)
        tmp = bin_dir / f".g++.{os.getpid()}"
        tmp.write_text(text)
        tmp.chmod(0o755)
        os.replace(tmp, target)
    return bin_dir


def mlx_include() -> Path | None:
    """The headers the MLX wheel ships (``mlx/include``), found without importing mlx."""
    import importlib.util

    spec = importlib.util.find_spec("mlx")
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        if (Path(loc) / "include" / PREAMBLE).is_file():
            return Path(loc) / "include"
    return None


def build_pch(root: Path, compiler: str, include: Path, version: str) -> Path | None:
    """Precompile MLX's kernel preamble once per MLX version (~3 s): every kernel then
    builds in ~0.3 s instead of ~1.4 s, most of which was parsing that header. Returns
    the folder to put first on the include path, or None (kernels then parse the header
    as before). Same options as the kernels' build, or GCC ignores the .gch."""
    pch_dir = root / "jit-pch" / version
    gch = pch_dir / (PREAMBLE + ".gch")
    if gch.is_file():
        return pch_dir
    gch.parent.mkdir(parents=True, exist_ok=True)
    tmp = gch.with_name(f".{gch.name}.{os.getpid()}")
    cmd = [compiler, *PCH_OPTIONS.split(), *FLAGS.split(), "-I", str(include), "-x", "c++-header",
           str(include / PREAMBLE), "-o", str(tmp)]
    try:
        done = subprocess.run(cmd, capture_output=True, timeout=300)
        if done.returncode != 0 or not tmp.is_file():
            return None
        os.replace(tmp, gch)
    except (OSError, subprocess.SubprocessError):
        return None
    finally:
        tmp.unlink(missing_ok=True)
    return pch_dir


def drop_unmarked(kernel_dir: Path) -> int:
    """Delete cached kernels built without the flags (no mark beside them); how many.
    MLX rebuilds a missing kernel on its next use."""
    dropped = 0
    if not kernel_dir.is_dir():
        return 0
    for lib in kernel_dir.glob("lib*.so"):
        try:
            if MARK.encode() not in lib.read_bytes():
                lib.unlink()
                dropped += 1
        except OSError:
            pass  # another user's kernel: left as it is (still correct, only slower)
    return dropped


def active() -> bool:
    """Whether this process's PATH starts MLX's compiler through the wrapper (``enable``)."""
    return str(cache_root() / "jit-bin") in os.environ.get("PATH", "").split(os.pathsep)


def enable(mlx_version: str | None = None) -> bool:
    """Put the flag-adding ``g++`` first on PATH for this process; True when it applies.
    Call before MLX builds its first kernel (entry points: ``blas.ensure_fast_blas``)."""
    if os.environ.get(OPT_OUT) == "1" or not cpu_has_flags():
        return False
    if active():
        return True  # a parent did it (its children inherit PATH)
    root = cache_root()
    compiler = shutil.which("g++")
    if compiler is None:
        return False
    if mlx_version is None:
        mlx_version = _mlx_version()
    include = mlx_include()
    try:
        pch = build_pch(root, compiler, include, mlx_version) if include and mlx_version else None
        install_wrapper(root, compiler, pch)
    except OSError:
        return False  # read-only home: plain kernels, still correct
    if mlx_version:
        drop_unmarked(mlx_kernel_dir(mlx_version))
    bin_dir, path = str(root / "jit-bin"), os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([bin_dir, path]) if path else bin_dir
    return True


def _mlx_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("mlx")
    except metadata.PackageNotFoundError:
        return None
