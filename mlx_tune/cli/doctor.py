"""``mlx-tune doctor``: what MLX runs on here and whether it runs fast."""

from __future__ import annotations

import argparse
import json
import sys

from mlx_tune.runtime.doctor import system_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    info = system_report()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    blas = info["blas"]
    print(f"backend         {info['backend']} ({info['default_device']}) on {info['platform']}, "
          f"{info['kernel_path']} kernel path")
    print(f"fp32 matmul     {info['fp32_matmul_gflops']} GFLOP/s ({'fast' if blas['fast'] else 'SLOW'})")
    if sys.platform.startswith("linux"):
        print(f"OpenBLAS        {'loaded' if blas['openblas_loaded'] else 'not loaded'}"
              f" (found: {blas['openblas_found'] or 'no'}; sgemm from {blas['sgemm_from']})")
        if not blas["openblas_found"]:
            print("                install it: sudo apt-get install libopenblas0-pthread (about 50x faster fp32 matmul)")
        print(f"CPU JIT flags   {info['jit_vector_flags'] or 'none (scalar fused kernels; needs g++ and an AVX2/FMA CPU)'}")
    if info["row_lanes"] > 1:
        print(f"row lanes       {info['row_lanes']} CPU streams per SFT step (MLX_TUNE_ROW_LANES=1 turns them off)")
    mem = info["memory_gb"]
    print(f"memory          {mem.get('system_total', '?')} GB total, {mem.get('system_available', '?')} GB available")
    v = info["versions"]
    print(f"versions        mlx_tune {v['mlx_tune']}, mlx {v['mlx']}, mlx-lm {v['mlx-lm']}, python {v['python']}")
    return 0
