"""``mlx-tune adapter export --format gguf``: a llama.cpp LoRA GGUF whose tensors, applied as
llama.cpp applies them (W + alpha / rank * B @ A, Q/K rows in its rotary layout), give the
same weights as fusing the adapter; DoRA and bad names are refused in one line."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from tests.server_util import make_adapter
from tests.train_workspace import ROOT, env


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_lora_gguf_equals_the_fused_delta(tmp_path, model_type):
    from gguf import GGUFReader

    from mlx_tune.adapters.peft import read_adapter
    from mlx_tune.export.gguf import permute
    from mlx_tune.testing.tiny import save_tiny_folder

    base = save_tiny_folder(tmp_path / "base", model_type=model_type)
    adapter = make_adapter(base, tmp_path / "ad", rank=4, seed=2)
    out = tmp_path / "adapter.gguf"
    r = subprocess.run([sys.executable, "-m", "mlx_tune", "adapter", "export", "--format", "gguf", str(adapter),
                        str(out)], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    reader = GGUFReader(str(out))
    field = lambda k: reader.fields[k].parts[-1]  # noqa: E731
    assert bytes(field("general.type")).decode() == "adapter" and bytes(field("adapter.type")).decode() == "lora"
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    config, weights, _ = read_adapter(adapter)
    alpha = float(field("adapter.lora.alpha")[0])
    heads = (4, 2)  # the tiny config's attention and key/value heads
    modules = sorted({k.rpartition(".")[0] for k in weights})
    assert len(tensors) == 2 * len(modules)
    for module in modules:
        layer, _, leaf = module.partition(".layers.")[2].partition(".")
        short = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}[leaf]
        name = f"blk.{layer}.{short}.weight"
        a, b = tensors[name + ".lora_a"], tensors[name + ".lora_b"]
        rank = a.shape[0]
        got = (alpha / rank) * (b @ a)  # what llama.cpp adds to the GGUF weight (out x in)
        want = config["scale"] * np.array((weights[module + ".lora_a"] @ weights[module + ".lora_b"]).T)
        if model_type == "llama" and short in ("attn_q", "attn_k"):
            want = permute(want, heads[0] if short == "attn_q" else heads[1])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_lora_gguf_refusals(tmp_path):
    from mlx_tune.errors import UserError
    from mlx_tune.export.lora_gguf import export_lora_gguf
    from mlx_tune.testing.tiny import save_tiny_folder

    base = save_tiny_folder(tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "ad", rank=4)
    with pytest.raises(UserError, match="ending in .gguf"):
        export_lora_gguf(adapter, tmp_path / "out")
    cfg = (adapter / "adapter_config.json").read_text().replace('"use_dora": false', '"use_dora": true')
    (adapter / "adapter_config.json").write_text(cfg)
    with pytest.raises(UserError, match="DoRA"):
        export_lora_gguf(adapter, tmp_path / "x.gguf")
