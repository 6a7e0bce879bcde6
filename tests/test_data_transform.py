"""data_transform.py / mlx_tune.data.transform: dedup, split, report, flags, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlx_tune.data.split import split_sizes
from mlx_tune.data.token_stats import token_stats
from mlx_tune.data.transform import main, transform

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "data_transform.py"
SPLITS = ("train", "valid", "test")


def read_split(out: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"{split}.jsonl").read_text().splitlines()]


def all_written(out: Path) -> dict[str, list[dict]]:
    return {s: read_split(out, s) for s in SPLITS}


def prompt_of(record: dict) -> str:
    if "messages" in record:
        return " ".join(" ".join(m["content"].split()).lower() for m in record["messages"][:-1])
    if "prompt" in record:
        return " ".join(record["prompt"].split()).lower()
    return " ".join(record["text"].split()).lower()


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def messy_inputs(tmp: Path) -> tuple[list[Path], int, set[str]]:
    """Files in every format holding good, bad and duplicate records.

    Returns the paths, the number of records they hold and the reasons expected.
    """
    good = [{"instruction": f"Task number {i}", "input": "", "output": f"Answer {i}"} for i in range(40)]
    jsonl = write_jsonl(tmp / "a.jsonl", good[:30] + [
        good[0],                                                  # exact duplicate
        {"instruction": "  TASK   number 1 ", "output": "answer 1"},  # whitespace/case duplicate
        "{not json",
        {"instruction": "no output"},
        {"instruction": "x", "output": ""},
        {"instruction": 3, "output": "y"},
        {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"},
                      {"role": "assistant", "content": "b"}]},
        {"messages": [{"role": "user", "content": "u"}]},
        {"text": "x" * 3000},                                     # over --max-record-bytes 2000
        [1, 2],
        {"unrelated": "shape"},
    ])
    csv = tmp / "b.csv"
    csv.write_text('question,answer\n"What is 1,5 + 1?","2,5"\n"Multi\nline?",yes\nonly-one-field\n'
                   '"What is 1,5 + 1?","2,5"\n', newline="")
    tsv = tmp / "c.tsv"
    tsv.write_text("prompt\tcompletion\nHello\tWorld\n\tempty prompt\n")
    js = tmp / "d.json"
    js.write_text(json.dumps([{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
                              {"conversations": [{"from": "alien", "value": "?"}]}] + good[30:], indent=1))
    txt = tmp / "e.txt"  # text records cannot become chats: skipped with a reason
    txt.write_text("a story\n\nanother story\n")
    n = 41 + 4 + 2 + 12 + 2
    reasons = {"not valid JSON", "missing field 'output'", "field 'output' is empty", "must be a string",
               "two assistant turns", "ends without an assistant turn", "over the 2000-byte limit",
               "must be a JSON object", "unknown record shape", "row has 1 fields", "field 'prompt' is empty",
               "'alien' is not one of", "use --to text"}
    return [jsonl, csv, tsv, js, txt], n, reasons


def test_messy_inputs_read_equals_written_plus_skipped_plus_duplicates(tmp_path, capsys):
    inputs, n, reasons = messy_inputs(tmp_path)
    out = tmp_path / "out"
    assert main([*map(str, inputs), "--out", str(out), "--max-record-bytes", "2000"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["read"] == n
    assert report["read"] == sum(report["written"].values()) + len(report["skipped"]) + report["duplicates"]
    assert report["duplicates"] == 3  # exact, normalised, and the repeated CSV row
    assert report["written"] == {s: len(read_split(out, s)) for s in SPLITS}
    for reason in reasons:
        assert any(reason in s["reason"] for s in report["skipped"]), reason
    err = capsys.readouterr().err
    for s in report["skipped"]:  # every skipped record is on stderr as file:line: reason
        assert f"{s['file']}:{s['line']}: {s['reason']}" in err
    assert {"file": str(inputs[0]), "line": 33, "reason": "not valid JSON: Expecting property name enclosed in "
            "double quotes at column 2"} in report["skipped"]
    assert report["shapes"] == {"alpaca": 42, "question_answer": 3, "prompt_completion": 1, "sharegpt": 1}
    assert [f["format"] for f in report["inputs"]] == ["jsonl", "csv", "tsv", "json", "text"]
    csv_rows = [r for s in SPLITS for r in read_split(out, s) if "2,5" in json.dumps(r)]
    assert csv_rows[0]["messages"] == [{"role": "user", "content": "What is 1,5 + 1?"},
                                       {"role": "assistant", "content": "2,5"}]
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_same_inputs_and_seed_give_byte_identical_outputs(tmp_path):
    inputs, _, _ = messy_inputs(tmp_path)
    args = [*map(str, inputs), "--max-record-bytes", "2000", "--seed", "7"]
    assert main([*args, "--out", str(tmp_path / "o1")]) == 0
    assert main([*args, "--out", str(tmp_path / "o2")]) == 0
    for name in ("train.jsonl", "valid.jsonl", "test.jsonl", "report.json"):
        assert (tmp_path / "o1" / name).read_bytes() == (tmp_path / "o2" / name).read_bytes()
    assert main([*args[:-1], "8", "--out", str(tmp_path / "o3")]) == 0
    assert (tmp_path / "o1" / "test.jsonl").read_bytes() != (tmp_path / "o3" / "test.jsonl").read_bytes()


def test_no_prompt_in_two_splits_and_exact_split_sizes(tmp_path):
    rows = [{"instruction": f"Question {i % 150}", "output": f"Answer {i}"} for i in range(300)]
    rows += [{"text": "ignored"}]  # a record that cannot be a chat: skipped, does not disturb the split
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "out"
    assert main([str(src), "--out", str(out), "--valid-ratio", "0.2", "--test-ratio", "0.1"]) == 0
    written = all_written(out)
    prompts = {s: {prompt_of(r) for r in written[s]} for s in SPLITS}
    assert not prompts["train"] & prompts["valid"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["valid"] & prompts["test"]
    # Groups of two records with one prompt: sizes land on the target or one group beyond it.
    assert 30 <= len(written["test"]) <= 31 and 60 <= len(written["valid"]) <= 62
    assert sum(map(len, written.values())) == 300
    # Input order is kept inside each split.
    answers = [int(r["messages"][1]["content"].split()[1]) for r in written["train"]]
    assert answers == sorted(answers)


def test_distinct_records_split_exactly():
    assert split_sizes(100, 0.1, 0.1) == (10, 10)
    assert split_sizes(5, 0.1, 0.1) == (1, 1)  # at least one when asked for
    assert split_sizes(2, 0.1, 0.1) == (0, 0)
    assert split_sizes(3, 0.45, 0.45) == (1, 1)  # train keeps at least one record
    assert split_sizes(1, 0.5, 0.0) == (0, 0)


def test_one_prompt_for_everything_stays_in_train(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Same", "completion": f"c{i}"} for i in range(20)])
    report = transform([src], tmp_path / "out", to="completions")
    assert report["written"] == {"train": 20, "valid": 0, "test": 0}


def test_dedup_is_whitespace_and_case_insensitive_but_keeps_the_first(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [
        {"question": "Hello   World?", "answer": "Yes."},
        {"question": "hello world?", "answer": "yes."},
        {"question": "hello\nworld?", "answer": "YES."},
        {"question": "hello world?", "answer": "No."},
    ])
    report = transform([src], tmp_path / "out", valid_ratio=0, test_ratio=0)
    assert report["duplicates"] == 2
    train = read_split(tmp_path / "out", "train")
    assert [r["messages"][0]["content"] for r in train] == ["Hello   World?", "hello world?"]


def test_strict_exits_2_prints_every_bad_record_and_writes_nothing(tmp_path, capsys):
    inputs, _, _ = messy_inputs(tmp_path)
    out = tmp_path / "out"
    assert main([*map(str, inputs), "--out", str(out), "--strict", "--max-record-bytes", "2000"]) == 2
    err = capsys.readouterr().err
    assert err.count(f"{inputs[0]}:") == 9 and "--strict: 14 of 61 records are bad" in err
    assert not out.exists()
    # An earlier good output survives a failed --strict --force run untouched.
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "fine"}])
    assert main([str(good), "--out", str(out), "--to", "text"]) == 0
    before = (out / "train.jsonl").read_bytes()
    assert main([str(inputs[0]), "--out", str(out), "--strict", "--force"]) == 2
    assert (out / "train.jsonl").read_bytes() == before


def test_map_flags(tmp_path, capsys):
    src = tmp_path / "so.csv"
    src.write_text("question_body,best_answer,score\nHow to exit vim?,:q!,10\nWhy?,Because,3\n,Empty,1\n")
    out = tmp_path / "out"
    code = main([str(src), "--out", str(out), "--to", "completions", "--valid-ratio", "0", "--test-ratio", "0",
                 "--map", "prompt=question_body", "--map", "completion=best_answer"])
    assert code == 0
    assert read_split(out, "train") == [{"prompt": "How to exit vim?", "completion": ":q!"},
                                        {"prompt": "Why?", "completion": "Because"}]
    report = json.loads((out / "report.json").read_text())
    assert report["skipped"][0]["reason"] == "field 'prompt' is empty"

    nested = write_jsonl(tmp_path / "squad.jsonl", [
        {"text": "ignored because the mapping points at question/answer", "q": "Who?",
         "answers": {"text": ["Ada"]}},
        {"q": "Where?"},
    ])
    capsys.readouterr()
    assert main([str(nested), "--out", str(tmp_path / "o2"), "--map", "question=q", "--map", "answer=answers.text.0",
                 "--map", "system=nowhere", "--valid-ratio", "0", "--test-ratio", "0"]) == 0
    assert read_split(tmp_path / "o2", "train")[0]["messages"][1]["content"] == "Ada"
    err = capsys.readouterr().err
    assert "missing field 'answer' (--map answer=answers.text.0: the record has no 'answers.text.0')" in err
    assert "warning: --map system=nowhere: no record has field 'nowhere'" in err

    for bad in ("prompt", "=x", "colour=x"):
        assert main([str(src), "--out", str(tmp_path / "o3"), "--map", bad]) == 2
    assert "'colour' is not a field mlx_tune reads" in capsys.readouterr().err


def test_system_message_and_output_formats(tmp_path, capsys):
    src = write_jsonl(tmp_path / "d.jsonl", [
        {"instruction": "Add 2 and 2", "output": "4"},
        {"messages": [{"role": "system", "content": "Own system."}, {"role": "user", "content": "u"},
                      {"role": "assistant", "content": "a"}]},
    ])
    ratios = ["--valid-ratio", "0", "--test-ratio", "0"]
    assert main([str(src), "--out", str(tmp_path / "chat"), "--system", "Answer tersely.", *ratios]) == 0
    chat = read_split(tmp_path / "chat", "train")
    assert chat[0]["messages"][0] == {"role": "system", "content": "Answer tersely."}
    assert chat[1]["messages"][0] == {"role": "system", "content": "Own system."}
    assert main([str(src), "--out", str(tmp_path / "comp"), "--to", "completions", *ratios]) == 0
    assert read_split(tmp_path / "comp", "train") == [{"prompt": "Add 2 and 2", "completion": "4"},
                                                      {"prompt": "Own system.\n\nu", "completion": "a"}]
    assert main([str(src), "--out", str(tmp_path / "text"), "--to", "text", *ratios]) == 0
    assert read_split(tmp_path / "text", "train")[0] == {"text": "user: Add 2 and 2\nassistant: 4"}
    assert main([str(src), "--out", str(tmp_path / "x"), "--to", "text", "--system", "S"]) == 2
    assert "--system adds a system message to chats; it needs --to chat" in capsys.readouterr().err


def test_existing_outputs_need_force(tmp_path, capsys):
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": "b"}])
    out = tmp_path / "out"
    assert main([str(src), "--out", str(out), "--to", "text"]) == 0
    assert main([str(src), "--out", str(out), "--to", "text"]) == 2
    err = capsys.readouterr().err
    assert "already holds train.jsonl, valid.jsonl, test.jsonl, report.json; pass --force to overwrite" in err
    assert main([str(src), "--out", str(out), "--to", "text", "--force"]) == 0
    (tmp_path / "afile").write_text("x")
    assert main([str(src), "--out", str(tmp_path / "afile")]) == 2


@pytest.mark.parametrize(
    "content, args, message",
    [
        ("", [], "no records in"),
        ('{"foo": 1}\n{"bar": 2}\n', [], "no usable record"),
        ('{"text": "a"}\n', ["--valid-ratio", "1.5"], "--valid-ratio 1.5: must be in [0, 1)"),
        ('{"text": "a"}\n', ["--valid-ratio", "0.5", "--test-ratio", "0.5"], "must be < 1"),
        ('{"text": "a"}\n', ["--system", " "], "--system is empty"),
    ],
)
def test_unusable_inputs_exit_2_with_one_line(tmp_path, capsys, content, args, message):
    src = tmp_path / "d.jsonl"
    src.write_text(content)
    assert main([str(src), "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.strip().splitlines()[-1].startswith("error: ")
    assert not (tmp_path / "out").exists()


def test_missing_and_badly_encoded_files_exit_2(tmp_path, capsys):
    assert main([str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "out")]) == 2
    assert "nope.jsonl: no such file" in capsys.readouterr().err
    bad = tmp_path / "latin.csv"
    bad.write_bytes("text\ncaf\xe9\n".encode("latin-1"))
    assert main([str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{bad}:2: not valid UTF-8" in err


def test_token_stats_with_a_real_chat_template():
    from mlx_tune.testing.tiny import tiny_tokenizer

    tok = tiny_tokenizer()  # byte-level: one token per byte plus ChatML specials
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    expected_chat = len(tok.apply_chat_template(chat["messages"], tokenize=True))
    stats = token_stats([chat, {"text": "abcd"}, {"prompt": "p", "completion": "c"}], tok, max_seq_length=10)
    assert stats["count"] == 3 and stats["min"] == 4 and stats["max"] == expected_chat
    assert stats["truncated"] == 2 and stats["max_seq_length"] == 10


def test_transform_reports_token_lengths(tmp_path):
    from mlx_tune.testing.tiny import tiny_tokenizer

    src = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "x" * i, "output": "y"} for i in range(1, 21)])
    report = transform([src], tmp_path / "out", tokenizer=tiny_tokenizer(), max_seq_length=30)
    t = report["tokens"]
    assert t["count"] == 20 and t["min"] < t["median"] < t["p95"] <= t["max"]
    assert t["truncated"] == sum(1 for i in range(1, 21) if t["min"] + i - 1 > 30)


# --------------------------------------------------------------------------- properties


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".txt"])
@given(data=st.binary(max_size=200))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_random_bytes_end_in_a_report_or_a_clean_exit_2(tmp_path, capsys, suffix, data):
    _check_clean_run(tmp_path, capsys, data, suffix)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(
        st.sampled_from(["instruction", "output", "prompt", "completion", "text", "messages", "role", "content"]),
        c, max_size=4),
    max_leaves=12,
)


@given(st.lists(json_values, max_size=6), st.sampled_from([".jsonl", ".json"]))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_random_json_values_end_in_a_report_or_a_clean_exit_2(tmp_path, capsys, rows, suffix):
    body = "".join(json.dumps(r) + "\n" for r in rows) if suffix == ".jsonl" else json.dumps(rows)
    _check_clean_run(tmp_path, capsys, body.encode(), suffix)


@given(st.data())
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_truncated_files_end_in_a_report_or_a_clean_exit_2(tmp_path, capsys, data):
    name, body = data.draw(st.sampled_from(sorted(_GOOD_FILES.items())))
    cut = data.draw(st.integers(0, len(body)))
    _check_clean_run(tmp_path, capsys, body[:cut], Path(name).suffix)


_GOOD_FILES = {
    "a.jsonl": b"".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}).encode() + b"\n" for i in range(5)),
    "a.json": json.dumps([{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(5)], indent=1).encode(),
    "a.csv": b"question,answer\n" + b"".join(f'"q,{i}","a\n{i}"\n'.encode() for i in range(5)),
    "a.txt": "caf\u00e9 one\n\ntwo\n\nthree\n".encode(),
}


def _check_clean_run(tmp_path, capsys, data: bytes, suffix: str) -> None:
    import shutil

    src = tmp_path / f"in{suffix}"
    src.write_bytes(data)
    out = tmp_path / "out"
    shutil.rmtree(out, ignore_errors=True)
    to = "text" if suffix == ".txt" else "chat"
    code = main([str(src), "--out", str(out), "--to", to])  # any exception fails the test
    err = capsys.readouterr().err
    assert code in (0, 2), err
    if code == 2:
        assert err.strip().splitlines()[-1].startswith("error: ")
        assert not out.exists()
    else:
        report = json.loads((out / "report.json").read_text())
        assert report["read"] == sum(report["written"].values()) + len(report["skipped"]) + report["duplicates"]


# --------------------------------------------------------------------------- the real entry points


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=120)


def test_data_transform_script_end_to_end(tmp_path):
    inputs, n, _ = messy_inputs(tmp_path)
    r = _run(str(SCRIPT), *map(str, inputs), "--out", str(tmp_path / "out"), "--max-record-bytes", "2000")
    assert r.returncode == 0, r.stderr
    assert f"read {n} records from 5 file(s)" in r.stdout
    assert "Traceback" not in r.stderr and f"{inputs[0]}:33: not valid JSON" in r.stderr
    r = _run(str(SCRIPT), *map(str, inputs), "--out", str(tmp_path / "o2"), "--strict")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: --strict")
    r = _run(str(SCRIPT), str(tmp_path / "missing.csv"), "--out", str(tmp_path / "o3"))
    assert r.returncode == 2 and r.stderr.strip() == f"error: {tmp_path / 'missing.csv'}: no such file"


def test_mlx_tune_data_subcommand(tmp_path):
    from mlx_tune.cli import main as cli_main

    src = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": "b"}, {"text": "c"}])
    assert cli_main(["data", str(src), "--out", str(tmp_path / "out"), "--to", "text"]) == 0
    assert sum(len(read_split(tmp_path / "out", s)) for s in SPLITS) == 3
    assert cli_main(["data", str(src), "--out", str(tmp_path / "out")]) == 2


# --------------------------------------------------------------------------- the demo dataset


def test_demo_dataset_is_reproducible_clean_and_held_out(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import make_demo_data
    finally:
        sys.path.pop(0)
    assert make_demo_data.main(["--out", str(tmp_path)]) == 0
    for rel in ("demo_raw/reviews.jsonl", "demo_prompts.jsonl"):  # the committed files are the script's output
        assert (tmp_path / rel).read_bytes() == (ROOT / "data" / rel).read_bytes(), rel
    raw = ROOT / "data" / "demo_raw" / "reviews.jsonl"
    assert raw.stat().st_size < 300_000
    report = transform([raw], tmp_path / "demo", strict=True)
    assert report["skipped"] == [] and report["written"]["train"] >= 300
    train = read_split(tmp_path / "demo", "train")
    answers = {r["messages"][-1]["content"] for r in train}
    assert answers == {'{"sentiment": "positive"}', '{"sentiment": "negative"}'}
    prompts = [json.loads(line) for line in (ROOT / "data" / "demo_prompts.jsonl").read_text().splitlines()]
    assert 30 <= len(prompts) <= 50
    seen = {r["messages"][0]["content"] for s in SPLITS for r in read_split(tmp_path / "demo", s)}
    for row in prompts:
        assert row["match"] == "exact" and row["expected"] in answers
        assert row["messages"][0]["content"] not in seen, "a held-out prompt is in the training data"


@pytest.mark.slow
def test_demo_examples_fit_128_smollm2_tokens(tmp_path, smollm2_path):
    model = smollm2_path
    from mlx_tune.data.token_stats import load_tokenizer

    raw = ROOT / "data" / "demo_raw" / "reviews.jsonl"
    report = transform([raw], tmp_path / "demo", tokenizer=load_tokenizer(str(model)), max_seq_length=128)
    assert report["tokens"]["truncated"] == 0 and report["tokens"]["max"] <= 128
