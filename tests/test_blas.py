"""The test process itself runs MLX's fp32 matmul through OpenBLAS on Linux."""

import sys

import mlx.core as mx
import pytest

from mlx_tune.runtime.blas import find_openblas, openblas_loaded, sgemm_provider
from tests.needs import missing


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OpenBLAS preload is a Linux matter")
def test_fp32_matmul_is_computed_by_openblas():
    if find_openblas() is None:
        missing("libopenblas0-pthread is not installed (make setup installs it where apt-get is allowed)")
    a = mx.random.normal((1024, 1024))
    mx.eval(a @ a)
    assert openblas_loaded()
    assert "openblas" in (sgemm_provider() or ""), f"cblas_sgemm resolves to {sgemm_provider()}"
