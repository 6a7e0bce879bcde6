"""Full and partial fine-tuning (train.finetune: full, train.trainable), end to end on tiny models."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_tune.config import load_config
from mlx_tune.errors import UserError
from mlx_tune.testing.tiny import save_tiny_folder, tiny_model

sys.path.insert(0, str(Path(__file__).parent))
from train_workspace import ROOT, env, losses, workspace  # noqa: E402


def _bf16_folder(path: Path) -> Path:
    """A tiny dense model stored in bfloat16 (so training keeps fp32 masters)."""
    folder = save_tiny_folder(path)
    weights = mx.load(str(folder / "model.safetensors"))
    mx.save_safetensors(str(folder / "model.safetensors"), {k: v.astype(mx.bfloat16) for k, v in weights.items()},
                        metadata={"format": "mlx"})
    return folder


def _train(config: Path, *overrides: str, log=lambda msg: None):
    from mlx_tune.training.run import run_train

    return run_train(load_config(config, list(overrides)), log=log)


def _weights(folder: Path) -> dict[str, mx.array]:
    out: dict[str, mx.array] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(mx.load(str(f)))
    return out


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("full")
    source = _bf16_folder(tmp / "tiny-bf16")
    config = workspace(tmp, source, "out", finetune="full", iters=12, learning_rate=1e-3, keep_checkpoints=5)
    result = _train(config)
    return {"tmp": tmp, "source": source, "config": config, "result": result, "out": tmp / "out"}


def test_full_finetune_lowers_the_loss_and_changes_every_weight(full_run):
    out = full_run["out"] / "model"
    assert not (full_run["out"] / "adapters.safetensors").exists()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "mlx_tune_training.json"):
        assert (out / name).is_file(), name
    assert "im_start" in (out / "tokenizer_config.json").read_text() + "".join(
        p.read_text() for p in out.glob("*.jinja"))  # the chat template travels
    loss = losses(full_run["out"] / "metrics.jsonl")
    assert loss[max(loss)] < loss[1] - 0.5
    before, after = _weights(full_run["source"]), _weights(out)
    assert set(before) == set(after)
    for k in before:
        assert after[k].dtype == mx.bfloat16, k  # written back in the source dtype
        assert not mx.array_equal(before[k], after[k]).item(), f"{k} did not change"
    masters = mx.load(str(full_run["out"] / "checkpoints" / "step_000012" / "adapter.safetensors"))
    assert set(masters) == set(before) and all(v.dtype == mx.float32 for v in masters.values())  # fp32 masters
    meta = json.loads((out / "mlx_tune_training.json").read_text())
    assert meta["finetune"] == "full" and meta["step"] == 12


def test_full_output_serves_through_the_config(full_run):
    import httpx
    from server_util import serve_in_thread

    from mlx_tune.cli import serve as serve_cli
    from mlx_tune.model.loading import load_model
    from mlx_tune.server import build_app

    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    settings = serve_cli.settings(parser.parse_args([str(full_run["config"])]))
    assert settings.source == str(full_run["out"] / "model") and not settings.adapters
    model, tokenizer, info = load_model(settings.source, settings.quantize)
    app, _, _ = build_app(model, tokenizer, info, max_queue=4, max_batch=2)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        r = client.post("/v1/chat/completions", json={
            "model": "base", "messages": [{"role": "user", "content": "What is 2 plus 3?"}],
            "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] > 0


@pytest.mark.slow
def test_convert_and_serve_exports_the_full_model_as_gguf(full_run):
    target = full_run["tmp"] / "gguf-out"
    r = subprocess.run(["bash", str(ROOT / "convert_and_serve.sh"), str(full_run["config"]), "--no-serve",
                        "fuse.format=gguf", "fuse.gguf_type=f16", f"fused_dir={target}"],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "nothing to merge" in r.stdout
    report = json.loads((target / "fuse_report.json").read_text())
    assert report["finetune"] == "full" and report["ok"], report
    assert report["output_vs_trained"]["top1_agreement"] > 0.95
    assert (target / "model-f16.gguf").is_file() and (target / "Modelfile").is_file()


def test_full_resume_after_an_interruption_is_exact(full_run, tmp_path):
    """Resuming from step 5 of the run (later checkpoints and outputs removed) gives the same
    per-step losses and the same final weights."""
    resumed = tmp_path / "resumed"
    shutil.copytree(full_run["out"], resumed)
    for p in (resumed / "checkpoints").iterdir():
        if p.name != "step_000005":
            shutil.rmtree(p)
    shutil.rmtree(resumed / "model")
    said: list[str] = []
    _train(full_run["config"], f"output_dir={resumed}", "train.resume=true", log=said.append)
    assert any("resumed from" in m and "step_000005" in m for m in said), said
    want, got = losses(full_run["out"] / "metrics.jsonl"), losses(resumed / "metrics.jsonl")
    assert sorted(got) == sorted(want) == list(range(1, 13))
    for step in range(6, 13):
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), step
    a, b = _weights(full_run["out"] / "model"), _weights(resumed / "model")
    for k in a:
        assert mx.array_equal(a[k], b[k]).item(), k


def test_partial_finetune_changes_only_the_matching_modules(tmp_path, tiny_folder):
    """With gradient checkpointing and eval prompts answered by the model being trained."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "What is 1 plus 2?"}],
                                   "expected": "3", "match": "contains"}) + "\n")
    config = workspace(tmp_path, tiny_folder, "part", finetune="full", iters=4, learning_rate=1e-2,
                       trainable=["model.embed_tokens", r".*norm"], grad_checkpoint=True)
    _train(config, f"eval.prompts={prompts}", "eval.every=2", "eval.max_tokens=4")
    rows = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_accuracy" in r] == [0, 2, 4]
    before, after = _weights(tiny_folder), _weights(tmp_path / "part" / "model")
    changed = {k for k in before if not mx.array_equal(before[k], after[k]).item()}
    expected = {k for k in before if k.startswith("model.embed_tokens.") or k.endswith("norm.weight")}
    assert changed == expected and len(expected) == 6  # embedding (tied head) + 2 x 2 block norms + final norm


def test_lora_with_trainable_modules_saves_loads_and_fuses_them(tmp_path, tiny_folder):
    from mlx_tune.adapters import load_adapter
    from mlx_tune.cli import main
    from mlx_tune.model.loading import load_model

    config = workspace(tmp_path, tiny_folder, "lt", iters=4, learning_rate=1e-2, trainable=[r".*norm"])
    _train(config)
    out = tmp_path / "lt"
    saved = mx.load(str(out / "adapters.safetensors"))
    listed = json.loads((out / "adapter_config.json").read_text())["trained_weights"]
    norms = sorted(k for k in _weights(tiny_folder) if k.endswith("norm.weight"))
    assert listed == norms and all(k in saved for k in norms)
    base = _weights(tiny_folder)
    assert all(not mx.array_equal(saved[k], base[k]).item() for k in norms)  # they trained

    model, _, _ = load_model(str(tiny_folder))
    load_adapter(model, out)
    params = dict(tree_flatten(model.parameters()))
    for k in norms:
        assert mx.array_equal(params[k], saved[k]).item(), k

    from mlx_tune.adapters import export_peft, import_peft

    peft = export_peft(out, tmp_path / "peft")
    peft_cfg = json.loads((peft / "adapter_config.json").read_text())
    assert peft_cfg["modules_to_save"] == ["input_layernorm", "norm", "post_attention_layernorm"]
    assert mx.array_equal(mx.load(str(peft / "adapter_model.safetensors"))["base_model.model.model.norm.weight"],
                          saved["model.norm.weight"]).item()
    back = import_peft(peft, tmp_path / "back")
    assert json.loads((back / "adapter_config.json").read_text())["trained_weights"] == norms
    again = mx.load(str(back / "adapters.safetensors"))
    assert set(again) == set(saved) and all(mx.array_equal(again[k], saved[k]).item() for k in saved)

    fused = tmp_path / "fused"
    assert main(["fuse", str(config), "fuse.format=hf", "fuse.dtype=float32", "--out", str(fused)]) == 0
    written = _weights(fused)
    for k in norms:
        assert mx.array_equal(written[k], saved[k]).item(), k


def test_trainable_regex_matching_nothing_lists_real_paths():
    from mlx_tune.adapters.trainable import match_modules

    model = tiny_model()
    with pytest.raises(UserError) as e:
        match_modules(model, ["model.embeddings"])
    msg = str(e.value)
    assert "'model.embeddings' matches no module path" in msg and "model.embed_tokens" in msg
    assert "model.layers.0" in msg and "\n" not in msg
    assert match_modules(model, ["model.layers.1", r"model\.layers\.1\..*"]) == ["model.layers.1"]


def test_lora_trainable_on_an_adapted_layer_is_refused(tmp_path, tiny_folder):
    config = workspace(tmp_path, tiny_folder, "bad", iters=2, trainable=[r"model\.layers\.0\.self_attn\.q_proj"])
    with pytest.raises(UserError, match="holds the LoRA layer"):
        _train(config)


def test_full_on_a_quantized_base_is_one_line_through_the_cli(tmp_path, tiny_folder):
    config = workspace(tmp_path, tiny_folder, "q", finetune="full")
    text = config.read_text().replace("quantize: null\n", "")  # the default: 4-bit
    config.write_text(text)
    r = subprocess.run(["bash", str(ROOT / "train_by_mlx.sh"), str(config)], cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "quantize: null" in err[0] and "train.finetune: full" in err[0], r.stderr


def test_full_on_a_quantized_source_needs_dequantize(tmp_path, tiny_folder):
    """A quantized source: a one-line error naming train.dequantize, which then trains dense weights."""
    from mlx_tune.config import QuantizeConfig
    from mlx_tune.model.loading import load_model
    from mlx_tune.training import full

    model, _, info = load_model(str(tiny_folder), QuantizeConfig())  # stands for a 4-bit source folder
    cfg = load_config(workspace(tmp_path, tiny_folder, "qs", finetune="full"), [])
    with pytest.raises(UserError, match="train.dequantize: true") as e:
        full.prepare(model, info, cfg)
    assert "\n" not in str(e.value)
    dense, _, dinfo = load_model(str(tiny_folder), None, dequantize=True)
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in dense.named_modules())
    setup = full.prepare(dense, dinfo, cfg)
    assert "trainable%: 100.0000" in setup.summary


def test_full_gradient_with_a_tied_embedding_matches_plain_autodiff():
    """The tied embedding gets both gradients (lookup and head) through the chunked loss."""
    from mlx_tune.training.losses import full_loss_reference, loss_fn

    model = tiny_model()
    model.unfreeze()
    rng = np.random.default_rng(0)
    inputs = mx.array(rng.integers(3, 250, size=(2, 16)))
    targets = mx.array(rng.integers(3, 250, size=(2, 16)))
    mask = mx.array((rng.random((2, 16)) > 0.3).astype(np.float32))
    _, g = nn.value_and_grad(model, lambda m: loss_fn(m, inputs, targets, mask, chunk=7)[0])(model)
    _, want = nn.value_and_grad(model, lambda m: full_loss_reference(m, inputs, targets, mask)[0])(model)
    g, want = dict(tree_flatten(g)), dict(tree_flatten(want))
    assert set(g) == set(want) and "model.embed_tokens.weight" in g
    for k in want:
        np.testing.assert_allclose(np.array(g[k]), np.array(want[k]), rtol=1e-4, atol=1e-6, err_msg=k)


def _measure_full_here(trainable: tuple[str, ...]) -> int:
    """MLX peak of a full (or partial) training step of test_memory's MEDIUM llama, fp32, checkpointed."""
    import mlx.optimizers as optim
    from test_memory import MEDIUM

    from mlx_tune.adapters.trainable import match_modules, unfreeze_modules
    from mlx_tune.training import loop, recompute
    from mlx_tune.training.losses import batch_loss

    model = tiny_model("llama", **MEDIUM)
    model.freeze()
    if trainable:
        unfreeze_modules(model, match_modules(model, list(trainable)), lora=False)
    else:
        model.unfreeze()
    recompute.grad_checkpoint(model)
    mx.eval(model.parameters())
    step = loop.Step(model, optim.AdamW(1e-4), batch_loss)
    ids = mx.random.randint(0, MEDIUM["vocab_size"], (1, 257))
    arrays = {"inputs": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": mx.ones((1, 256))}
    for _ in range(2):  # the second step has the optimizer state in place
        mx.eval(step.state)
        mx.clear_cache()
        mx.reset_peak_memory()
        loss, _, grads, _, _ = step.finish(*step.accumulate(arrays, None))
        step.apply(grads)
        mx.eval(step.state, loss)
    return mx.get_peak_memory()


@pytest.mark.slow
@pytest.mark.accelerator
@pytest.mark.parametrize("trainable", [(), ("model.embed_tokens", ".*norm")])
def test_planner_predicts_a_full_step_within_15_percent(trainable):
    from test_memory import MEDIUM

    from mlx_tune.planning.arch import arch_from_config
    from mlx_tune.planning.planner import Settings, plan
    from mlx_tune.runtime.backend import planning_backend
    from mlx_tune.testing.tiny import tiny_config

    code = f"from tests.test_full_finetune import _measure_full_here; print(_measure_full_here({trainable!r}))"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env())
    assert r.returncode == 0, r.stderr[-2000:]
    measured = int(r.stdout.split()[-1])
    p = plan(arch_from_config(tiny_config("llama", **MEDIUM)),
             Settings(batch_size=1, seq_len=256, bits=None, finetune="full", trainable=trainable,
                      backend=planning_backend()))
    assert 0.85 <= measured / p.mlx_peak <= 1.15, (measured, p.mlx_peak, p.parts)


def test_plan_of_a_7b_full_fine_tune_counts_masters_grads_and_adamw(monkeypatch):
    from mlx_tune.config import config_from_dict
    from mlx_tune.planning.planner import GB, plan_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = {"model": "mistralai/Mistral-7B-Instruct-v0.3", "train": {"iters": 1, "max_seq_length": 2048,
                                                                  "batch_size": 1, "grad_checkpoint": True}}
    lora = plan_config(config_from_dict(base), backend="metal")
    full = plan_config(config_from_dict({**base, "quantize": None, "train": {**base["train"], "finetune": "full"}}),
                       backend="metal")
    n = full.arch.params()
    assert full.parts["base weights"] / n == pytest.approx(4, rel=0.01)  # fp32 masters
    assert full.parts["trained weights: fp32 grads + 2 optimizer state(s)"] / n == pytest.approx(12, rel=0.01)
    assert "LoRA params + grads + AdamW" not in full.parts and full.total > 140 * GB > 10 * GB > lora.total
    part = plan_config(config_from_dict({**base, "quantize": None, "train": {
        **base["train"], "finetune": "full", "trainable": ["model.embed_tokens", ".*norm"]}}), backend="metal")
    assert part.parts["trained weights: fp32 grads + 2 optimizer state(s)"] / 12 == pytest.approx(
        32768 * 4096 + 65 * 4096, rel=1e-6)
