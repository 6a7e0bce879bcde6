"""The real entry points: console script, doctor, scripts' usage errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300, **kw)


def test_doctor_reports_backend_blas_and_versions():
    r = run(sys.executable, "-m", "mlx_tune", "doctor", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["backend"] in ("cpu", "metal", "cuda")
    assert info["fp32_matmul_gflops"] > 0
    assert info["versions"]["mlx"] and info["versions"]["mlx-lm"]
    if sys.platform.startswith("linux") and info["blas"]["openblas_found"]:
        assert info["blas"]["openblas_loaded"], "the console entry point must preload OpenBLAS"
    assert info["row_lanes"] >= 1


def test_help_and_unknown_config_errors_are_one_line(tmp_path):
    r = run(sys.executable, "-m", "mlx_tune", "--help")
    assert r.returncode == 0 and "doctor" in r.stdout
    r = run(str(ROOT / "train_by_mlx.sh"))
    assert r.returncode == 2 and "usage" in r.stderr


def test_generate_with_tiny_model(tiny_folder):
    r = run(sys.executable, "-m", "mlx_tune", "generate", "--model", str(tiny_folder), "--prompt", "hi", "--max-tokens", "4")
    assert r.returncode == 0, r.stderr
    assert "loaded folder model" in r.stdout
    r = run(sys.executable, "-m", "mlx_tune", "generate", "--model", "/nonexistent/x", "--prompt", "hi")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "no such file" in r.stderr
