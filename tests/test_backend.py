"""The one backend decision (``runtime.backend``) and what follows from it at load time,
in the planner and in the CLI. Run in both modes: ``make test`` (by device: the CPU path
here) and ``make test-accelerator`` (MLX_TUNE_KERNELS=accelerator)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from gguf import GGMLQuantizationType as T

from mlx_tune.config import QuantizeConfig
from mlx_tune.errors import UserError
from mlx_tune.model.loading import load_model
from mlx_tune.model.quant import CPUQuantizedLinear, prepare_for_backend
from mlx_tune.planning.arch import arch_from_config
from mlx_tune.planning.planner import Settings, plan
from mlx_tune.runtime import backend
from mlx_tune.testing.gguf_files import write_family_gguf
from mlx_tune.testing.tiny import save_tiny_folder, tiny_config

pytestmark = pytest.mark.accelerator
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("value,path", [("accelerator", "accelerator"), ("cpu", "cpu"), (" Accelerator ", "accelerator")])
def test_override_decides_the_path(monkeypatch, value, path):
    monkeypatch.setenv(backend.ENV, value)
    assert backend.kernel_path() == path
    assert backend.on_cpu() == (path == "cpu")
    assert backend.compute_dtype() == (mx.float32 if path == "cpu" else mx.float16)


def test_unset_follows_the_device(monkeypatch):
    monkeypatch.delenv(backend.ENV, raising=False)
    assert backend.kernel_path() == ("cpu" if backend.device_backend() == "cpu" else "accelerator")
    monkeypatch.setenv(backend.ENV, "")
    assert backend.forced_path() is None


def test_a_bad_value_is_one_clear_line(monkeypatch):
    monkeypatch.setenv(backend.ENV, "gpu")
    with pytest.raises(UserError, match=r"MLX_TUNE_KERNELS='gpu': expected one of cpu, accelerator"):
        backend.kernel_path()
    env = {**os.environ, backend.ENV: "gpu"}
    r = subprocess.run([sys.executable, "-m", "mlx_tune", "doctor"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "MLX_TUNE_KERNELS" in r.stderr and not r.stdout


def test_planner_models_the_path_that_runs(monkeypatch):
    monkeypatch.setenv(backend.ENV, "accelerator")
    forced = backend.planning_backend()
    assert forced in ("metal", "cuda")
    monkeypatch.setenv(backend.ENV, "cpu")
    assert backend.planning_backend() == "cpu"
    # The accelerator path keeps no dense fp32 copy of a block or of the head.
    arch = arch_from_config(tiny_config("llama", hidden_size=512, num_hidden_layers=4, intermediate_size=1408,
                                        num_attention_heads=8, num_key_value_heads=4, vocab_size=8192))
    cpu = plan(arch, Settings(batch_size=1, seq_len=512, backend="cpu"))
    metal = plan(arch, Settings(batch_size=1, seq_len=512, backend="metal"))
    assert any("CPU path" in k for k in cpu.parts) and not any("CPU path" in k for k in metal.parts)
    # (the CPU path still needs no more in total here: its block-causal attention keeps half the scores)


def test_plan_command_takes_the_metal_backend(tmp_path):
    folder = save_tiny_folder(tmp_path / "m", "llama")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {folder}\ndata: {tmp_path}\ntrain: {{iters: 1}}\n")
    r = subprocess.run([sys.executable, "-m", "mlx_tune", "plan", str(cfg), "--backend", "metal"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "backend metal" in r.stdout and "CPU path" not in r.stdout


@pytest.mark.parametrize("qtype", [T.Q8_0, T.F16])
def test_loading_follows_the_path(tmp_path, qtype):
    """What a Mac gets when it loads a GGUF file: float16 compute and MLX's quantized layers;
    the CPU path gets float32 and the dequantize + sgemm layers. (A Hugging Face folder keeps
    its own dtype on both paths.)"""
    path = write_family_gguf(tmp_path / "m.gguf", "llama", types={"weight": qtype})
    model, _, _ = load_model(path, QuantizeConfig(bits=4, group_size=64))
    swapped = prepare_for_backend(model)  # as training, fuse and the server do after loading
    assert swapped == (15 if backend.on_cpu() else 0)
    q = model.layers[0].self_attn.q_proj
    norm = model.layers[0].input_layernorm.weight
    if backend.on_cpu():
        assert type(q) is CPUQuantizedLinear and norm.dtype == mx.float32
    else:
        assert type(q) is nn.QuantizedLinear and norm.dtype == mx.float16
    out = model(mx.array([[1, 2, 3, 4]]))
    assert out.shape[-1] == tiny_config("llama")["vocab_size"] and bool(mx.isfinite(out).all())


def test_both_paths_train_the_same_qlora_run(tmp_path, tiny_folder):
    """The same 4-bit QLoRA run through ``mlx-tune train`` on each kernel path: dequantize +
    sgemm (CPU) and ``mx.quantized_matmul`` (Metal/CUDA) give the same losses, step for step,
    within float32 tolerance (both compute in float32 here: the folder is float32; measured 1.6e-7 relative)."""
    from tests.train_workspace import env, losses, train_cmd, workspace

    curves = {}
    for path in ("cpu", "accelerator"):
        cfg = workspace(tmp_path, tiny_folder, f"out_{path}", iters=6, save_every=100)
        e = {**env(), backend.ENV: path}
        r = subprocess.run([*train_cmd(cfg, "quantize.bits=4", "quantize.group_size=32")], env=e, cwd=ROOT,
                           capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, (r.stdout + r.stderr)[-2000:]
        curves[path] = losses(tmp_path / f"out_{path}" / "metrics.jsonl")
    assert sorted(curves["cpu"]) == sorted(curves["accelerator"]) == list(range(1, 7))
    for step, value in curves["cpu"].items():
        assert abs(value - curves["accelerator"][step]) <= 1e-5 * abs(value), (step, curves)  # seen: 1.6e-7
