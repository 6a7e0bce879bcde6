"""What MLX runs on here and whether it runs fast: the facts ``mlx-tune doctor`` prints."""

from __future__ import annotations

import platform


def system_report() -> dict:
    """Backend, kernel path, fp32 matmul speed, BLAS, memory and versions (``mlx-tune doctor``)."""
    import time
    from importlib.metadata import PackageNotFoundError, version

    import mlx.core as mx

    from mlx_tune import __version__
    from mlx_tune.runtime import backend
    from mlx_tune.runtime.blas import find_openblas, openblas_loaded, sgemm_provider

    def pkg(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    n = 1024
    a = mx.random.normal((n, n))
    mx.eval(a @ a)  # warm-up: first call pays for allocation
    reps = 5
    t = time.perf_counter()
    for _ in range(reps):
        mx.eval(a @ a)
    gflops = 2 * n**3 * reps / (time.perf_counter() - t) / 1e9
    device = backend.device_backend()
    metal, cuda = device == "metal", device == "cuda"
    info = {
        "backend": device,
        "kernel_path": backend.kernel_path(),
        "default_device": str(mx.default_device()),
        "fp32_matmul_gflops": round(gflops, 1),
        "blas": {
            "openblas_found": find_openblas(),
            "openblas_loaded": openblas_loaded(),
            "sgemm_from": sgemm_provider(),
            "fast": gflops > 50 or metal or cuda,
        },
        "jit_vector_flags": _jit_flags(),
        "row_lanes": _row_lanes(),
        "memory_gb": _memory_gb(),
        "versions": {"mlx_tune": __version__, "mlx": pkg("mlx"), "mlx-lm": pkg("mlx-lm"), "python": platform.python_version()},
        "platform": f"{platform.system()} {platform.machine()}",
    }
    if metal:
        memory: dict = info["memory_gb"]  # type: ignore[assignment]
        memory["metal_recommended_working_set"] = round(
            int(mx.metal.device_info().get("max_recommended_working_set_size", 0)) / 2**30, 1
        )
    return info


def _jit_flags() -> str | None:
    """The flags MLX's CPU JIT gets from ``runtime.jit`` here, or None (not applied)."""
    from mlx_tune.runtime import jit

    return jit.FLAGS if jit.active() else None


def _row_lanes() -> int:
    """CPU streams an SFT step of ``mlx-tune train`` deals its rows over here (``training.lanes``;
    it sets MLX's scheduling width for them)."""
    from mlx_tune.runtime import backend
    from mlx_tune.training import lanes

    return backend.row_lanes(lanes.ROW_LANES, assume_wide=True)


def _memory_gb() -> dict:
    out = {}
    try:
        import os

        out["system_total"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
        out["system_available"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    return out
