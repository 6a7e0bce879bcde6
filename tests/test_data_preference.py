"""data_transform.py on preference pairs, KTO rows and prompt-only (GRPO) rows; the trainer's refusal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlx_tune.data.dataset import read_dataset
from mlx_tune.data.preference import convert_preference, convert_prompts, detect_mode, split_shared_prefix
from mlx_tune.data.records import RecordError
from mlx_tune.data.transform import main, transform
from mlx_tune.errors import UserError

SPLITS = ("train", "valid", "test")


def u(text: str) -> dict:
    return {"role": "user", "content": text}


def a(text: str) -> dict:
    return {"role": "assistant", "content": text}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def rows_of(out: Path) -> list[dict]:
    return [json.loads(line) for s in SPLITS for line in (out / f"{s}.jsonl").read_text().splitlines()]


def only_row(tmp_path: Path, record: dict, **kw) -> tuple[dict, dict]:
    src = write_jsonl(tmp_path / "in.jsonl", [record])
    report = transform([src], tmp_path / "out", valid_ratio=0, test_ratio=0, **kw)
    (row,) = rows_of(tmp_path / "out")
    return row, report


def test_string_pair_keeps_its_keys_and_system(tmp_path):
    row, report = only_row(tmp_path, {"prompt": "2+2?", "chosen": " 4", "rejected": "5", "system": "Be brief.", "id": 7})
    assert row == {"prompt": "2+2?", "chosen": " 4", "rejected": "5", "system": "Be brief."}
    assert report["to"] == "preference" and report["pairs"] == 1 and report["kto"] == 0
    assert report["shapes"] == {"preference": 1}


def test_trl_conversational_pair_folds_system_in(tmp_path):
    row, _ = only_row(tmp_path, {"prompt": [u("Hi")], "chosen": [a("Hello!")], "rejected": [a("Go away.")], "system": "S"})
    assert row == {"messages": [{"role": "system", "content": "S"}, u("Hi")], "chosen": [a("Hello!")],
                   "rejected": [a("Go away.")]}


def test_messages_prompt_and_mixed_string_sides(tmp_path):
    row, _ = only_row(tmp_path, {"messages": [{"role": "human", "content": "Hi"}], "chosen": "Yes", "rejected": [a("No")]})
    assert row == {"messages": [u("Hi")], "chosen": [a("Yes")], "rejected": [a("No")]}


def test_shared_prefix_conversations_split_at_the_last_shared_user_turn(tmp_path):
    prefix = [{"role": "system", "content": "sys"}, u("a"), a("b"), u("c")]
    row, report = only_row(tmp_path, {"chosen": prefix + [a("good")], "rejected": prefix + [a("bad")]})
    assert row == {"messages": prefix, "chosen": [a("good")], "rejected": [a("bad")]}
    assert report["shapes"] == {"preference_shared_prefix": 1}


def test_shared_prefix_with_ultrafeedback_prompt_column(tmp_path):
    rec = {"prompt": "c", "chosen": [u("c"), a("good")], "rejected": [u("c"), a("bad")], "score_chosen": 8.0}
    row, _ = only_row(tmp_path, rec)
    assert row == {"messages": [u("c")], "chosen": [a("good")], "rejected": [a("bad")]}


@pytest.mark.parametrize("chosen, rejected, reason", [
    ([u("a"), a("b")], [u("a"), a("b")], "chosen and rejected are identical"),
    ([u("a"), a("b")], [u("z"), a("b")], "share no prompt"),
    ([u("a"), a("b"), u("c"), a("d")], [u("a"), a("b"), u("x"), a("d")], "prompts differ"),
    ([u("a"), a("b")], [u("a"), a("b"), u("c")], "field 'rejected': conversation ends without an assistant turn"),
])
def test_split_shared_prefix_reasons(chosen, rejected, reason):
    with pytest.raises(RecordError, match=reason):
        split_shared_prefix(chosen, rejected)


def test_split_shared_prefix_multi_turn():
    prompt, c, r = split_shared_prefix([u("1"), a("2"), u("3"), a("4"), u("5"), a("yes")],
                                       [u("1"), a("2"), u("3"), a("4"), u("5"), a("no")])
    assert (prompt, c, r) == ([u("1"), a("2"), u("3"), a("4"), u("5")], [a("yes")], [a("no")])


def test_kto_rows_string_and_conversational(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [
        {"prompt": "q", "completion": "good", "label": True},
        {"prompt": [u("q2")], "completion": [a("bad")], "label": False},
        {"prompt": "q3", "completion": "x", "label": 1},
        {"prompt": "q4", "completion": "x"},
    ])
    report = transform([src], tmp_path / "out", valid_ratio=0, test_ratio=0)
    assert rows_of(tmp_path / "out") == [{"prompt": "q", "completion": "good", "label": True},
                                         {"messages": [u("q2")], "completion": [a("bad")], "label": False}]
    assert report["pairs"] == 0 and report["kto"] == 2
    assert [s["reason"] for s in report["skipped"]] == ["field 'label' must be true or false, got number 1",
                                                        "missing field 'label' (true or false)"]


def test_every_bad_row_reason_and_the_accounting(tmp_path):
    good = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(20)]
    bad = [
        {"prompt": "x", "chosen": "same", "rejected": " same "},
        {"prompt": "x", "chosen": "", "rejected": "r"},
        {"prompt": "x", "chosen": "c"},
        {"chosen": "c", "rejected": "r"},
        {"chosen": [u("a"), a("b")], "rejected": [u("z"), a("c")]},
        {"chosen": [u("a"), a("b"), u("c"), a("d")], "rejected": [u("a"), a("b"), u("e"), a("f")]},
        {"chosen": [u("a"), a("b")], "rejected": [u("a"), a("c"), u("d")]},
        {"prompt": "q", "completion": "c", "label": "maybe"},
        {"instruction": "an SFT row", "output": "o"},
        "{not json",
    ]
    src = write_jsonl(tmp_path / "in.jsonl", good + bad + [good[3], {"prompt": "P3 ", "chosen": "c3", "rejected": "R3"}])
    report = transform([src], tmp_path / "out")
    reasons = [s["reason"] for s in report["skipped"]]
    expected = ["chosen and rejected are identical", "field 'chosen' is empty", "missing field 'rejected'",
                "missing field 'prompt' (or 'messages')", "share no prompt", "prompts differ",
                "field 'rejected': conversation ends without an assistant turn", "field 'label' must be true or false",
                "not a preference row", "not valid JSON"]
    assert len(reasons) == len(expected) and all(e in r for e, r in zip(expected, reasons)), reasons
    assert [s["line"] for s in report["skipped"]] == list(range(21, 31))
    assert report["duplicates"] == 2 and report["pairs"] == 20 and report["kto"] == 0
    assert report["read"] == sum(report["written"].values()) + len(report["skipped"]) + report["duplicates"] == 32


def test_strict_exits_2_on_a_bad_pair(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"},
                                              {"prompt": "p", "chosen": "c", "rejected": "c"}])
    assert main([str(src), "--out", str(tmp_path / "out"), "--strict"]) == 2
    err = capsys.readouterr().err
    assert f"{src}:2: chosen and rejected are identical" in err and not (tmp_path / "out").exists()


def test_pairs_of_one_prompt_share_a_split_and_outputs_are_reproducible(tmp_path):
    rows = [{"prompt": f"prompt {i // 3}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(90)]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    outs = []
    for name in ("o1", "o2"):
        transform([src], tmp_path / name, seed=3, valid_ratio=0.2, test_ratio=0.2)
        outs.append({s: (tmp_path / name / f"{s}.jsonl").read_bytes() for s in SPLITS})
    assert outs[0] == outs[1]
    seen: dict[str, str] = {}
    for s in SPLITS:
        for line in outs[0][s].decode().splitlines():
            assert seen.setdefault(json.loads(line)["prompt"], s) == s
    assert len({v for v in seen.values()}) == 3


def test_csv_with_map_and_forced_preference(tmp_path):
    src = tmp_path / "pairs.csv"
    src.write_text('question,better_answer,worse_answer\n"What is 1,5 + 1?","2,5",3\n', newline="")
    code = main([str(src), "--out", str(tmp_path / "out"), "--to", "preference", "--map", "prompt=question",
                 "--map", "chosen=better_answer", "--map", "rejected=worse_answer", "--valid-ratio", "0", "--test-ratio", "0"])
    assert code == 0
    assert rows_of(tmp_path / "out") == [{"prompt": "What is 1,5 + 1?", "chosen": "2,5", "rejected": "3"}]


def test_csv_kto_labels_as_text(tmp_path):
    src = tmp_path / "kto.csv"
    src.write_text("prompt,completion,label\nq,a,true\nq2,b,False\nq3,c,1\n", newline="")
    report = transform([src], tmp_path / "out", to="preference", valid_ratio=0, test_ratio=0)
    assert rows_of(tmp_path / "out") == [{"prompt": "q", "completion": "a", "label": True},
                                         {"prompt": "q2", "completion": "b", "label": False}]
    assert report["kto"] == 2 and len(report["skipped"]) == 1


def test_prompt_only_rows_keep_every_extra_column(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [
        {"prompt": "2+3?", "answer": "5", "schema": {"type": "integer"}},
        {"prompt": "1+1?", "answer": "2", "schema": None},
        {"prompt": "2+3?", "answer": "5", "schema": {"type": "integer"}},
        {"prompt": ""},
    ])
    # the first row has an answer column: auto-detection reads SFT, so --to prompts is needed
    report = transform([src], tmp_path / "out", to="prompts", valid_ratio=0, test_ratio=0)
    assert rows_of(tmp_path / "out") == [{"prompt": "2+3?", "answer": "5", "schema": {"type": "integer"}},
                                         {"prompt": "1+1?", "answer": "2", "schema": None}]
    assert report["to"] == "prompts" and report["duplicates"] == 1 and "pairs" not in report
    assert report["skipped"][0]["reason"] == "field 'prompt' is empty"


def test_prompt_only_messages_auto_detected(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [
        {"messages": [u("Solve x+1=2")], "system": "Think.", "target": 1},
        {"prompt": [u("a"), a("b"), u("c")], "meta": {"k": [1]}},
        {"messages": [u("a"), a("b")]},
    ])
    report = transform([src], tmp_path / "out", valid_ratio=0, test_ratio=0)
    assert report["to"] == "prompts"
    assert rows_of(tmp_path / "out") == [
        {"messages": [{"role": "system", "content": "Think."}, u("Solve x+1=2")], "target": 1},
        {"messages": [u("a"), a("b"), u("c")], "meta": {"k": [1]}},
    ]
    assert "must end with a user turn" in report["skipped"][0]["reason"]


def test_detect_mode():
    assert detect_mode({"prompt": "p", "chosen": "c", "rejected": "r"}) == "preference"
    assert detect_mode({"prompt": "p", "completion": "c", "label": False}) == "preference"
    assert detect_mode({"prompt": "p", "completion": "c", "label": "x"}) is None
    assert detect_mode({"prompt": "p", "completion": "c"}) is None
    assert detect_mode({"prompt": "p", "extra": 1}) == "prompts"
    assert detect_mode({"messages": [u("x"), a("y")]}) is None
    assert detect_mode({"instruction": "i", "output": "o"}) is None


def test_converters_keys_group_by_prompt():
    _, _, r1, p1 = convert_preference({"prompt": "Same  prompt", "chosen": "a", "rejected": "b"})
    _, _, r2, p2 = convert_preference({"prompt": "same prompt", "chosen": "c", "rejected": "d"})
    assert p1 == p2 and r1 != r2
    _, _, _, p3 = convert_prompts({"prompt": "same prompt"})
    assert p3.endswith("same prompt")


def test_sft_data_still_converts_as_chat(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"instruction": "i", "output": "o"}, {"prompt": "p"}])
    report = transform([src], tmp_path / "out", valid_ratio=0, test_ratio=0)
    assert report["to"] == "chat" and "pairs" not in report
    assert rows_of(tmp_path / "out") == [{"messages": [u("i"), a("o")]}]


@pytest.mark.parametrize("record, kind", [
    ({"prompt": "p", "chosen": "c", "rejected": "r"}, "preference pairs"),
    ({"messages": [u("p")], "chosen": [a("c")], "rejected": [a("r")]}, "preference pairs"),
    ({"prompt": "p", "completion": "c", "label": True}, "KTO rows"),
    ({"prompt": "p", "answer": "5"}, "prompt-only rows"),
    ({"messages": [u("p")], "target": 1}, "prompt-only rows"),
])
def test_trainer_refuses_preference_and_prompt_files_in_one_line(tmp_path, record, kind):
    path = write_jsonl(tmp_path / "train.jsonl", [record])
    with pytest.raises(UserError) as exc:
        read_dataset(path)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(f"{path}:1: this file holds {kind}")
    assert "set train.method: " in msg and "SFT cannot train on" in msg


def test_trainer_still_reads_sft_files(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "p", "completion": "c", "label": "x"}])
    assert read_dataset(path).records == [{"prompt": "p", "completion": "c"}]
