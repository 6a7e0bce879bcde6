"""Loader: HF folders, MLX quantized folders, GGUF files (exact and K-quant), bad input."""

from __future__ import annotations

import json
import shutil

import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from mlx.utils import tree_flatten

from mlx_tune.config import QuantizeConfig
from mlx_tune.errors import ModelLoadError, UserError
from mlx_tune.model.loading import load_model
from mlx_tune.testing.gguf_files import random_blocks, write_family_gguf
from mlx_tune.testing.tiny import tiny_config, tiny_model

PROMPT = [1, 40, 50, 60, 70, 80, 2]


def logits(model, ids=PROMPT):
    return model(mx.array([ids]))[0].astype(mx.float32)


def file_weights(qtype, **overrides) -> dict[str, np.ndarray]:
    """The tiny llama's weights as a GGUF file of ``qtype`` holds them (HF names and layout):
    each matrix through gguf's quantize and dequantize. Blocks run along a row, so llama.cpp's
    Q/K row permutation does not change them."""
    out = {}
    for k, v in tree_flatten(tiny_model("llama", **overrides).parameters()):
        a = np.array(v, dtype=np.float32)
        out[k] = a if a.ndim == 1 or qtype == T.F32 else gguf.quants.dequantize(gguf.quants.quantize(a, qtype), qtype)
    return out


def test_hf_folder_loads_dense_and_matches(tiny_folder):
    model, tok, info = load_model(tiny_folder)
    ref = tiny_model("llama")
    assert info.kind == "folder" and info.quantization is None
    assert info.config["model_type"] == "llama"
    assert mx.allclose(logits(model), logits(ref), atol=1e-5)
    assert tok.encode("hi") == [74, 75]
    assert 2 in tok.eos_token_ids


def test_quantize_at_load_and_mlx_quantized_folder(tiny_folder, tmp_path):
    q = QuantizeConfig(bits=4, group_size=32)
    model, _, info = load_model(tiny_folder, q)
    assert info.quantization == {"mode": "affine", "bits": 4, "group_size": 32}
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    dense, _, _ = load_model(tiny_folder)
    a, b = logits(model).reshape(-1), logits(dense).reshape(-1)
    cosine = (a @ b / (mx.linalg.norm(a) * mx.linalg.norm(b))).item()
    assert cosine > 0.95  # 4-bit error, not garbage

    # Saved the mlx-lm way, the quantized folder loads as it is (quantize: null keeps it).
    from mlx_lm.utils import save_model

    out = tmp_path / "q4"
    out.mkdir()
    save_model(out, model)
    cfg = json.loads((tiny_folder / "config.json").read_text())
    cfg["quantization"] = {"group_size": 32, "bits": 4}
    (out / "config.json").write_text(json.dumps(cfg))
    for f in tiny_folder.glob("tokenizer*"):
        shutil.copy(f, out)
    again, _, info2 = load_model(out)
    assert info2.quantization["bits"] == 4
    assert mx.allclose(logits(again), logits(model), atol=1e-5)

    # Asking to dequantize a quantized source gives dense weights.
    dense2, _, info3 = load_model(out, dequantize=True)
    assert info3.quantization is None
    assert isinstance(dense2.model.layers[0].self_attn.q_proj, nn.Linear)
    assert mx.allclose(logits(dense2), logits(model), atol=1e-4)


@pytest.mark.parametrize("qtype", [T.F32, T.Q8_0, T.Q4_0, T.Q4_1])
def test_gguf_exact_types_match_file_weights(tmp_path, qtype):
    path = write_family_gguf(tmp_path / "m.gguf", "llama", types={"weight": qtype})
    model, tok, info = load_model(path)
    assert info.kind == "gguf"
    expected = "quantized" if qtype != T.F32 else "dense"
    assert (info.quantization is not None) == (expected == "quantized")
    dense = tiny_model("llama")
    dense.load_weights([(k, mx.array(v)) for k, v in file_weights(qtype).items()])
    # Same weights (Q/K un-permuted, blocks mapped without loss): same logits.
    assert mx.allclose(logits(model), logits(dense), atol=5e-3, rtol=5e-3)  # fp16 scales
    assert tok.encode("hi there") == [74, 75, 223, 86, 74, 71, 84, 71]
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True)[0] == 1


def test_gguf_k_quant_is_dequantized_and_requantized(tmp_path):
    q6_k = random_blocks(T.Q6_K, tiny_config("llama")["hidden_size"], 256)
    path = write_family_gguf(tmp_path / "k.gguf", "llama", types={"weight": T.Q4_0},
                             raw={"blk.0.ffn_down.weight": (q6_k, T.Q6_K)}, intermediate_size=256)
    ref = {**file_weights(T.Q4_0, intermediate_size=256),
           "model.layers.0.mlp.down_proj.weight": gguf.quants.dequantize(q6_k, T.Q6_K)}
    model, _, info = load_model(path, QuantizeConfig(bits=8, group_size=32))
    assert any("re-quantized to affine 8-bit" in n for n in info.notes)
    down = model.model.layers[0].mlp.down_proj
    assert isinstance(down, nn.QuantizedLinear) and down.bits == 8
    w = mx.dequantize(down.weight, down.scales, down.biases, group_size=32, bits=8)
    expected = ref["model.layers.0.mlp.down_proj.weight"]
    assert np.abs(np.array(w, dtype=np.float32) - expected).max() < 0.01 * np.abs(expected).max()
    # The other Q4_0 tensors went through the gguf-package path and stayed exact.
    q = model.model.layers[1].self_attn.v_proj
    got = np.array(mx.dequantize(q.weight, q.scales, q.biases, group_size=32, bits=4), dtype=np.float32)
    assert np.allclose(got, ref["model.layers.1.self_attn.v_proj.weight"], atol=1e-3)


def test_smollm2_gguf_answers_paris(smollm2):
    from mlx_lm import generate

    model, tok, info = smollm2
    assert info.quantization["bits"] == 4 and info.config["num_hidden_layers"] == 30
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True)
    assert "Paris" in generate(model, tok, prompt, max_tokens=12)


PARAGRAPH = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
    "It is named after the engineer Gustave Eiffel, whose company designed and built the tower. "
    "Locally nicknamed the Iron Lady, it was constructed from 1887 to 1889 as the centerpiece of the "
    "1889 World's Fair, and to crown the centennial anniversary of the French Revolution."
)


def perplexity(model, ids) -> float:
    x = mx.array([ids])
    loss = nn.losses.cross_entropy(model(x[:, :-1]).astype(mx.float32), x[:, 1:]).mean()
    return mx.exp(loss).item()


def test_smollm2_4bit_perplexity_within_2pct_of_fp32(smollm2, smollm2_path):
    model, tok, _ = smollm2
    ids = tok.encode(PARAGRAPH)
    dense, _, info = load_model(smollm2_path, dequantize=True)
    assert info.quantization is None
    p4, p32 = perplexity(model, ids), perplexity(dense, ids)
    print(f"SmolLM2 perplexity: 4-bit {p4:.3f}, fp32 dequantized {p32:.3f}")
    assert p4 < 30  # a real language model, not noise
    assert abs(p4 - p32) / p32 < 0.02


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "missing", "no such file or folder"),
        (lambda p: p / "missing.gguf", "GGUF file not found"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "no config.json"),
        (lambda p: (p / "x.bin").write_bytes(b"x") and p / "x.bin", "not a .gguf model"),
    ],
)
def test_bad_paths(tmp_path, make, message):
    with pytest.raises(ModelLoadError, match=message):
        load_model(str(make(tmp_path)) if "missing" not in message else make(tmp_path))


def test_corrupt_and_truncated_files(tiny_folder, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_folder, bad)
    st = bad / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: corrupt or truncated"):
        load_model(bad)
    (bad / "model.safetensors").unlink()
    (bad / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelLoadError, match="pickle"):
        load_model(bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json: not valid JSON"):
        load_model(bad)

    path = write_family_gguf(tmp_path / "t.gguf", "llama", types={"weight": T.Q8_0})
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="trunc.gguf: not a readable GGUF"):
        load_model(trunc)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="junk.gguf"):
        load_model(junk)


def test_unsupported_gguf_architecture_and_tokenizer(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "a.gguf"), "rwkv6")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ModelLoadError, match="architecture 'rwkv6' is not supported"):
        load_model(tmp_path / "a.gguf")


def test_offline_hub_id_fails_fast(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelLoadError, match=r"someone/no-such-model: cannot download .*HF_HUB_OFFLINE"):
        load_model("someone/no-such-model")


class _SilentHub:
    """A TCP listener that accepts connections and never answers: a hub behind a dead network."""

    def __init__(self):
        import socket
        import threading

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.1)
        self.accepted = []
        self.stop = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
                self.accepted.append(conn)
            except OSError:
                continue

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def close(self):
        self.stop = True
        self.thread.join()
        for c in self.accepted:
            c.close()
        self.sock.close()


def test_unreachable_hub_fails_in_one_line_after_one_request(monkeypatch, tmp_path):
    """No retries: the silent endpoint sees exactly one connection, and the error names the
    repo, the reason and the way out (a local path)."""
    from mlx_tune.planning.arch import read_source_config

    hub = _SilentHub()
    url = hub.url
    try:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path))
        monkeypatch.setenv("MLX_TUNE_HUB_TIMEOUT", "0.3")
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        with pytest.raises(ModelLoadError) as err:
            load_model("someone/no-such-model")
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith("someone/no-such-model: cannot download")
        assert f"{hub.url} did not answer within 0.3 s" in msg and "local model folder" in msg
        assert len(hub.accepted) == 1
        with pytest.raises(UserError, match="did not answer within 0.3 s"):  # the planner's hub path too
            read_source_config("someone/no-such-model")
        assert len(hub.accepted) == 2
    finally:
        hub.close()
    # A closed port (connection refused) ends the same way.
    monkeypatch.setenv("HF_ENDPOINT", url)
    with pytest.raises(ModelLoadError, match="did not answer .*local model folder"):
        load_model("someone/no-such-model")
