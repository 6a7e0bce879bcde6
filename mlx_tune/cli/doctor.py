"""``mlx-tune doctor``: what MLX runs on here and whether it runs fast."""

from __future__ import annotations

import argparse
import json
import platform
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def collect() -> dict:
    import time
    from importlib.metadata import PackageNotFoundError, version

    import mlx.core as mx

    from mlx_tune import __version__
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
    metal = mx.metal.is_available()
    cuda = getattr(mx, "cuda", None) is not None and mx.cuda.is_available()
    info = {
        "backend": "metal" if metal else "cuda" if cuda else "cpu",
        "default_device": str(mx.default_device()),
        "fp32_matmul_gflops": round(gflops, 1),
        "blas": {
            "openblas_found": find_openblas(),
            "openblas_loaded": openblas_loaded(),
            "sgemm_from": sgemm_provider(),
            "fast": gflops > 50 or metal or cuda,
        },
        "memory_gb": _memory_gb(),
        "versions": {"mlx_tune": __version__, "mlx": pkg("mlx"), "mlx-lm": pkg("mlx-lm"), "python": platform.python_version()},
        "platform": f"{platform.system()} {platform.machine()}",
    }
    if metal:
        info["memory_gb"]["metal_recommended_working_set"] = round(
            mx.metal.device_info().get("max_recommended_working_set_size", 0) / 2**30, 1
        )
    return info


def _memory_gb() -> dict:
    out = {}
    try:
        import os

        out["system_total"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
        out["system_available"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    return out


def run(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    blas = info["blas"]
    print(f"backend         {info['backend']} ({info['default_device']}) on {info['platform']}")
    print(f"fp32 matmul     {info['fp32_matmul_gflops']} GFLOP/s ({'fast' if blas['fast'] else 'SLOW'})")
    if sys.platform.startswith("linux"):
        print(f"OpenBLAS        {'loaded' if blas['openblas_loaded'] else 'not loaded'}"
              f" (found: {blas['openblas_found'] or 'no'}; sgemm from {blas['sgemm_from']})")
        if not blas["openblas_found"]:
            print("                install it: sudo apt-get install libopenblas0-pthread (about 50x faster fp32 matmul)")
    mem = info["memory_gb"]
    print(f"memory          {mem.get('system_total', '?')} GB total, {mem.get('system_available', '?')} GB available")
    v = info["versions"]
    print(f"versions        mlx_tune {v['mlx_tune']}, mlx {v['mlx']}, mlx-lm {v['mlx-lm']}, python {v['python']}")
    return 0
