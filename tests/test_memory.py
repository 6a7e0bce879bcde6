"""The memory planner: prediction vs a real measured step, config sources, `mlx-tune plan`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from mlx_tune.errors import UserError
from mlx_tune.planning.arch import arch_from_config, read_source_config
from mlx_tune.planning.planner import GB, Settings, fits, plan, plan_config
from mlx_tune.runtime.backend import planning_backend

# Backend-sensitive: `make test-accelerator` runs this file on the Metal/CUDA code path too.
pytestmark = pytest.mark.accelerator

ROOT = Path(__file__).resolve().parent.parent
# A medium-small llama (about 20 M weights): big enough that activations, not MLX's
# fixed buffers, make up the peak, small enough that one step takes about a second.
MEDIUM = dict(hidden_size=512, num_hidden_layers=4, intermediate_size=1408, num_attention_heads=8,
              num_key_value_heads=4, head_dim=64, vocab_size=8192)
# The same widths as an MoE (qwen3_moe: 8 experts of width 384, 2 per token, every block sparse).
MEDIUM_MOE = dict(MEDIUM, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=384, decoder_sparse_step=1,
                  mlp_only_layers=[], norm_topk_prob=True)


@pytest.fixture(scope="module")
def medium_model():
    import mlx.core as mx

    from mlx_tune.adapters import inject
    from mlx_tune.config import LoraConfig, QuantizeConfig
    from mlx_tune.model.quantize import quantize_model
    from mlx_tune.testing.tiny import tiny_model

    model = tiny_model("llama", **MEDIUM)
    quantize_model(model, QuantizeConfig(bits=4, group_size=64))
    inject(model, LoraConfig(rank=16))
    mx.eval(model.parameters())
    return model


def measure_trainer_step(grad_checkpoint: bool, seq_len: int, model_type: str = "llama") -> int:
    """MLX peak of the real training step, in a fresh process (other tests' arrays would count)."""
    code = (f"from tests.test_memory import _measure_here; "
            f"print(_measure_here({grad_checkpoint}, {seq_len}, {model_type!r}))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-2000:]
    return int(r.stdout.split()[-1])


def _measure_here(grad_checkpoint: bool, seq_len: int, model_type: str = "llama") -> int:
    """MLX peak of the real training step (trainer.Step, the loss `mlx-tune train` uses)."""
    import mlx.core as mx
    import mlx.optimizers as optim

    from mlx_tune import adapters
    from mlx_tune.config import LoraConfig, QuantizeConfig
    from mlx_tune.model.quantize import quantize_model
    from mlx_tune.testing.tiny import tiny_model
    from mlx_tune.training import loop as trainer
    from mlx_tune.training import recompute
    from mlx_tune.training.losses import batch_loss

    model = tiny_model(model_type, **(MEDIUM_MOE if model_type == "qwen3_moe" else MEDIUM))
    quantize_model(model, QuantizeConfig(bits=4, group_size=64))
    adapters.inject(model, LoraConfig(rank=16))
    if grad_checkpoint:
        recompute.grad_checkpoint(model)
    mx.eval(model.parameters())
    step = trainer.Step(model, optim.AdamW(1e-4), batch_loss)
    ids = mx.random.randint(0, MEDIUM["vocab_size"], (1, seq_len + 1))
    arrays = {"inputs": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": mx.ones((1, seq_len))}
    for _ in range(2):  # the second step has the optimizer state in place
        mx.reset_peak_memory()
        loss, ntoks, grads, _, _ = step.finish(*step.accumulate(arrays, None))
        step.apply(grads)
        mx.eval(step.state, loss)
        assert loss.item() == loss.item() and loss.item() > 0  # a real, finite step
    return mx.get_peak_memory()


@pytest.mark.parametrize("grad_checkpoint", [True, False])
def test_prediction_within_15_percent_of_the_real_training_step(grad_checkpoint):
    from mlx_tune.testing.tiny import tiny_config

    measured = measure_trainer_step(grad_checkpoint, 256)
    p = plan(arch_from_config(tiny_config("llama", **MEDIUM)),
             Settings(batch_size=1, seq_len=256, grad_checkpoint=grad_checkpoint, backend=planning_backend()))
    print(f"grad_checkpoint={grad_checkpoint}: measured {measured / 2**20:.1f} MiB, predicted {p.mlx_peak / 2**20:.1f} MiB")
    assert 0.85 <= measured / p.mlx_peak <= 1.15, (measured, p.mlx_peak, p.parts)


@pytest.mark.slow
def test_moe_prediction_within_15_percent_of_the_real_training_step(grad_checkpoint=True):
    """qwen3_moe, experts quantized and adapted (one LoRA per expert), at 256 tokens (measured
    without checkpointing too when written: 1.04 of the plan)."""
    from mlx_tune.testing.tiny import tiny_config

    measured = measure_trainer_step(grad_checkpoint, 256, "qwen3_moe")
    p = plan(arch_from_config(tiny_config("qwen3_moe", **MEDIUM_MOE)),
             Settings(batch_size=1, seq_len=256, grad_checkpoint=grad_checkpoint, backend=planning_backend()))
    assert p.arch.moe_layers == 4 and any("one LoRA per expert" in n for n in p.notes)
    assert 0.85 <= measured / p.mlx_peak <= 1.15, (measured, p.mlx_peak, p.parts)


# Published totals (the Gemma 3 4B+ repos' language model only: mlx-lm drops the vision tower).
PUBLISHED = {
    "google/gemma-3-270m": 0.268e9, "google/gemma-3-1b-it": 1.0e9, "google/gemma-3-4b-it": 3.88e9,
    "google/gemma-3-12b-it": 11.77e9, "google/gemma-3-27b-it": 27.0e9, "Qwen/Qwen3-0.6B": 0.6e9,
    "Qwen/Qwen3-1.7B": 1.72e9, "Qwen/Qwen3-4B": 4.02e9, "Qwen/Qwen3-8B": 8.19e9, "Qwen/Qwen3-14B": 14.77e9,
    "Qwen/Qwen3-32B": 32.76e9, "Qwen/Qwen3-30B-A3B": 30.53e9, "meta-llama/Llama-3.2-1B-Instruct": 1.24e9,
    "meta-llama/Llama-3.2-3B-Instruct": 3.21e9, "microsoft/phi-4": 14.66e9,
    "mistralai/Mistral-Small-24B-Instruct-2501": 23.57e9, "openai/gpt-oss-20b": 20.91e9,
    "HuggingFaceTB/SmolLM3-3B": 3.08e9,
}


def test_published_configs_plan_offline_and_build_in_mlx_lm(monkeypatch):
    from mlx_lm.utils import _get_classes

    from mlx_tune.config import config_from_dict
    from mlx_tune.model.known_configs import KNOWN_CONFIGS

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for repo, params in PUBLISHED.items():
        model_class, args_class = _get_classes(KNOWN_CONFIGS[repo])
        args_class.from_dict(KNOWN_CONFIGS[repo])  # the keys mlx-lm's classes read are there
        cfg = config_from_dict({"model": repo, "train": {"iters": 1, "batch_size": 1, "max_seq_length": 2048,
                                                        "grad_checkpoint": True}})
        p = plan_config(cfg, backend="cpu")
        assert p.origin == "built-in published values" and abs(p.arch.params() - params) / params < 0.02, repo
    moe = plan_config(config_from_dict({"model": "Qwen/Qwen3-30B-A3B", "train": {"iters": 1}}), backend="cpu")
    assert moe.arch.num_experts == 128 and moe.arch.moe_layers == 48 and 3.2e9 < moe.arch.active_params() < 3.5e9
    no_experts = plan_config(config_from_dict({"model": "Qwen/Qwen3-30B-A3B", "train": {"iters": 1},
                                               "lora": {"include_experts": False}}), backend="cpu")
    # 48 blocks x 128 experts x 3 stacks x r (in + out) LoRA weights, fp32, 4 copies
    expert_lora = 48 * 128 * 16 * (2 * (2048 + 768) + (768 + 2048)) * 4 * 4
    got = moe.parts["LoRA params + grads + AdamW"] - no_experts.parts["LoRA params + grads + AdamW"]
    assert abs(got - expert_lora) < 1e3
    gemma = plan_config(config_from_dict({"model": "google/gemma-3-12b-it", "train": {"iters": 1,
                                                                                   "max_seq_length": 4096}}))
    assert gemma.arch.sliding_layers == 40 and any("1024-token window" in n for n in gemma.notes)


def test_checkpointing_saves_memory_and_the_planner_sees_it(medium_model):
    from mlx_tune.planning.probe import measure_steps
    from mlx_tune.testing.tiny import tiny_config

    arch = arch_from_config(tiny_config("llama", **MEDIUM))
    s = Settings(batch_size=1, seq_len=512, backend=planning_backend())
    on = measure_steps(medium_model, 1, 512, grad_checkpoint=True, steps=1).peak_bytes
    off = measure_steps(medium_model, 1, 512, grad_checkpoint=False, steps=1).peak_bytes
    p_on, p_off = plan(arch, s).mlx_peak, plan(arch, replace(s, grad_checkpoint=False)).mlx_peak
    assert on < off and p_on < p_off
    assert abs((off - on) - (p_off - p_on)) <= 0.3 * (off - on)  # the saving itself is predicted


def test_reads_an_hf_folder(tmp_path):
    from mlx_tune.testing.tiny import save_tiny_folder, tiny_config

    folder = save_tiny_folder(tmp_path / "m")
    src = read_source_config(str(folder))
    assert src.origin == "folder" and src.config["hidden_size"] == tiny_config()["hidden_size"]
    arch = arch_from_config(src.config)
    assert arch.layers == 2 and arch.tied and arch.head_dim == 16


def test_reads_a_gguf_header(smollm2_path):
    src = read_source_config(str(smollm2_path))
    arch = arch_from_config(src.config)
    assert (arch.layers, arch.hidden, arch.heads, arch.kv_heads, arch.vocab) == (30, 576, 9, 3, 49152)
    assert arch.tied and src.quantization == {"bits": 4, "group_size": 32}
    assert 0.12e9 < arch.params() < 0.15e9


def test_known_7b_configs_plan_offline_under_24_gb(monkeypatch):
    from mlx_tune.config import config_from_dict

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for repo, params in [("mistralai/Mistral-7B-Instruct-v0.3", 7.25e9), ("meta-llama/Llama-3.1-8B-Instruct", 8.03e9),
                         ("Qwen/Qwen2.5-7B-Instruct", 7.6e9)]:
        cfg = config_from_dict({"model": repo, "quantize": {"bits": 4, "group_size": 64},
                                "train": {"iters": 1, "batch_size": 2, "max_seq_length": 2048, "grad_checkpoint": True}})
        p = plan_config(cfg, backend="cpu")
        assert abs(p.arch.params() - params) / params < 0.02, (repo, p.arch.params())
        assert p.total < 24 * GB, (repo, p.parts)
        # 4-bit g64 with 16-bit scales and biases: 4.5 bits per weight.
        assert abs(p.parts["base weights"] / p.arch.params() - 4.5 / 8) < 0.01


def test_unknown_hub_id_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="cannot read its config.json"):
        read_source_config("nobody-here/no-such-model-xyz")


def test_fits_is_the_largest_that_fits():
    from mlx_tune.model.known_configs import KNOWN_CONFIGS

    arch = arch_from_config(KNOWN_CONFIGS["meta-llama/Llama-3.1-8B-Instruct"])
    s = Settings(batch_size=1, seq_len=2048)
    budget = 16 * GB
    f = fits(arch, s, budget)
    assert plan(arch, replace(s, batch_size=f["max_batch_size"])).total <= budget
    assert plan(arch, replace(s, batch_size=f["max_batch_size"] + 1)).total > budget
    assert plan(arch, replace(s, seq_len=f["max_seq_len"])).total <= budget
    assert plan(arch, replace(s, seq_len=f["max_seq_len"] + 64)).total > budget


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "mlx_tune", "plan", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})}, timeout=120)


def test_plan_command_prints_a_breakdown(tmp_path):
    from mlx_tune.testing.tiny import save_tiny_folder

    folder = save_tiny_folder(tmp_path / "m")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {folder}\nquantize: null\ntrain: {{iters: 5, max_seq_length: 128}}\n")
    r = _cli(str(cfg), "train.batch_size=2", "--budget-gb", "4")
    assert r.returncode == 0, r.stderr
    for word in ("base weights", "LoRA params", "MLX peak", "total", "budget", "largest"):
        assert word in r.stdout
    r = _cli(str(cfg), "--json")
    out = json.loads(r.stdout)
    assert out["settings"]["batch_size"] == 4 and out["fits"] in (True, False) and out["max_seq_len"] > 0


def test_plan_command_bad_config_is_one_line(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model: /no/such/folder\ntrain: {iters: 5}\n")
    r = _cli(str(cfg))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "no such model folder" in r.stderr
    cfg.write_text("model: x/y\ntrain: {iterz: 5}\n")
    r = _cli(str(cfg))
    assert r.returncode == 2 and "train.iterz" in r.stderr and "Traceback" not in r.stderr


def test_repo_configs_predicted_within_their_memory_limit(monkeypatch):
    """Each example config's plan fits its own train.memory_limit_gb (24 GB for the 7B ones,
    16 for Qwen3-14B, 31 for Qwen3-32B)."""
    from mlx_tune.config import load_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    found = [p for p in sorted((ROOT / "configs").glob("*.yaml")) if p.name != "demo.yaml"]
    if not found:
        pytest.skip("no example configs in configs/")
    for path in found:
        cfg = load_config(path)
        p = plan_config(cfg, backend="cpu")
        assert p.total < (cfg.train.memory_limit_gb or 24) * GB, (path.name, p.total / GB)


@pytest.mark.slow
def test_flash_attention_prediction_within_15_percent_at_2048_rows():
    """From attention_shapes.FLASH_MIN_LENGTH rows no T x T probabilities are kept (measured
    316 MiB against 440 MiB with them, MLX 0.32 CPU); the planner's blockwise working set follows."""
    from mlx_tune.model import attention_shapes
    from mlx_tune.testing.tiny import tiny_config

    L = attention_shapes.FLASH_MIN_LENGTH
    measured = measure_trainer_step(True, L)
    p = plan(arch_from_config(tiny_config("llama", **MEDIUM)),
             Settings(batch_size=1, seq_len=L, grad_checkpoint=True, backend=planning_backend()))
    assert any("query rows at a time" in n for n in p.notes) or planning_backend() == "cuda"
    assert 0.85 <= measured / p.mlx_peak <= 1.15, (measured, p.mlx_peak, p.parts)
