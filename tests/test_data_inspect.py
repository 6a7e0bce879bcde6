"""``mlx-tune data inspect``: rows rendered as training tokenizes them, trained spans marked exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_tune.data.cache import load_dataset
from mlx_tune.data.inspect import CLOSE, CUT, OPEN, format_row, inspect_rows
from mlx_tune.errors import UserError
from mlx_tune.testing.tiny import tiny_tokenizer

ROOT = Path(__file__).resolve().parent.parent
CHAT = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                     {"role": "assistant", "content": "hello"}, {"role": "user", "content": "2+2?"},
                     {"role": "assistant", "content": "four"}]}
PC = {"prompt": "Say x", "completion": "x and y"}


def cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "mlx_tune", *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=300)


def write(folder: Path, split: str, *records) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{split}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_chat_markers_enclose_exactly_the_assistant_turns(tmp_path):
    path = write(tmp_path, "train", CHAT)
    (row,) = inspect_rows(path, tiny_tokenizer())
    text = format_row(row, colour=False)
    body = text.split("\n", 1)[1].rsplit("\n", 1)[0] + "\n"  # the counts line follows the text
    assert body == ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                    f"<|im_start|>assistant\n{OPEN}hello<|im_end|>{CLOSE}\n<|im_start|>user\n2+2?<|im_end|>\n"
                    f"<|im_start|>assistant\n{OPEN}four<|im_end|>{CLOSE}\n")
    # byte-level tiny tokenizer: one token per byte, one per special token
    trained = len("hello") + 1 + len("four") + 1
    assert sum(row.train) == trained
    assert text.endswith(f"{len(row.ids)} tokens, {trained} trained ({100 * trained / len(row.ids):.1f}%)")
    coloured = format_row(row, colour=True)
    assert "\x1b[42;30mhello<|im_end|>\x1b[0m" in coloured and OPEN not in coloured


def test_prompt_completion_marks_the_completion_and_mask_equals_trainers(tmp_path):
    path = write(tmp_path, "train", PC, {"prompt": "a", "completion": "b"})
    tok = tiny_tokenizer()
    rows = inspect_rows(path, tok, rows=5)
    assert len(rows) == 2
    text = format_row(rows[0], colour=False)
    assert text.count(OPEN) == 1 and f"{OPEN}x and y<|im_end|>{CLOSE}" in text
    # the same ids and mask the trainer's data load keeps
    ds = load_dataset(path, tok, max_seq_length=4096, use_cache=False)
    for row, ids, mask in zip(rows, ds.ids, ds.train):
        assert row.ids == ids.tolist() and row.train == mask.tolist()


def test_truncation_is_marked_where_training_cuts(tmp_path):
    path = write(tmp_path, "train", CHAT)
    (row,) = inspect_rows(path, tiny_tokenizer(), max_seq_length=40)
    assert row.kept == 41 and row.truncated
    text = format_row(row, colour=False)
    assert text.count(CUT) == 1
    assert sum(s.tokens for s in row.segments if not s.cut) == 41
    assert "truncated at --max-seq-length 40: 41 tokens kept" in text
    ds = load_dataset(path, tiny_tokenizer(), max_seq_length=40, use_cache=False)
    assert sum(row.train[: row.kept]) == int(ds.train[0].sum())


def test_inspect_cli_and_errors(tmp_path, tiny_folder):
    data = tmp_path / "data"
    write(data, "train", CHAT, PC)
    write(data, "valid", PC)
    r = cli("data", "inspect", str(data), "--model", str(tiny_folder), "--rows", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("--- line") == 1 and f"{OPEN}hello<|im_end|>{CLOSE}" in r.stdout  # not a terminal: markers
    assert "\x1b[" not in r.stdout and " trained (" in r.stdout
    r = cli("data", "inspect", str(data), "--model", str(tiny_folder), "--split", "valid", "--max-seq-length", "8")
    assert r.returncode == 0, r.stderr
    assert CUT in r.stdout and "truncated at --max-seq-length 8" in r.stdout
    for args, needle in ((["--split", "test"], "test.jsonl: file not found"),
                         (["--model", str(tmp_path / "no-model")], "no such file or folder")):
        argv = ["data", "inspect", str(data), "--model", str(tiny_folder), *args]
        r = cli(*argv)
        assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and needle in r.stderr, r.stderr
    r = cli("data", "inspect", str(tmp_path / "nowhere"), "--model", str(tiny_folder))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "no such folder" in r.stderr


def test_bad_arguments_are_user_errors(tmp_path):
    path = write(tmp_path, "train", CHAT)
    with pytest.raises(UserError, match="--rows"):
        inspect_rows(path, tiny_tokenizer(), rows=0)


def test_data_convert_still_works(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(20)), encoding="utf-8")
    out = tmp_path / "out"
    r = cli("data", str(src), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "read 20 records" in r.stdout
    assert sum(len((out / f"{s}.jsonl").read_text().splitlines()) for s in ("train", "valid", "test")) == 20
    r = cli("data", "--help")
    assert r.returncode == 0 and "data inspect" in r.stdout
