"""Chat templates for template-less bases: the named templates, the refusal, and the
template travelling with the adapter into the server and fused outputs."""

from __future__ import annotations

import json

import gguf
import pytest
import yaml

from mlx_tune.config import CHAT_TEMPLATE_NAMES, load_config
from mlx_tune.data.tokenize import tokenize_chat, tokenize_record
from mlx_tune.errors import ConfigError, UserError
from mlx_tune.model.chat_templates import CHATML, NAMED, TEMPLATE_FILE, set_chat_template, use_chat_template
from mlx_tune.testing.tiny import save_tiny_folder, tiny_tokenizer
from tests.train_workspace import workspace, write_data

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6"}]


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    """A tiny base model folder whose tokenizer has no chat template, and chat data."""
    root = tmp_path_factory.mktemp("bare")
    folder = save_tiny_folder(root / "model", chat_template=False)
    write_data(root / "data", n_train=24, n_valid=4)
    return root, folder


def test_named_templates_are_the_config_names_and_keep_the_prefix_property():
    assert tuple(NAMED) == CHAT_TEMPLATE_NAMES
    for name, text in NAMED.items():
        tok = tiny_tokenizer()
        set_chat_template(tok, text, name)
        ids, train, ok = tokenize_chat(tok, CHAT)
        assert ok, name  # every prefix rendering is a prefix of the whole: exact assistant masks
        trained = tok.decode([i for i, t in zip(ids, train) if t])
        assert "4" in trained and "6" in trained and "3+3" not in trained and "Be brief" not in trained, name
    tok = tiny_tokenizer()
    set_chat_template(tok, NAMED["gemma"], "gemma")
    text = tok.apply_chat_template(CHAT[:3], tokenize=False)
    assert text == "<start_of_turn>user\nBe brief.\n\n2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n"


def test_config_rejects_unknown_template_and_missing_file(tmp_path):
    base = {"model": "m", "train": {"iters": 1}}
    for value, words in (("chatxml", "not a known template"), (str(tmp_path / "no.jinja"), "not found")):
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump({**base, "chat_template": value}))
        with pytest.raises(ConfigError, match=words):
            load_config(path)
    (tmp_path / "t.jinja").write_text(CHATML)
    assert load_config(path, [f"chat_template={tmp_path / 't.jinja'}"]).chat_template.endswith("t.jinja")


def test_completions_on_a_bare_base_are_prompt_plus_completion():
    tok = tiny_tokenizer()
    tok.chat_template = None
    ids, train, _ = tokenize_record(tok, {"prompt": "Q: 1+1\nA:", "completion": " 2"}, "completions")
    assert tok.decode(ids) == "Q: 1+1\nA: 2<|im_end|>" and sum(train) == len(tok.encode(" 2")) + 1


def test_chat_data_on_a_bare_base_stops_before_training_with_one_line(bare):
    from mlx_tune.training.run import run_train

    root, folder = bare
    cfg = load_config(workspace(root, folder, "refused", iters=2))
    with pytest.raises(UserError) as err:
        run_train(cfg, log=lambda s: None)
    msg = str(err.value)
    assert "\n" not in msg and str(folder) in msg and "no chat template" in msg and "chat_template:" in msg
    assert not (root / "refused" / "metrics.jsonl").exists()  # no step ran


@pytest.fixture(scope="module")
def trained(bare):
    """chat_template: chatml on the bare base: trains, and the adapter carries the template."""
    from mlx_tune.training.run import run_train

    root, folder = bare
    cfg = load_config(workspace(root, folder, "chatml", iters=2, batch_size=2), ["chat_template=chatml"])
    run_train(cfg, log=lambda s: None)
    return cfg, root / "chatml"


def test_training_with_chatml_saves_the_template_with_the_adapter(trained):
    _, out = trained
    assert (out / TEMPLATE_FILE).read_text() == CHATML
    assert json.loads((out / "adapter_config.json").read_text())["chat_template_file"] == TEMPLATE_FILE


def test_server_renders_an_adapter_with_its_own_template(bare, trained):
    from mlx_tune.model.loading import load_model
    from mlx_tune.server.protocol import Preparer
    from mlx_tune.server.registry import ModelRegistry
    from mlx_tune.server.schemas import ChatCompletionRequest

    _, folder = bare
    model, tok, info = load_model(folder)
    registry = ModelRegistry(model, tok, info)
    registry.add("tuned", trained[1], trusted=True)
    prep = Preparer(registry, None)
    msgs = [{"role": "user", "content": "hi"}]
    ids = prep.chat_prompt(ChatCompletionRequest(model="tuned", messages=msgs))
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # The bare base (no template of its own, none given) keeps the plain role: content prompt.
    assert tok.decode(prep.chat_prompt(ChatCompletionRequest(model="base", messages=msgs))) == "user: hi\nassistant: "
    # --chat-template on the server: the base renders with it too.
    use_chat_template(tok, "chatml")
    assert prep.chat_prompt(ChatCompletionRequest(model="base", messages=msgs)) == ids


def test_fused_folder_and_gguf_carry_the_template(trained):
    from mlx_tune.export.fuse import FuseOptions, run_fuse
    from mlx_tune.model.loading import load_model

    cfg, out = trained
    mlx_out = run_fuse(cfg, FuseOptions(min_top1_agreement=0.0), out.parent / "fused", log=lambda s: None).output
    _, tok, _ = load_model(mlx_out)
    assert tok.chat_template == CHATML
    gguf_out = run_fuse(cfg, FuseOptions(format="gguf", gguf_type="f16", min_top1_agreement=0.0),
                        out.parent / "fused-gguf", log=lambda s: None).output
    field = gguf.GGUFReader(str(gguf_out)).fields["tokenizer.chat_template"]
    assert bytes(field.parts[field.data[0]]).decode() == CHATML


def test_data_inspect_takes_the_same_template(bare):
    from mlx_tune.data.inspect import inspect_data

    root, folder = bare
    with pytest.raises(UserError, match="--chat-template chatml"):
        inspect_data(root / "data", str(folder), rows=1)
    row = inspect_data(root / "data", str(folder), rows=1, chat_template="chatml")[0]
    assert "<|im_start|>assistant\n" in "".join(s.text for s in row.segments) and row.prefix_ok


def test_a_gemma3_base_trains_on_chat_data_with_the_gemma_template(tmp_path):
    from mlx_tune.training.run import run_train

    folder = save_tiny_folder(tmp_path / "gemma3", "gemma3_text", chat_template=False, sliding_window=8,
                              sliding_window_pattern=2, query_pre_attn_scalar=16)
    write_data(tmp_path / "data", n_train=8, n_valid=2)
    cfg = load_config(workspace(tmp_path, folder, "g", iters=2, batch_size=2, packing=False, max_seq_length=160),
                      ["chat_template=gemma"])  # byte tokens: the markers are many tokens here
    run_train(cfg, log=lambda s: None)
    assert (tmp_path / "g" / TEMPLATE_FILE).read_text() == NAMED["gemma"]
    assert (tmp_path / "g" / "adapters.safetensors").is_file()


def test_serve_flag_and_peft_export_carry_the_template(trained, tmp_path):
    import argparse

    from mlx_tune.adapters.peft import export_peft
    from mlx_tune.cli.serve import add_arguments, settings

    cfg, out = trained
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert settings(parser.parse_args(["--model", "m", "--chat-template", "llama3"])).chat_template == "llama3"
    with pytest.raises(UserError, match="--chat-template 'chatlm'"):
        settings(parser.parse_args(["--model", "m", "--chat-template", "chatlm"]))
    assert (export_peft(out, tmp_path / "peft") / TEMPLATE_FILE).read_text() == CHATML
