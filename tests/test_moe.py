"""LoRA on MoE expert stacks (mlx-lm's SwitchLinear): one LoRA per expert, routers frozen,
training reaches the experts, fuse and adapter files keep them, PEFT export refuses them."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import pytest
from mlx.utils import tree_flatten

from mlx_tune.adapters import inject, save_adapter, wrappers
from mlx_tune.adapters.manager import load_adapter, merge_adapters
from mlx_tune.adapters.peft import export_peft
from mlx_tune.adapters.switch import LoRASwitchLinear
from mlx_tune.config import LoraConfig, QuantizeConfig
from mlx_tune.errors import UserError
from mlx_tune.testing.tiny import tiny_model

MOE = {
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
                      mlp_only_layers=[], norm_topk_prob=True),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=8, rope_scaling=None,
                    layer_types=["sliding_attention", "full_attention"], swiglu_limit=7.0, attention_bias=True),
}
ROUTER = {"qwen3_moe": "mlp.gate", "mixtral": "block_sparse_moe.gate", "gpt_oss": "mlp.router"}
IDS = mx.array([[5, 40, 41, 42, 60, 61, 7, 9, 100, 101, 102, 30]])


def moe_model(arch: str, seed: int = 0) -> nn.Module:
    return tiny_model(arch, seed=seed, **MOE[arch])


def lora(**kw) -> LoraConfig:
    return LoraConfig(**{"rank": 4, "alpha": 8.0, **kw})


def perturb(model, seed: int = 1) -> None:
    """Non-zero B everywhere, so the adapter changes the model."""
    mx.random.seed(seed)
    for _, w in wrappers(model):
        a = w.adapters["default"]
        a.lora_b = mx.random.normal(a.lora_b.shape) * 0.2


def loss_fn(model, ids):
    logits = model(ids[:, :-1])
    return nn.losses.cross_entropy(logits, ids[:, 1:]).mean()


@pytest.mark.parametrize("arch", sorted(MOE))
def test_all_linear_takes_experts_not_routers_and_training_reaches_them(arch):
    model = moe_model(arch)
    summary = inject(model, lora())
    assert "all-linear: experts included" in str(summary) and "routers frozen" in str(summary)
    paths = dict(wrappers(model))
    experts = {p: w for p, w in paths.items() if isinstance(w, LoRASwitchLinear)}
    assert len(experts) == 3 * 2  # gate / up / down in each of the two blocks
    assert not any(p.endswith(ROUTER[arch]) for p in paths)
    w = next(iter(experts.values()))
    n_exp, out_dims, in_dims = w.dims
    assert n_exp == 4 and w.adapters["default"].lora_a.shape == (4, 4, in_dims)
    assert w.adapters["default"].lora_b.shape == (4, out_dims, 4)

    opt = optim.AdamW(learning_rate=3e-2)
    step = nn.value_and_grad(model, loss_fn)
    first, grads = step(model, IDS)
    flat = dict(tree_flatten(grads))
    expert_b = [v for k, v in flat.items() if ".switch_mlp." in k or ".experts." in k if k.endswith("lora_b")]
    assert expert_b and all(float(mx.abs(g).sum()) > 0 for g in expert_b)  # gradient flows to expert LoRA
    assert not any(ROUTER[arch] + "." in k for k in flat)  # the router is frozen
    for _ in range(8):
        loss, grads = step(model, IDS)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
    assert float(loss_fn(model, IDS)) < float(first) - 0.1


@pytest.mark.parametrize("arch", sorted(MOE))
def test_fuse_and_adapter_files_equal_the_unfused_model(arch, tmp_path):
    model = moe_model(arch)
    inject(model, lora(target_modules="all-linear"))
    perturb(model)
    want = model(IDS)
    save_adapter(model, tmp_path / "a", lora())
    fresh = moe_model(arch)
    load_adapter(fresh, tmp_path / "a")
    assert mx.allclose(fresh(IDS), want, atol=1e-5)
    merge_adapters(fresh, dequantize=True)
    assert not wrappers(fresh)
    assert mx.allclose(fresh(IDS), want, atol=1e-4)


def test_quantized_experts_fuse_through_the_mlx_writer(tmp_path):
    """A 4-bit qwen3_moe base: the MLX folder re-quantizes the fused experts; it loads back and agrees."""
    from mlx_tune.export.fuse import FuseOptions, export
    from mlx_tune.model.loading import load_model
    from mlx_tune.testing.tiny import save_tiny_folder

    src = save_tiny_folder(tmp_path / "src", "qwen3_moe", **MOE["qwen3_moe"])
    model, tok, info = load_model(src, QuantizeConfig(bits=8, group_size=32))
    inject(model, lora(target_modules=["switch_mlp"]))
    assert all(isinstance(w, LoRASwitchLinear) for _, w in wrappers(model))
    perturb(model)
    result = export(model, tok, info, tmp_path / "fused", FuseOptions(keep_adapted="off"), log=lambda s: None)
    fused, _, _ = load_model(result.output)
    assert result.report["fused_vs_adapter"]["top1_agreement"] >= 0.9
    assert mx.allclose(fused(IDS), model(IDS), atol=0.1)


def test_names_reach_experts_routers_only_when_named_and_include_experts_off():
    model = moe_model("gpt_oss")
    inject(model, lora(target_modules=["experts"]))
    assert all(isinstance(w, LoRASwitchLinear) for _, w in wrappers(model)) and len(wrappers(model)) == 6
    model = moe_model("qwen3_moe")
    inject(model, lora(target_modules=["gate"]))
    assert sorted(p for p, _ in wrappers(model)) == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    model = moe_model("mixtral")
    summary = inject(model, lora(include_experts=False))
    assert "experts excluded" in str(summary)
    assert wrappers(model) and not any(isinstance(w, LoRASwitchLinear) for _, w in wrappers(model))
    with pytest.raises(UserError, match="DoRA is not available on MoE expert layers"):
        inject(moe_model("mixtral"), lora(use_dora=True))


def test_peft_export_refuses_expert_stacks_in_one_line(tmp_path):
    model = moe_model("qwen3_moe")
    inject(model, lora())
    save_adapter(model, tmp_path / "a", lora())
    with pytest.raises(UserError) as err:
        export_peft(tmp_path / "a", tmp_path / "peft")
    assert "\n" not in str(err.value) and "PEFT has no standard form" in str(err.value)


def test_train_by_config_on_a_4bit_moe_base(tmp_path):
    """The product path (load + quantize, inject, compiled step, adapter files) on qwen3_moe."""
    import json

    from mlx_tune.config import load_config
    from mlx_tune.testing.tiny import save_tiny_folder
    from mlx_tune.training.run import run_train
    from tests.train_workspace import workspace, write_data

    folder = save_tiny_folder(tmp_path / "m", "qwen3_moe", **MOE["qwen3_moe"])
    write_data(tmp_path / "data", n_train=16, n_valid=4)
    cfg = load_config(workspace(tmp_path, folder, "out", iters=3, batch_size=2, packing=False),
                      ["quantize.bits=4", "quantize.group_size=32"])
    logs: list[str] = []
    run_train(cfg, log=logs.append)
    assert any("experts included" in line for line in logs)
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert "model.layers.1.mlp.switch_mlp.down_proj" in saved["modules"]
    assert "model.layers.1.mlp.gate" not in saved["modules"]
    weights = mx.load(str(tmp_path / "out" / "adapters.safetensors"))
    b = weights["model.layers.1.mlp.switch_mlp.down_proj.lora_b"]
    assert b.shape == (4, 64, 4) and float(mx.abs(b).sum()) > 0  # trained away from zero
