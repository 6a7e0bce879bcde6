"""Injection, summaries, adapter files, PEFT interop and several adapters on one base,
on real tiny mlx-lm models (llama with tied embeddings, qwen2 with an lm_head)."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_tune import adapters
from mlx_tune.adapters import AdapterManager, inject, load_adapter, save_adapter, trainable_summary
from mlx_tune.adapters.lora import LoRALinear
from mlx_tune.adapters.peft import export_peft, import_peft
from mlx_tune.config import LoraConfig
from mlx_tune.errors import UserError
from mlx_tune.testing.tiny import tiny_model

# Backend-sensitive: `make test-accelerator` runs this file on the Metal/CUDA code path too.
pytestmark = pytest.mark.accelerator

TOKENS = mx.array([[5, 17, 99, 3, 250, 42, 7, 8]])


def trained(model: nn.Module, name: str = "default", seed: int = 1) -> nn.Module:
    """Give adapter ``name`` random non-zero weights, as if trained."""
    mx.random.seed(seed)
    for _, w in adapters.wrappers(model):
        if name in w.adapters:
            a = w.adapters[name]
            a.lora_a = mx.random.normal(a.lora_a.shape) * 0.05
            a.lora_b = mx.random.normal(a.lora_b.shape) * 0.05
            if a.kind == "dora":
                a.m = a.m * (1 + 0.1 * mx.random.normal(a.m.shape))
    return model


def logits(model) -> np.ndarray:
    return np.array(model(TOKENS))


def base_arrays(model) -> dict[str, mx.array]:
    return adapters.base_entries(model)[1]


# --- injection ------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_inject_by_names(arch):
    model = tiny_model(arch)
    ref = logits(model)
    summary = inject(model, LoraConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    paths = [p for p, _ in adapters.wrappers(model)]
    assert paths == [f"model.layers.{i}.self_attn.{n}" for i in (0, 1) for n in ("q_proj", "v_proj")]
    # fresh adapters change nothing
    np.testing.assert_allclose(logits(model), ref, atol=1e-5)
    trainable = [k for k, _ in tree_flatten(model.trainable_parameters())]
    assert trainable and all(".adapters.default.lora_" in k for k in trainable)
    assert summary.adapted_modules == 4


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_inject_all_linear_never_lm_head(arch):
    model = tiny_model(arch)
    inject(model, LoraConfig(rank=2, alpha=4, target_modules="all-linear"))
    paths = [p for p, _ in adapters.wrappers(model)]
    assert len(paths) == 2 * 7 and "lm_head" not in paths
    assert {p.rsplit(".", 1)[-1] for p in paths} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_include_lm_head():
    model = tiny_model("qwen2")  # untied: has an lm_head
    inject(model, LoraConfig(rank=2, alpha=4, target_modules="all-linear", include_lm_head=True))
    assert "lm_head" in [p for p, _ in adapters.wrappers(model)]
    tied = tiny_model("llama")
    with pytest.raises(UserError, match="no separate lm_head"):
        inject(tied, LoraConfig(rank=2, alpha=4, target_modules="all-linear", include_lm_head=True))


def test_inject_regex_and_top_layers():
    model = tiny_model("llama")
    inject(model, LoraConfig(rank=2, alpha=4, target_modules=r"re:.*\.mlp\.(up|down)_proj"))
    assert [p for p, _ in adapters.wrappers(model)] == [
        f"model.layers.{i}.mlp.{n}" for i in (0, 1) for n in ("down_proj", "up_proj")]

    top = tiny_model("llama", num_hidden_layers=3)
    inject(top, LoraConfig(rank=2, alpha=4, target_modules=["q_proj"], layers=2))
    assert [p for p, _ in adapters.wrappers(top)] == ["model.layers.1.self_attn.q_proj", "model.layers.2.self_attn.q_proj"]

    with pytest.raises(UserError, match="matches no linear module"):
        inject(tiny_model("llama"), LoraConfig(rank=2, alpha=4, target_modules="re:nothing_here"))
    with pytest.raises(UserError, match="not a valid regex"):
        inject(tiny_model("llama"), LoraConfig(rank=2, alpha=4, target_modules="re:(unclosed"))


def test_unknown_module_names_list_existing():
    model = tiny_model("llama")
    with pytest.raises(UserError) as err:
        inject(model, LoraConfig(rank=2, alpha=4, target_modules=["q_proj", "qkv_proj", "c_attn"]))
    msg = str(err.value)
    assert "'qkv_proj', 'c_attn' not found" in msg
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in msg
    assert not adapters.wrappers(model)  # nothing half-injected


def test_bad_lora_values_are_user_errors():
    with pytest.raises(UserError, match="rank 0"):
        inject(tiny_model("llama"), LoraConfig(rank=0, alpha=4, target_modules=["q_proj"]))


def test_summary_numbers():
    model = tiny_model("llama")
    total_before = sum(v.size for _, v in tree_flatten(model.parameters()))
    s = inject(model, LoraConfig(rank=4, alpha=8, target_modules=["q_proj", "down_proj"]))
    # q_proj 64->64, down_proj 128->64, two blocks: r * (in + out) each
    want = 2 * (4 * (64 + 64) + 4 * (128 + 64))
    assert s.trainable == want == s.adapter_params
    assert s.total == total_before + want
    assert s.percent == pytest.approx(100 * want / (total_before + want))
    assert s.base_bytes == total_before * 4 and s.adapter_bytes == want * 4
    text = str(s)
    assert f"trainable params: {want:,}" in text and "all params" in text and "trainable%" in text

    q = tiny_model("llama")
    nn.quantize(q, group_size=32, bits=4, class_predicate=lambda p, m: isinstance(m, nn.Linear))
    sq = inject(q, LoraConfig(rank=4, alpha=8, target_modules=["q_proj", "down_proj"]))
    # logical counts: a 4-bit weight still counts as in x out parameters
    assert sq.total == s.total and sq.trainable == s.trainable
    assert sq.base_bytes < s.base_bytes / 2
    assert trainable_summary(q).trainable == sq.trainable


# --- save / load ----------------------------------------------------------


class Info:  # any object with the loader's ModelInfo attributes
    source = "tiny/llama"
    kind = "folder"
    path = "/tmp/tiny"
    config = {"model_type": "llama"}
    quantization = None


@pytest.mark.parametrize("dora", [False, True])
def test_save_load_round_trip(tmp_path, dora):
    cfg = LoraConfig(rank=4, alpha=8, target_modules="all-linear", layers=1, use_dora=dora)
    model = tiny_model("llama")
    inject(model, cfg)
    trained(model)
    want = logits(model)
    out = save_adapter(model, tmp_path / "ad", cfg, Info())
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapters.safetensors"]
    meta = json.loads((out / "adapter_config.json").read_text())
    assert meta["rank"] == 4 and meta["alpha"] == 8.0 and meta["use_dora"] is dora
    assert meta["base_model"] == "tiny/llama" and meta["base_model_type"] == "llama"
    assert meta["layers"] == 1 and meta["target_modules"] == "all-linear"
    assert len(meta["modules"]) == 7 and all(m.startswith("model.layers.1.") for m in meta["modules"])
    assert meta["base_fingerprint"] == adapters.fingerprint(tiny_model("llama"))["base_fingerprint"]

    fresh = tiny_model("llama")
    name = load_adapter(fresh, out)
    assert name == "default"
    np.testing.assert_allclose(logits(fresh), want, atol=1e-5)


def test_adapter_loads_on_quantized_base(tmp_path):
    cfg = LoraConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj"])
    model = tiny_model("llama")
    inject(model, cfg)
    trained(model)
    save_adapter(model, tmp_path, cfg, None)
    q = tiny_model("llama")
    base_q = logits(nn.quantize(q, group_size=32, bits=8) or q)
    load_adapter(q, tmp_path)
    assert not np.allclose(logits(q), base_q, atol=1e-4)  # the adapter acts on the 8-bit base


def test_mlx_lm_can_load_the_adapter(tmp_path):
    from mlx_lm.tuner.utils import load_adapters

    cfg = LoraConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj"], layers=1)
    model = tiny_model("llama")
    inject(model, cfg)
    trained(model)
    save_adapter(model, tmp_path, cfg, None)
    other = load_adapters(tiny_model("llama"), str(tmp_path))
    np.testing.assert_allclose(logits(other), logits(model), atol=1e-5)


def test_other_base_reports_all_mismatches(tmp_path):
    cfg = LoraConfig(rank=4, alpha=8, target_modules=["q_proj", "down_proj"])
    model = tiny_model("llama")
    inject(model, cfg)
    save_adapter(model, tmp_path, cfg, Info())
    other = tiny_model("llama", hidden_size=32, intermediate_size=96, num_attention_heads=2, head_dim=16)
    with pytest.raises(UserError) as err:
        load_adapter(other, tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "adapters.safetensors") in msg
    assert "base mismatch" in msg and "tiny/llama" in msg
    # every wrong tensor is listed, not only the first
    for i in (0, 1):
        assert f"model.layers.{i}.self_attn.q_proj.lora_a: shape (64, 4), this model needs (32, 4)" in msg
        assert f"model.layers.{i}.mlp.down_proj.lora_a: shape (128, 4), this model needs (96, 4)" in msg
    assert "problem(s)" in msg and msg.count("\n") >= 9
    assert not adapters.wrappers(other)  # nothing loaded


def test_missing_module_and_missing_tensor(tmp_path):
    cfg = LoraConfig(rank=2, alpha=4, target_modules=["q_proj"], layers=2)
    model = tiny_model("llama", num_hidden_layers=3)
    inject(model, cfg)
    save_adapter(model, tmp_path, cfg, None)
    weights = mx.load(str(tmp_path / "adapters.safetensors"))
    weights.pop("model.layers.1.self_attn.q_proj.lora_b")
    mx.save_safetensors(str(tmp_path / "adapters.safetensors"), weights)
    conf = json.loads((tmp_path / "adapter_config.json").read_text())
    conf.pop("base_fingerprint")
    (tmp_path / "adapter_config.json").write_text(json.dumps(conf))
    with pytest.raises(UserError) as err:
        load_adapter(tiny_model("llama", num_hidden_layers=2), tmp_path)
    msg = str(err.value)
    assert "model.layers.2.self_attn.q_proj: no such linear module" in msg
    assert "model.layers.1.self_attn.q_proj.lora_b: missing" in msg


def test_corrupt_files_name_the_file(tmp_path):
    cfg = LoraConfig(rank=2, alpha=4, target_modules=["q_proj"])
    model = tiny_model("llama")
    inject(model, cfg)
    save_adapter(model, tmp_path, cfg, None)
    weights = tmp_path / "adapters.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])  # truncated
    with pytest.raises(UserError) as err:
        load_adapter(tiny_model("llama"), tmp_path)
    assert str(weights) in str(err.value) and "corrupt" in str(err.value)

    save_adapter(model, tmp_path, cfg, None)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(UserError, match="adapter_config.json: not a readable adapter config"):
        load_adapter(tiny_model("llama"), tmp_path)

    with pytest.raises(UserError, match="adapter folder not found"):
        load_adapter(tiny_model("llama"), tmp_path / "nope")


def test_save_is_atomic_and_overwrites(tmp_path):
    cfg = LoraConfig(rank=2, alpha=4, target_modules=["q_proj"])
    model = tiny_model("llama")
    inject(model, cfg)
    save_adapter(model, tmp_path, cfg, None)
    trained(model)
    save_adapter(model, tmp_path, cfg, None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapters.safetensors"]
    fresh = tiny_model("llama")
    load_adapter(fresh, tmp_path)
    np.testing.assert_allclose(logits(fresh), logits(model), atol=1e-5)


# --- PEFT interop -----------------------------------------------------------


@pytest.mark.parametrize("dora, layers, targets", [
    (False, "all", ["q_proj", "v_proj"]),
    (True, 1, "all-linear"),
    (False, "all", r"re:model\.layers\.0\.self_attn\.q_proj|model\.layers\.1\.mlp\.up_proj"),
])
def test_peft_export_import_round_trip_exact(tmp_path, dora, layers, targets):
    cfg = LoraConfig(rank=4, alpha=8, target_modules=targets, layers=layers, use_dora=dora, use_rslora=not dora)
    model = tiny_model("llama")
    inject(model, cfg)
    trained(model)
    save_adapter(model, tmp_path / "mine", cfg, Info())
    export_peft(tmp_path / "mine", tmp_path / "peft")

    pc = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert pc["peft_type"] == "LORA" and pc["r"] == 4 and pc["lora_alpha"] == 8.0
    assert pc["task_type"] == "CAUSAL_LM" and pc["bias"] == "none" and pc["base_model_name_or_path"] == "tiny/llama"
    assert pc["use_dora"] is dora and pc["use_rslora"] is (not dora)
    peft_w = mx.load(str(tmp_path / "peft" / "adapter_model.safetensors"))
    mine = mx.load(str(tmp_path / "mine" / "adapters.safetensors"))
    path = json.loads((tmp_path / "mine" / "adapter_config.json").read_text())["modules"][0]
    a = peft_w[f"base_model.model.{path}.lora_A.weight"]
    b = peft_w[f"base_model.model.{path}.lora_B.weight"]
    in_dims, out_dims = mine[f"{path}.lora_a"].shape[0], mine[f"{path}.lora_b"].shape[1]
    assert a.shape == (4, in_dims) and b.shape == (out_dims, 4)  # PEFT layouts (r, in) and (out, r)
    assert np.array_equal(np.array(a), np.array(mine[f"{path}.lora_a"]).T)
    if dora:
        assert f"base_model.model.{path}.lora_magnitude_vector" in peft_w
    if layers == 1:
        assert pc["layers_to_transform"] == [1]

    import_peft(tmp_path / "peft", tmp_path / "back")
    back = mx.load(str(tmp_path / "back" / "adapters.safetensors"))
    assert sorted(back) == sorted(mine)
    for k in mine:  # bit-exact
        assert back[k].dtype == mine[k].dtype and np.array_equal(np.array(back[k]), np.array(mine[k]))
    assert json.loads((tmp_path / "back" / "adapter_config.json").read_text()) == json.loads(
        (tmp_path / "mine" / "adapter_config.json").read_text())

    # a PEFT folder also loads directly, with the same outputs
    fresh = tiny_model("llama")
    load_adapter(fresh, tmp_path / "peft")
    np.testing.assert_allclose(logits(fresh), logits(model), atol=1e-5)


def test_foreign_peft_folder(tmp_path):
    """A PEFT folder written by PEFT itself: no mlx_tune metadata, PEFT's own key style."""
    mx.random.seed(0)
    w = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": mx.random.normal((2, 64)),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": mx.random.normal((64, 2)),
    }
    mx.save_safetensors(str(tmp_path / "adapter_model.safetensors"), w, metadata={"format": "pt"})
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 16, "target_modules": ["q_proj"], "lora_dropout": 0.05,
         "bias": "none", "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}))
    import_peft(tmp_path, tmp_path / "mine")
    conf = json.loads((tmp_path / "mine" / "adapter_config.json").read_text())
    assert conf["rank"] == 2 and conf["alpha"] == 16.0 and conf["scale"] == 8.0 and conf["dropout"] == 0.05
    assert conf["modules"] == ["model.layers.0.self_attn.q_proj"]
    model = tiny_model("llama")
    base = logits(model)
    load_adapter(model, tmp_path / "mine")
    a = adapters.wrappers(model)[0][1].adapters["default"]
    assert a.lora_a.shape == (64, 2) and a.scale == 8.0
    assert not np.allclose(logits(model), base, atol=1e-4)

    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "r": 2, "lora_alpha": 16}))
    with pytest.raises(UserError, match="only LORA adapters"):
        import_peft(tmp_path, tmp_path / "x")


def test_adapter_command(tmp_path, capsys):
    from mlx_tune.cli import main

    cfg = LoraConfig(rank=2, alpha=4, target_modules=["q_proj"])
    model = tiny_model("llama")
    inject(model, cfg)
    trained(model)
    save_adapter(model, tmp_path / "mine", cfg, None)
    assert main(["adapter", "export", "--format", "peft", str(tmp_path / "mine"), str(tmp_path / "peft")]) == 0
    assert main(["adapter", "import", str(tmp_path / "peft"), str(tmp_path / "back")]) == 0
    assert (tmp_path / "back" / "adapters.safetensors").read_bytes() is not None
    assert main(["adapter", "import", str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
    assert "missing" in capsys.readouterr().err


# --- several adapters on one base -----------------------------------------------


def test_multi_adapter_switching(tmp_path):
    saved = {}
    for i, (name, targets, dora) in enumerate([("a", ["q_proj", "v_proj"], False),
                                               ("b", "all-linear", False),
                                               ("c", ["o_proj"], True)]):
        cfg = LoraConfig(rank=2 + i, alpha=8, target_modules=targets, use_dora=dora)
        m = tiny_model("llama")
        inject(m, cfg)
        trained(m, seed=10 + i)
        save_adapter(m, tmp_path / name, cfg, None)
        saved[name] = logits(m)

    model = tiny_model("llama")
    base = logits(model)
    before = {k: v for k, v in base_arrays(model).items()}
    manager = AdapterManager(model)
    for name in saved:
        manager.add(name, tmp_path / name)
    assert manager.names() == ["a", "b", "c"] and manager.active is None
    np.testing.assert_allclose(logits(model), base, atol=1e-6)  # added, not active

    for name in ["a", "b", "c", "a", None, "c"]:
        manager.activate(name)
        want = base if name is None else saved[name]
        np.testing.assert_allclose(logits(model), want, atol=1e-5)

    manager.remove("a")
    assert manager.names() == ["b", "c"]
    np.testing.assert_allclose(logits(model), saved["c"], atol=1e-5)
    manager.activate("b")
    np.testing.assert_allclose(logits(model), saved["b"], atol=1e-5)
    with pytest.raises(UserError, match="not loaded; loaded: b, c"):
        manager.activate("a")
    with pytest.raises(UserError, match="already loaded"):
        manager.add("b", tmp_path / "b")

    # the base weights are the very same arrays: never copied or modified
    after = base_arrays(model)
    assert sorted(after) == sorted(before)
    assert all(after[k] is before[k] for k in before)

    manager.remove("b")
    manager.remove("c")
    assert not adapters.wrappers(model)  # wrappers give their base layers back
    np.testing.assert_array_equal(logits(model), base)


def test_second_inject_adds_named_adapter():
    model = tiny_model("llama")
    inject(model, LoraConfig(rank=2, alpha=4, target_modules=["q_proj"]), name="one")
    inject(model, LoraConfig(rank=4, alpha=4, target_modules=["q_proj", "v_proj"]), name="two")
    trainable = sorted(k for k, _ in tree_flatten(model.trainable_parameters()))
    assert trainable and all(".adapters.two." in k for k in trainable)
    q = adapters.wrappers(model)[0][1]
    assert isinstance(q, LoRALinear) and sorted(q.adapters) == ["one", "two"]
    with pytest.raises(UserError, match="already in the model"):
        inject(model, LoraConfig(rank=2, alpha=4, target_modules=["q_proj"]), name="one")


@pytest.mark.slow
def test_smollm2_adapter_switching_copies_nothing(smollm2, tmp_path):
    """Two all-linear adapters on the 4-bit SmolLM2: switching is attribute setting. No
    array is created, copied or changed by a switch, and each adapter answers exactly as
    before (how long a switch takes is bench/bench_server.py's business)."""
    model, _, info = smollm2  # shared by the session: leave it as found
    tokens = mx.array([[1, 2]])  # short: 4-bit matmuls are slow on the CPU backend
    base = np.array(model(tokens)[0, -1])
    cfg = LoraConfig(rank=8, alpha=16, target_modules="all-linear")
    try:
        for i, name in enumerate(("x", "y")):
            inject(model, cfg, name=name)
            trained(model, name=name, seed=i)
            save_adapter(model, tmp_path / name, cfg, info, name=name)
        adapters.unload_adapter(model, "x")
        adapters.unload_adapter(model, "y")
        assert not adapters.wrappers(model)
        manager = AdapterManager(model)
        manager.add("x", tmp_path / "x")
        manager.add("y", tmp_path / "y")
        outs = {}
        for name in ["x", "y", None]:
            manager.activate(name)
            outs[name] = np.array(model(tokens)[0, -1])
        arrays = {k: v for k, v in tree_flatten(model.parameters())}
        for name in ["x", "y", None] * 5:  # switching alone, no forward pass in between
            manager.activate(name)
        after = dict(tree_flatten(model.parameters()))
        assert sorted(after) == sorted(arrays) and all(after[k] is arrays[k] for k in arrays)
        assert len(manager.names()) == 2 and any(".adapters.x." in k for k in arrays) and any(".adapters.y." in k for k in arrays)
        manager.activate("x")
        np.testing.assert_allclose(np.array(model(tokens)[0, -1]), outs["x"], atol=1e-4)
        np.testing.assert_array_equal(outs[None], base)
        assert not np.allclose(outs["x"], base, atol=1e-3) and not np.allclose(outs["x"], outs["y"], atol=1e-3)
    finally:
        for name in ("x", "y"):
            adapters.unload_adapter(model, name)
    assert not adapters.wrappers(model)


def test_compiled_training_step_updates_only_the_adapter():
    """The trainer compiles a step over the model: LoRA (with dropout) over a 4-bit base must work there."""
    from functools import partial

    import mlx.optimizers as optim

    model = tiny_model("llama")
    nn.quantize(model, group_size=32, bits=4, class_predicate=lambda p, m: isinstance(m, nn.Linear))
    inject(model, LoraConfig(rank=4, alpha=8, dropout=0.1, target_modules="all-linear"))
    model.train()
    before = dict(base_arrays(model))
    opt = optim.Adam(learning_rate=1e-2)
    x, y = TOKENS[:, :-1], TOKENS[:, 1:]

    def loss_fn(m, x, y):
        return nn.losses.cross_entropy(m(x), y).mean()

    state = [model.state, opt.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(x, y):
        loss, grads = nn.value_and_grad(model, loss_fn)(model, x, y)
        opt.update(model, grads)
        return loss

    losses = [float(step(x, y)) for _ in range(15)]
    assert losses[-1] < losses[0] - 0.1, losses
    after = base_arrays(model)
    assert all(np.array_equal(np.array(after[k]), np.array(before[k])) for k in before)


def test_loads_an_mlx_lm_adapter_folder(tmp_path):
    """A folder written by mlx_lm.lora (rank and scale under lora_parameters) loads as is."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    ref = tiny_model("llama")
    ref.freeze()
    linear_to_lora_layers(ref, 1, {"rank": 4, "scale": 10.0, "dropout": 0.0, "keys": ["self_attn.q_proj"]})
    mx.random.seed(5)
    weights = {k: mx.random.normal(v.shape) * 0.05 for k, v in tree_flatten(ref.trainable_parameters())}
    ref.load_weights(list(weights.items()), strict=False)
    mx.save_safetensors(str(tmp_path / "adapters.safetensors"), weights)
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": 1,
         "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0, "keys": ["self_attn.q_proj"]}}))
    model = tiny_model("llama")
    load_adapter(model, tmp_path)
    assert adapters.wrappers(model)[0][1].adapters["default"].scale == 10.0
    np.testing.assert_allclose(logits(model), logits(ref), atol=1e-5)


def test_fingerprint_ignores_wrappers_and_storage():
    plain = tiny_model("llama")
    fp = adapters.fingerprint(plain)
    inject(plain, LoraConfig(rank=2, alpha=4, target_modules="all-linear"))
    assert adapters.fingerprint(plain) == fp  # wrapping changes nothing
    q = tiny_model("llama")
    nn.quantize(q, group_size=64, bits=4, class_predicate=lambda p, m: isinstance(m, nn.Linear))
    fq = adapters.fingerprint(q)
    assert fq["base_fingerprint"] == fp["base_fingerprint"]  # same model, other storage
    assert fq["base_storage_fingerprint"] != fp["base_storage_fingerprint"]
    assert adapters.fingerprint(tiny_model("llama", intermediate_size=96))["base_fingerprint"] != fp["base_fingerprint"]
