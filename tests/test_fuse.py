"""Fuse and export: every output format read back, the fidelity report, erasure caught, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import mlx.core as mx
import mlx.nn as nn
import pytest
import yaml
from mlx.utils import tree_flatten

from mlx_tune.adapters import inject, save_adapter, wrappers
from mlx_tune.cli import main
from mlx_tune.config import LoraConfig, QuantizeConfig
from mlx_tune.export import fidelity
from mlx_tune.export.fuse import FuseOptions, export
from mlx_tune.export.units import units
from mlx_tune.model.loading import ModelInfo, load_model
from mlx_tune.testing.tiny import save_tiny_folder, tiny_config, tiny_model, tiny_tokenizer

# Backend-sensitive: `make test-accelerator` runs this file on the Metal/CUDA code path too.
pytestmark = pytest.mark.accelerator

LORA = LoraConfig(rank=4, alpha=8.0)
QUANT = QuantizeConfig(bits=4, group_size=32)


def randomize_adapter(model, scale: float = 0.05, seed: int = 1) -> None:
    """A trained-looking adapter: B nonzero (a fresh adapter has B = 0 and changes nothing)."""
    mx.random.seed(seed)
    for _, w in wrappers(model):
        a = w.adapter
        a.lora_b = mx.random.normal(a.lora_b.shape) * scale
    mx.eval(model.parameters())


def greedy_answers(model, tokenizer, data_dir=None):
    prompts, _ = fidelity.check_prompts(tokenizer, data_dir)
    return fidelity.greedy(model, prompts, eos_ids=set(tokenizer.eos_token_ids))


def no_temp_left(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny 4-bit base on disk, an adapter with nonzero B saved next to it, and a config."""
    root = tmp_path_factory.mktemp("fuse")
    src = save_tiny_folder(root / "base")
    model, tok, info = load_model(src, QUANT)
    inject(model, LORA)
    randomize_adapter(model)
    save_adapter(model, root / "run", LORA, info)
    cfg = {
        "model": str(src),
        "quantize": {"bits": QUANT.bits, "group_size": QUANT.group_size},
        "lora": {"rank": LORA.rank, "alpha": LORA.alpha},
        "train": {"iters": 1},
        "output_dir": str(root / "run"),
        "fused_dir": str(root / "fused"),
    }
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    reference = greedy_answers(model, tok)
    return {"root": root, "src": src, "model": model, "tok": tok, "info": info, "config": config,
            "reference": reference}


def fused(run, name: str, **opts):
    out = run["root"] / name
    return export(run["model"], run["tok"], run["info"], out, FuseOptions(**opts), adapter=str(run["root"] / "run"),
                  keep_loaded=True, log=lambda s: None)


def check_report(report: dict) -> None:
    for key in ("fused_vs_adapter", "fused_vs_base", "base_vs_adapter"):
        c = report[key]
        assert set(c) == {"max_kl", "mean_kl", "top1_agreement", "positions"}
        assert 0 <= c["mean_kl"] <= c["max_kl"] and 0 <= c["top1_agreement"] <= 1
    assert report["base_vs_adapter"]["mean_kl"] > 1e-3  # the adapter really changes the model
    assert report["fused_vs_adapter"]["mean_kl"] < report["fused_vs_base"]["mean_kl"]
    assert report["fuse_seconds"] > 0 and report["peak_memory_gb"] >= 0 and report["size_bytes"] > 0
    assert report["prompts"]["count"] > 0 and report["prompts"]["positions"] > 0


def test_mlx_requantized_keeps_base_storage_and_reads_back(run):
    result = fused(run, "mlx-q", min_top1_agreement=0.8, keep_adapted="off")
    report = json.loads((result.output / "fuse_report.json").read_text())
    check_report(report)
    assert report["ok"] and report["kept_adapted"] is None and len(report["attempts"]) == 1
    config = json.loads((result.output / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    weights = mx.load(str(result.output / "model.safetensors"))
    assert weights["model.layers.0.self_attn.q_proj.weight"].dtype == mx.uint32
    assert "model.layers.0.self_attn.q_proj.scales" in weights
    assert not any("lora" in k or ".base." in k for k in weights)
    assert (result.output / "tokenizer.json").is_file()

    # Read back through our loader: 4-bit layers, the answers of base + adapter.
    model, tok, info = load_model(result.output)
    assert info.quantization == {"mode": "affine", "bits": 4, "group_size": 32}
    assert isinstance(model.model.layers[0].mlp.down_proj, nn.QuantizedLinear)
    assert greedy_answers(model, tok) == run["reference"]
    assert tok.chat_template and 2 in tok.eos_token_ids

    # ... and through mlx_lm.load, the same weights.
    import mlx_lm

    lm_model, _ = mlx_lm.load(str(result.output))
    ids = mx.array([[1, 40, 50, 60, 2]])
    assert mx.allclose(lm_model(ids), model(ids), atol=1e-4)


def test_mlx_dense_is_exact(run):
    result = fused(run, "mlx-dense", dequantize=True, dtype="float32")
    report = result.report
    check_report(report)
    assert report["fused_vs_adapter"]["max_kl"] < 1e-4 and report["fused_vs_adapter"]["top1_agreement"] == 1.0
    config = json.loads((result.output / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config
    model, tok, info = load_model(result.output)
    assert info.quantization is None
    ids = mx.array([[1, 40, 50, 60, 2]])
    assert mx.allclose(model(ids), run["model"](ids), atol=1e-4)
    assert greedy_answers(model, tok) == run["reference"]


def test_hf_folder_has_hf_names_and_no_quantization(run):
    result = fused(run, "hf", format="hf", dtype="float32")
    out = result.output
    config = json.loads((out / "config.json").read_text())
    assert not any("quantiz" in k for k in config)
    assert config["architectures"] == ["LlamaForCausalLM"] and config["torch_dtype"] == "float32"
    names = set(mx.load(str(out / "model.safetensors")))
    assert names == set(mx.load(str(run["src"] / "model.safetensors")))  # the source's HF names
    assert all(mx.load(str(out / "model.safetensors"))[n].dtype == mx.float32 for n in names)
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(out))
    assert hf_tok.chat_template and hf_tok.eos_token == "<|im_end|>"
    assert result.report["fused_vs_adapter"]["top1_agreement"] == 1.0
    model, tok, _ = load_model(out)
    assert greedy_answers(model, tok) == run["reference"]


@pytest.mark.parametrize("gguf_type", ["f16", "q8_0", "q4_0"])
def test_gguf_reads_back_with_tokenizer_and_answers(run, gguf_type):
    result = fused(run, f"gguf-{gguf_type}", format="gguf", gguf_type=gguf_type)
    path = result.output
    assert path.name == f"model-{gguf_type}.gguf" and path.is_file()
    reader = gguf.GGUFReader(str(path))
    fields = {k: f for k, f in reader.fields.items()}
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.pre", "tokenizer.chat_template",
                "tokenizer.ggml.eos_token_id"):
        assert key in fields, key
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == "F32"
    want = result.report["storage"].upper()
    assert types["blk.0.attn_q.weight"] == want  # adapted layers: q4_0, or Q8_0 when kept
    assert types["token_embd.weight"] == gguf_type.upper()
    assert result.report["ok"]
    check_report(result.report)

    model, tok, info = load_model(path)
    assert info.kind == "gguf" and tok.chat_template
    assert greedy_answers(model, tok) == run["reference"]
    # The Q/K permutation round-trips: f16 logits equal base + adapter's up to f16 rounding.
    if gguf_type == "f16":
        ids = mx.array([[1, 40, 50, 60, 2]])
        assert mx.allclose(model(ids), run["model"](ids), atol=2e-2)


def test_dora_and_qwen2_biases_untied_head_round_trip(tmp_path):
    """DoRA's magnitude and qwen2's q/k/v biases and separate lm_head survive HF and GGUF export."""
    model = tiny_model("qwen2")
    assert "lm_head" in dict(model.named_modules())
    inject(model, LoraConfig(rank=4, alpha=8.0, use_dora=True))
    randomize_adapter(model)
    for _, w in wrappers(model):
        w.adapter.m = w.adapter.m * 1.1
    info = ModelInfo(source="tiny-qwen2", kind="folder", path="", config=tiny_config("qwen2"))
    tok = tiny_tokenizer()
    reference = greedy_answers(model, tok)
    ids = mx.array([[1, 40, 50, 60, 2]])
    for name, opts in (("hf", FuseOptions(format="hf", dtype="float32")),
                       ("gguf", FuseOptions(format="gguf", gguf_type="f16"))):
        result = export(model, tok, info, tmp_path / name, opts, keep_loaded=True, log=lambda s: None)
        assert result.report["ok"] and result.report["base_vs_adapter"]["mean_kl"] > 1e-3
        loaded, ltok = result.fused
        assert greedy_answers(loaded, ltok) == reference
        assert mx.allclose(loaded(ids), model(ids), atol=1e-4 if name == "hf" else 2e-2)
    names = {t.name for t in gguf.GGUFReader(str(tmp_path / "gguf" / "model-f16.gguf")).tensors}
    assert {"output.weight", "blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= names


def test_nf4_base_is_written_as_affine_4bit_for_mlx(tmp_path):
    """MLX folders cannot hold NF4: an NF4 base comes out affine 4-bit (block size as group size)."""
    from mlx_tune.model.quantize import quantize_model

    model = tiny_model("llama")
    quantize_model(model, QuantizeConfig(mode="nf4", group_size=64))
    inject(model, LORA)
    randomize_adapter(model)
    info = ModelInfo(source="tiny-nf4", kind="folder", path="", config=tiny_config("llama"),
                     quantization={"mode": "nf4", "bits": 4, "group_size": 64})
    result = export(model, tiny_tokenizer(), info, tmp_path / "nf4", FuseOptions(min_top1_agreement=0.5),
                    keep_loaded=True, log=lambda s: None)
    config = json.loads((result.output / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    loaded, _ = result.fused
    assert isinstance(loaded.model.layers[0].mlp.up_proj, nn.QuantizedLinear)
    assert result.report["fused_vs_adapter"]["mean_kl"] < result.report["fused_vs_base"]["mean_kl"]


# ---------------------------------------------------------------------------
# Re-quantization that erases the adapter must be caught and fixed
# ---------------------------------------------------------------------------

EDGE = 0.4  # every group's min / max, in columns the adapter never touches


def erasable(seed: int = 0):
    """A 4-bit model and an adapter whose update re-quantizes exactly back to the base.

    Each row group of 32 holds -EDGE and +EDGE in its first two columns, so every group has
    the same grid (step 2 * EDGE / 15). The adapter's A is zero on those columns (the group's
    min / max never move) and |s B A| < 0.35 step, so rounding the fused weight to 4 bits
    gives the base's codes back: fused == base, while base + adapter differs measurably.
    """
    model = tiny_model("llama", seed=seed)
    for path, layer in model.named_modules():
        if isinstance(layer, nn.Linear) and not path.endswith("lm_head"):
            w = layer.weight
            cols = mx.arange(w.shape[1]) % QUANT.group_size
            w = mx.where(cols[None] == 0, -EDGE, mx.where(cols[None] == 1, EDGE, w))
            layer.weight = w
    nn.quantize(model, group_size=QUANT.group_size, bits=QUANT.bits,
                class_predicate=lambda p, m: isinstance(m, nn.Linear))
    inject(model, LORA)
    step = 2 * EDGE / 15
    mx.random.seed(seed + 1)
    for _, w in wrappers(model):
        a = w.adapter
        keep = (mx.arange(a.lora_a.shape[0]) % QUANT.group_size >= 2)[:, None]
        a.lora_a = mx.where(keep, a.lora_a, 0.0)
        a.lora_b = mx.random.normal(a.lora_b.shape)
        delta = a.delta()
        a.lora_b = a.lora_b * (0.35 * step / mx.abs(delta).max())
    mx.eval(model.parameters())
    info = ModelInfo(source="tiny-erasable", kind="folder", path="", config=tiny_config("llama"),
                     quantization={"mode": "affine", "bits": 4, "group_size": QUANT.group_size})
    return model, tiny_tokenizer(), info


def test_requantization_that_erases_the_adapter_is_caught(tmp_path):
    model, tok, info = erasable()
    reference = greedy_answers(model, tok)

    off = export(model, tok, info, tmp_path / "off", FuseOptions(keep_adapted="off"), log=lambda s: None)
    first = off.report["attempts"][0]
    assert not off.report["ok"] and off.report["warnings"]
    assert any("closer to the base" in r for r in first["erased"])
    assert first["fused_vs_base"]["max_kl"] < 1e-6  # bit for bit the base again
    assert off.report["base_vs_adapter"]["mean_kl"] > 1e-3

    logs = []
    auto = export(model, tok, info, tmp_path / "auto", FuseOptions(), keep_loaded=True, log=logs.append)
    report = auto.report
    assert report["ok"] and report["kept_adapted"] == "8bit" and len(report["attempts"]) == 2
    assert report["attempts"][0]["erased"] and logs and "erased" in logs[0]
    assert report["size_cost_bytes"] > 0
    assert report["fused_vs_adapter"]["top1_agreement"] >= 0.9
    assert report["fused_vs_adapter"]["mean_kl"] < report["fused_vs_base"]["mean_kl"]
    config = json.loads((auto.output / "config.json").read_text())
    q = config["quantization"]
    assert q.get("model.layers.0.self_attn.q_proj", q)["bits"] == 8  # default or per-layer entry
    loaded, ltok, _ = load_model(auto.output)
    assert loaded.model.layers[0].self_attn.q_proj.bits == 8
    # 8 bits keep the update up to a rounding of 1/255 of a group's range: near-ties in this
    # random tiny model may still flip a greedy token, so the answers are checked on the dense fix.
    assert report["greedy_match"] >= 2 / 3

    dense = export(model, tok, info, tmp_path / "dense", FuseOptions(keep_adapted="dense", dtype="float32"),
                   keep_loaded=True, log=lambda s: None)
    assert dense.report["kept_adapted"] == "dense" and dense.report["ok"]
    assert dense.report["fused_vs_adapter"]["max_kl"] < 1e-4
    assert greedy_answers(*dense.fused) == reference


# ---------------------------------------------------------------------------
# The command and bad input
# ---------------------------------------------------------------------------


def cli(*args) -> int:
    return main(["fuse", *map(str, args)])


def test_cli_fuses_with_overrides_and_refuses_existing_output(run, capsys, tmp_path):
    out = tmp_path / "cli-out"
    assert cli(run["config"], "fuse.format=hf", "fuse.dtype=float32", "--out", out) == 0
    printed = capsys.readouterr().out
    assert "fused vs base + adapter" in printed and "peak memory" in printed
    report = json.loads((out / "fuse_report.json").read_text())
    assert report["format"] == "hf" and report["load_seconds"] >= 0 and report["total_seconds"] > 0

    marker = out / "keep.txt"
    marker.write_text("old")
    assert cli(run["config"], "--out", out) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--force" in err and len(err.strip().splitlines()) == 1
    assert marker.exists() and no_temp_left(tmp_path)

    assert cli(run["config"], "--out", out, "--force", "--gguf-type", "q8_0", "--format", "gguf") == 0
    assert not marker.exists() and (out / "model-q8_0.gguf").is_file() and no_temp_left(tmp_path)


def test_missing_adapter_is_one_line(run, tmp_path, capsys):
    cfg = yaml.safe_load(run["config"].read_text())
    cfg["output_dir"] = str(tmp_path / "nothing-here")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli(path, "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err.strip()
    assert "adapters.safetensors: adapter file not found" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_adapter_for_another_base_is_refused(run, tmp_path, capsys):
    other = save_tiny_folder(tmp_path / "other", hidden_size=32, head_dim=8)
    cfg = yaml.safe_load(run["config"].read_text())
    cfg["model"] = str(other)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli(path, "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err.strip()
    assert "trained on another base model" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists() and no_temp_left(tmp_path)


def test_unsupported_gguf_type_and_width(run, tmp_path, capsys):
    assert cli(run["config"], "--format", "gguf", "--gguf-type", "q5_k", "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "fuse.gguf_type" in err and "q4_0" in err

    # A hidden size of 48 cannot be cut into Q4_0 blocks of 32.
    model = tiny_model("llama", hidden_size=48, head_dim=12, intermediate_size=96)
    inject(model, LORA)
    randomize_adapter(model)
    info = ModelInfo(source="tiny48", kind="folder", path="",
                     config=tiny_config("llama", hidden_size=48, head_dim=12, intermediate_size=96))
    from mlx_tune.errors import UserError

    with pytest.raises(UserError, match=r"q4_0 stores blocks of 32 weights per row.*--gguf-type f16"):
        export(model, tiny_tokenizer(), info, tmp_path / "g", FuseOptions(format="gguf", gguf_type="q4_0"))
    assert not (tmp_path / "g").exists() and no_temp_left(tmp_path)
    # f16 has no block constraint: the same model exports.
    ok = export(model, tiny_tokenizer(), info, tmp_path / "g", FuseOptions(format="gguf", gguf_type="f16"),
                log=lambda s: None)
    assert ok.report["ok"]


def test_unsupported_architecture_for_gguf(tmp_path):
    from mlx_tune.errors import UserError

    model = tiny_model("llama")
    inject(model, LORA)
    info = ModelInfo(source="x", kind="folder", path="", config={**tiny_config("llama"), "model_type": "gpt_neox"})
    with pytest.raises(UserError, match="model_type 'gpt_neox' is not supported"):
        export(model, tiny_tokenizer(), info, tmp_path / "g", FuseOptions(format="gguf"))


def test_units_cover_every_parameter_once(run):
    """The exporter walks each base tensor once (wrappers as one unit): nothing dropped or doubled."""
    names = sorted(u.name(k) for u in units(run["model"]) for k in u.keys())
    plain, _, _ = load_model(run["src"])
    assert names == sorted(k for k, _ in tree_flatten(plain.parameters()))
    assert len(names) == len(set(names))


# ---------------------------------------------------------------------------
# SmolLM2 with a really trained adapter
# ---------------------------------------------------------------------------


def train_steps(model, tokenizer, steps: int = 3, learning_rate: float = 1e-3) -> None:
    """A few real AdamW steps teaching the model one answer."""
    import mlx.optimizers as optim

    messages = [{"role": "user", "content": "What is the secret word?"},
                {"role": "assistant", "content": "The secret word is pineapple."}]
    ids = mx.array(tokenizer.apply_chat_template(messages))[None]

    def loss(m):
        logits = m(ids[:, :-1]).astype(mx.float32)
        return nn.losses.cross_entropy(logits, ids[:, 1:]).mean()

    opt = optim.AdamW(learning_rate=learning_rate)
    step = nn.value_and_grad(model, loss)
    for _ in range(steps):
        value, grads = step(model)
        opt.update(model, grads)
        mx.eval(model.trainable_parameters(), opt.state)
    assert math.isfinite(value.item())


@pytest.mark.slow
def test_smollm2_trained_adapter_fused_gguf_q8_answers_the_same(smollm2_path, tmp_path):
    """The q8_0 GGUF, loaded back by our loader, gives base + adapter's greedy answers (report's
    greedy_match). The MLX folder output is checked the same way on the tiny models above; on
    SmolLM2 it doubled this test's time (90 s) for the path the tiny ones already cover."""
    from mlx_tune.model import quant

    model, tok, info = load_model(smollm2_path)
    quant.prepare_for_backend(model)
    mx.random.seed(0)  # A's initialisation: the same adapter on every run
    inject(model, LoraConfig(rank=8, alpha=16.0))
    train_steps(model, tok)
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in (("What is the secret word?", "Pineapple."), ("What is the capital of France?", "Paris."))]
    (data / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for opts in (FuseOptions(format="gguf", gguf_type="q8_0"),):
        report = export(model, tok, info, tmp_path / opts.format, opts, data_dir=data, log=lambda s: None).report
        assert report["prompts"]["source"].endswith("valid.jsonl") and report["prompts"]["count"] == 2
        assert report["ok"], report["warnings"]
        assert report["base_vs_adapter"]["mean_kl"] > 1e-2  # the trained adapter changes the model
        assert report["fused_vs_adapter"]["top1_agreement"] >= 0.9
        assert report["fused_vs_adapter"]["mean_kl"] < report["fused_vs_base"]["mean_kl"]
        assert report["greedy_match"] == 1.0, report["attempts"]


def test_gguf_as_one_file_and_a_folder_with_a_modelfile(run, tmp_path):
    from mlx_tune.errors import UserError
    from mlx_tune.export.modelfile import family, modelfile

    opts = FuseOptions(format="gguf", gguf_type="q8_0")
    quiet = {"adapter": str(run["root"] / "run"), "log": lambda s: None}
    one = export(run["model"], run["tok"], run["info"], tmp_path / "out" / "model.gguf", opts, **quiet)
    assert one.output == tmp_path / "out" / "model.gguf" and one.output.is_file()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.fuse_report.json", "model.gguf"]
    model, tok, info = load_model(one.output)
    assert info.kind == "gguf" and greedy_answers(model, tok) == run["reference"]
    folder = export(run["model"], run["tok"], run["info"], tmp_path / "dir", opts, **quiet)
    text = (tmp_path / "dir" / "Modelfile").read_text()
    assert text.startswith("FROM ./model-q8_0.gguf\n") and 'PARAMETER stop "<|im_end|>"' in text
    assert "{{ .Role }}" in text and family(run["tok"]._tokenizer.chat_template) == "chatml"
    model, tok, _ = load_model(tmp_path / "dir")  # the folder holding one .gguf loads as that file
    assert greedy_answers(model, tok) == run["reference"] and folder.output.suffix == ".gguf"
    assert "ADAPTER ./a.gguf" in modelfile("m.gguf", None, adapter_file="a.gguf")
    with pytest.raises(UserError, match="fuse.format=gguf"):
        export(run["model"], run["tok"], run["info"], tmp_path / "x.gguf", FuseOptions(format="mlx"), **quiet)
