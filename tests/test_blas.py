"""The test process itself runs MLX's fp32 matmul through OpenBLAS on Linux."""

import sys

import mlx.core as mx
import pytest

from mlx_tune.runtime.blas import (
    THREAD_TIMEOUT,
    THREAD_TIMEOUT_ENV,
    find_openblas,
    openblas_loaded,
    preload_env,
    sgemm_provider,
)
from tests.needs import missing


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OpenBLAS preload is a Linux matter")
def test_fp32_matmul_is_computed_by_openblas():
    if find_openblas() is None:
        missing("libopenblas0-pthread is not installed (make setup installs it where apt-get is allowed)")
    a = mx.random.normal((1024, 1024))
    mx.eval(a @ a)
    assert openblas_loaded()
    assert "openblas" in (sgemm_provider() or ""), f"cblas_sgemm resolves to {sgemm_provider()}"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OpenBLAS preload is a Linux matter")
def test_preload_tells_openblas_workers_to_sleep_and_keeps_a_users_value():
    if find_openblas() is None:
        missing("libopenblas0-pthread is not installed (make setup installs it where apt-get is allowed)")
    base = {"PATH": "/usr/bin"}
    env = preload_env(base)
    assert find_openblas() in env["LD_PRELOAD"]
    assert env[THREAD_TIMEOUT_ENV] == THREAD_TIMEOUT
    assert preload_env({**base, THREAD_TIMEOUT_ENV: "20"})[THREAD_TIMEOUT_ENV] == "20"
    assert THREAD_TIMEOUT_ENV not in preload_env({**base, "MLX_TUNE_NO_OPENBLAS": "1"})
