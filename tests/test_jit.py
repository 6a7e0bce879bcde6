"""MLX's CPU JIT with vector flags (runtime.jit): the wrapper, the stale-kernel sweep, a real build."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_tune.runtime import jit

ROOT = Path(__file__).resolve().parent.parent


def test_cpu_flags_read_from_cpuinfo():
    assert jit.cpu_has_flags("processor: 0\nflags\t\t: fpu sse2 avx2 fma f16c bmi2\n")
    assert not jit.cpu_has_flags("processor: 0\nflags\t\t: fpu sse2 avx2 f16c\n")  # no fma
    assert not jit.cpu_has_flags("")


def test_wrapper_adds_the_flags_and_marks_the_library(tmp_path):
    bin_dir = jit.install_wrapper(tmp_path, "/usr/bin/g++")
    text = (bin_dir / "g++").read_text()
    assert os.access(bin_dir / "g++", os.X_OK)
    assert jit.FLAGS in text and f"-Wl,-soname,{jit.MARK}" in text and '"$@"' in text
    mtime = (bin_dir / "g++").stat().st_mtime_ns
    jit.install_wrapper(tmp_path, "/usr/bin/g++")  # unchanged: not rewritten
    assert (bin_dir / "g++").stat().st_mtime_ns == mtime
    jit.install_wrapper(tmp_path, "/usr/bin/g++", tmp_path / "pch")  # the precompiled preamble first
    assert f'-I "{tmp_path / "pch"}" "$@"' in (bin_dir / "g++").read_text()


def test_unmarked_kernels_are_dropped_marked_ones_kept(tmp_path):
    (tmp_path / "libA_contiguous.so").write_bytes(b"\x7fELF plain kernel")
    (tmp_path / "libB_contiguous.so").write_bytes(b"\x7fELF ... " + jit.MARK.encode() + b" ...")
    (tmp_path / "A_contiguous.cpp").write_text("source")
    assert jit.drop_unmarked(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["A_contiguous.cpp", "libB_contiguous.so"]
    assert jit.drop_unmarked(tmp_path / "missing") == 0


def test_opt_out_and_no_compiler_leave_path_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv(jit.OPT_OUT, "1")
    path = os.environ["PATH"]
    assert jit.enable() is False and os.environ["PATH"] == path
    monkeypatch.delenv(jit.OPT_OUT)
    monkeypatch.setattr(jit, "cpu_has_flags", lambda: True)
    monkeypatch.setattr(jit.shutil, "which", lambda name: None)
    assert jit.enable() is False and os.environ["PATH"] == path


@pytest.mark.skipif(not jit.cpu_has_flags() or shutil.which("g++") is None, reason="needs x86-64 AVX2/FMA and g++")
def test_a_real_compiled_kernel_is_built_with_the_flags_and_is_right(tmp_path):
    """In a fresh process (its own cache and temp folders): a stale plain kernel is swept,
    the preamble is precompiled, the fused kernel MLX builds carries the mark, and its exp
    equals numpy's."""
    import mlx.core as mx

    kernels = tmp_path / "tmp" / "mlx" / mx.__version__ / "cpu"
    kernels.mkdir(parents=True)
    (kernels / "libStale_contiguous.so").write_bytes(b"plain")
    code = (
        "import json, numpy as np\n"
        "from mlx_tune.runtime.blas import ensure_fast_blas\n"
        "ensure_fast_blas()\n"
        "import mlx.core as mx\n"
        "x = mx.linspace(-30, 30, 10007)\n"
        "y = mx.compile(lambda a: mx.exp(a * 0.5 - 1.0))(x)\n"
        "ref = np.exp(np.array(x, dtype=np.float64) * 0.5 - 1.0)\n"
        "print(json.dumps({'rel': float(np.max(np.abs(np.array(y) - ref) / ref))}))\n"
    )
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "TMPDIR": str(tmp_path / "tmp")}
    env.pop("MLX_TUNE_BLAS_REEXEC", None)
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if "jit-bin" not in p)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["rel"] < 1e-5
    assert not (kernels / "libStale_contiguous.so").exists()
    built = list(kernels.glob("lib*.so"))
    assert built and all(jit.MARK.encode() in p.read_bytes() for p in built)
    wrapper = (tmp_path / "cache" / "mlx_tune" / "jit-bin" / "g++").read_text()
    pch = tmp_path / "cache" / "mlx_tune" / "jit-pch" / mx.__version__
    assert (pch / (jit.PREAMBLE + ".gch")).is_file() and str(pch) in wrapper
