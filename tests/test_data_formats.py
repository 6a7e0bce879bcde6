"""mlx_tune.data readers, records, render and dataset: file readers, record shapes, validation reasons, rendering."""

from __future__ import annotations

import codecs
import gzip
import json

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mlx_tune.data.dataset import detect_format, read_dataset
from mlx_tune.data.readers import file_type, read_records
from mlx_tune.data.records import RecordError, apply_map, detect_shape, to_example, validate_record
from mlx_tune.data.render import TRAINER_FORMATS, dumps_example, render
from mlx_tune.data.textio import TextBuffer
from mlx_tune.errors import UserError

USER_ASSISTANT = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]


def items(path, **kw):
    return list(read_records(path, **kw))


def values(path, **kw):
    out = items(path, **kw)
    assert all(err is None for _, _, err in out), out
    return [v for _, v, _ in out]


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    "record, shape, messages",
    [
        ({"instruction": "Add", "input": "2 and 2", "output": "4"}, "alpaca",
         [{"role": "user", "content": "Add\n\n2 and 2"}, {"role": "assistant", "content": "4"}]),
        ({"instruction": " Say hi ", "input": "", "output": "hi\n"}, "alpaca",
         [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]),
        ({"instruction": "Say hi", "output": "hi", "system": "Be terse."}, "alpaca",
         [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Say hi"},
          {"role": "assistant", "content": "hi"}]),
        ({"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "2+2?"},
                            {"from": "gpt", "value": "4"}]}, "sharegpt",
         [{"role": "system", "content": "S"}, *USER_ASSISTANT]),
        ({"messages": USER_ASSISTANT}, "openai", USER_ASSISTANT),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "2+2?"}]},
                       {"role": "assistant", "content": "4"}]}, "openai", USER_ASSISTANT),
        ({"prompt": "2+2?", "completion": "4"}, "prompt_completion", USER_ASSISTANT),
        ({"prompt": [USER_ASSISTANT[0]], "completion": [USER_ASSISTANT[1]]}, "prompt_completion", USER_ASSISTANT),
        ({"question": "2+2?", "answer": "4", "id": 7}, "question_answer", USER_ASSISTANT),
    ],
)
def test_each_shape_becomes_a_chat(record, shape, messages):
    assert detect_shape(record) == shape
    ex = to_example(record)
    assert ex.shape == shape and ex.messages == messages
    assert render(ex, "chat") == {"messages": messages}


def test_text_shape_and_formats():
    ex = to_example({"text": "Once upon a time"})
    assert ex.text == "Once upon a time" and ex.messages is None
    assert render(ex, "text") == {"text": "Once upon a time"}
    with pytest.raises(RecordError, match="use --to text"):
        render(ex, "chat")
    assert detect_format({"text": "x"}) == "text"
    assert detect_format({"prompt": "a", "completion": "b"}) == "completions"
    assert detect_format({"instruction": "a", "output": "b"}) == "chat"


def test_openai_tools_and_tool_calls_are_kept():
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{\"a\": 2}"}}
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    record = {
        "messages": [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "4"},
            {"role": "assistant", "content": "It is 4."},
        ],
        "tools": tools,
    }
    ex = to_example(record)
    assert ex.calls and ex.tools == tools
    out = render(ex, "chat")
    assert out["tools"] == tools
    assert out["messages"][1] == {"role": "assistant", "content": "", "tool_calls": [call]}
    assert out["messages"][2] == {"role": "tool", "content": "4", "tool_call_id": "c1"}
    with pytest.raises(RecordError, match="tools"):
        render(ex, "completions")


def test_json_text_in_csv_cells_is_decoded():
    ex = to_example({"messages": json.dumps(USER_ASSISTANT)})
    assert ex.messages == USER_ASSISTANT
    with pytest.raises(RecordError, match="not valid JSON"):
        to_example({"messages": "[{oops"})


def test_render_completions_and_text():
    ex = to_example({"instruction": "Add", "output": "4", "system": "Be terse."})
    assert render(ex, "completions") == {"prompt": "Be terse.\n\nAdd", "completion": "4"}
    assert render(ex, "text") == {"text": "system: Be terse.\nuser: Add\nassistant: 4"}
    pc = to_example({"prompt": "Q:", "completion": " A"})  # kept verbatim, leading space included
    assert render(pc, "completions") == {"prompt": "Q:", "completion": " A"}
    multi = to_example({"messages": USER_ASSISTANT * 2})
    with pytest.raises(RecordError, match="4-turn conversation"):
        render(multi, "completions")
    assert render(ex, "chat", system="ignored: record has one")["messages"][0]["content"] == "Be terse."
    assert render(to_example({"question": "q", "answer": "a"}), "chat", system="S")["messages"][0] == {
        "role": "system", "content": "S"}


# --------------------------------------------------------------------------- bad records


@pytest.mark.parametrize(
    "record, reason",
    [
        ([1, 2], "must be a JSON object, got array"),
        ("text", "must be a JSON object, got string"),
        ({"foo": 1, "bar": 2}, "unknown record shape (fields: 'bar', 'foo')"),
        ({"output": "4"}, "missing field 'instruction'"),
        ({"instruction": "Add"}, "missing field 'output'"),
        ({"instruction": "Add", "output": "   "}, "field 'output' is empty"),
        ({"instruction": 5, "output": "4"}, "field 'instruction' must be a string, got number"),
        ({"instruction": "a", "input": ["x"], "output": "4"}, "field 'input' must be a string, got array"),
        ({"instruction": "a", "output": "4", "system": 3}, "field 'system' must be a string"),
        ({"completion": "x"}, "missing field 'prompt'"),
        ({"prompt": "", "completion": "x"}, "field 'prompt' is empty"),
        ({"question": "q", "answer": None}, "missing field 'answer'"),
        ({"text": ""}, "field 'text' is empty"),
        ({"text": {"a": 1}}, "field 'text' must be a string, got object"),
        ({"messages": []}, "field 'messages' is empty"),
        ({"messages": "nope"}, "not valid JSON"),
        ({"messages": {"role": "user"}}, "must be an array of messages, got object"),
        ({"messages": [USER_ASSISTANT[0], "hi"]}, "messages[1] must be an object"),
        ({"messages": [{"content": "x"}, USER_ASSISTANT[1]]}, "messages[0].role is missing"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role 'bot' is not one of"),
        ({"messages": [USER_ASSISTANT[0], {"role": "assistant", "content": 4}]}, "messages[1].content must be a string"),
        ({"messages": [USER_ASSISTANT[0], {"role": "assistant", "content": " "}]}, "messages[1].content is empty"),
        ({"messages": [USER_ASSISTANT[0], {"role": "assistant", "content": [{"type": "image_url"}]}]},
         "only text content parts"),
        ({"messages": [*USER_ASSISTANT, {"role": "assistant", "content": "again"}]},
         "messages[2]: two assistant turns in a row with no user turn between"),
        ({"messages": [USER_ASSISTANT[0], USER_ASSISTANT[0], USER_ASSISTANT[1]]}, "two user turns in a row"),
        ({"messages": [USER_ASSISTANT[0]]}, "conversation ends without an assistant turn"),
        ({"messages": [*USER_ASSISTANT, USER_ASSISTANT[0]]}, "ends without an assistant turn (last role: user)"),
        ({"messages": [USER_ASSISTANT[1], USER_ASSISTANT[0], USER_ASSISTANT[1]]}, "starts with an assistant turn"),
        ({"messages": [USER_ASSISTANT[0], {"role": "system", "content": "s"}, USER_ASSISTANT[1]]},
         "a system message may only come first"),
        ({"messages": [USER_ASSISTANT[0], {"role": "tool", "content": "4"}, USER_ASSISTANT[1]]},
         "a tool result must follow an assistant turn with tool_calls"),
        ({"messages": USER_ASSISTANT, "tools": "[1]"}, "field 'tools' must be an array of objects"),
        ({"conversations": [{"from": "robot", "value": "x"}]}, "conversations[0].from 'robot' is not one of"),
        ({"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": 3}]},
         "conversations[1].content must be a string"),
        ({"prompt": [USER_ASSISTANT[0]], "completion": "4"}, "must be a list of messages"),
    ],
)
def test_every_bad_record_has_a_reason(record, reason):
    with pytest.raises(RecordError) as err:
        to_example(record)
    assert reason in str(err.value)
    assert validate_record(record) == str(err.value)


def test_validate_record_accepts_good_records():
    assert validate_record({"instruction": "a", "output": "b"}) is None
    assert validate_record({"text": "hello"}, "text") is None


# --------------------------------------------------------------------------- files


def test_jsonl_reader_lines_blank_lines_and_bad_json(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a"}\n\n{"text": \n[1]\n  \n{"text": "b"}\n')
    got = items(p)
    assert [(line, err is None) for line, _, err in got] == [(1, True), (3, False), (4, True), (6, True)]
    assert got[1][2].startswith("not valid JSON")
    assert got[2][1] == [1]  # a valid JSON non-object is left for to_example to reject


def test_line_over_size_limit_is_skipped_and_reading_goes_on(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "' + "x" * 500 + '"}\n{"text": "ok"}\n')
    got = items(p, max_record_bytes=100)
    assert got[0][0] == 1 and "over the 100-byte limit" in got[0][2]
    assert got[1] == (2, {"text": "ok"}, None)


def test_csv_quoted_commas_newlines_and_row_errors(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text(
        'instruction,input,output\r\n'
        '"Say ""hi"", please",,"hi,\nthere"\r\n'
        'short row\r\n'
        'a,b,c,\r\n'
        'a,b,c,d\r\n'
    , newline="")
    got = items(p)
    assert got[0] == (2, {"instruction": 'Say "hi", please', "input": "", "output": "hi,\nthere"}, None)
    assert got[1][0] == 4 and "row has 1 fields but the header has 3" in got[1][2]
    assert got[2] == (5, {"instruction": "a", "input": "b", "output": "c"}, None)  # empty trailing field
    assert got[3][0] == 6 and "4 fields" in got[3][2]


def test_csv_duplicate_header_is_a_user_error(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text,text\na,b\n")
    with pytest.raises(UserError, match="column 'text' appears twice"):
        items(p)


def test_tsv_reader(tmp_path):
    p = tmp_path / "d.tsv"
    p.write_text("question\tanswer\nWhat, exactly?\tThis, exactly.\n")
    assert values(p) == [{"question": "What, exactly?", "answer": "This, exactly."}]


def test_json_array_object_single_record_and_jsonl_named_json(tmp_path):
    recs = [{"text": f"t{i}"} for i in range(3)]
    (tmp_path / "a.json").write_text(json.dumps(recs, indent=2))
    got = items(tmp_path / "a.json")
    assert [v for _, v, _ in got] == recs and [line for line, _, _ in got] == [2, 5, 8]
    (tmp_path / "o.json").write_text(json.dumps({"version": 2, "tags": ["x"], "data": recs}, indent=1))
    assert values(tmp_path / "o.json") == recs
    (tmp_path / "r.json").write_text(json.dumps({"instruction": "a", "output": "b"}, indent=2))
    assert values(tmp_path / "r.json") == [{"instruction": "a", "output": "b"}]
    (tmp_path / "l.json").write_text("\n".join(json.dumps(r) for r in recs))
    assert values(tmp_path / "l.json") == recs
    (tmp_path / "e.json").write_text("  \n")
    assert items(tmp_path / "e.json") == []
    # JSON Lines whose first line is too long to sniff, and concatenated pretty objects.
    long = [{"text": "x" * 70000}, {"text": "y"}]
    (tmp_path / "long.json").write_text("\n".join(json.dumps(r) for r in long) + "\n{bad\n")
    got = items(tmp_path / "long.json")
    assert [v for _, v, _ in got[:2]] == long and got[2][0] == 3 and "not valid JSON" in got[2][2]
    (tmp_path / "cat.json").write_text(json.dumps(recs[0], indent=1) + "\n" + json.dumps(recs[1], indent=1))
    assert items(tmp_path / "cat.json") == [(1, recs[0], None), (4, recs[1], None)]


@pytest.mark.parametrize(
    "text, reason",
    [
        ('[{"text": "a"}, {"text": "b"', "truncated"),
        ('[{"text": "a"},', "file ends before the closing ']'"),
        ('[{"text": "a"} {"text": "b"}]', "expected ',' or ']'"),
        ('[{"text": "a"}] trailing', "unexpected content after the end"),
        ('42', "top-level JSON must be an array of records or an object, got number"),
        ('{"text": ', "not valid JSON"),
        ("[" * 100000, "nested too deeply"),
    ],
)
def test_json_structural_errors_are_items_not_crashes(tmp_path, text, reason):
    p = tmp_path / "bad.json"
    p.write_text(text)
    got = items(p)
    assert got and reason in got[-1][2], got


def test_json_array_streams_across_chunk_boundaries(tmp_path, monkeypatch):
    monkeypatch.setattr(TextBuffer, "CHUNK", 7)
    recs = [{"text": "é" * i, "n": 10**i, "f": 1.5e3, "ok": True, "none": None} for i in range(12)]
    p = tmp_path / "a.json"
    p.write_text(json.dumps(recs))
    assert values(p) == recs


def test_text_blocks_and_whole_file(tmp_path):
    p = tmp_path / "d.txt"
    p.write_text("first block\nline two\n\n\n\nsecond block\n")
    assert items(p) == [(1, {"text": "first block\nline two"}, None), (6, {"text": "second block"}, None)]
    assert values(p, text_mode="file") == [{"text": "first block\nline two\n\n\n\nsecond block"}]


@pytest.mark.parametrize("name", ["d.jsonl", "d.csv", "d.tsv", "d.json", "d.txt"])
def test_utf8_bom_is_accepted_in_every_format(tmp_path, name):
    body = {
        "d.jsonl": '{"text": "héllo"}\n',
        "d.csv": "text\nhéllo\n",
        "d.tsv": "text\nhéllo\n",
        "d.json": '[{"text": "héllo"}]',
        "d.txt": "héllo\n",
    }[name]
    p = tmp_path / name
    p.write_bytes(codecs.BOM_UTF8 + body.encode())
    assert values(p) == [{"text": "héllo"}]


def test_gzip_inputs(tmp_path):
    p = tmp_path / "d.jsonl.gz"
    with gzip.open(p, "wt") as f:
        f.write('{"text": "zipped"}\n')
    assert values(p) == [{"text": "zipped"}]
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(UserError, match="cannot read"):
        items(bad)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32"])
def test_utf16_and_utf32_are_a_clear_error(tmp_path, encoding):
    p = tmp_path / "d.csv"
    p.write_text("text\nhello\n", encoding=encoding)  # Python writes the BOM
    with pytest.raises(UserError, match=f"{encoding.upper()}-encoded; only UTF-8 is read"):
        items(p)


def test_utf16_without_bom_and_latin1_are_clear_errors(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes('{"text": "hi"}\n'.encode("utf-16-le"))
    with pytest.raises(UserError, match="NUL bytes"):
        items(p)
    for name in ("d.jsonl", "d.csv", "d.txt", "d.json"):
        p = tmp_path / name
        head = "text\n" if name == "d.csv" else ""
        lines = ['{"text": "ok"}', '{"text": "café"}'] if "json" in name else ["ok", "", "café"]
        body = head + "\n".join(lines) + "\n"
        if name == "d.json":
            body = "[" + ",\n".join(lines) + "]"
        p.write_bytes(body.encode("latin-1"))
        with pytest.raises(UserError, match=r"not valid UTF-8 \(byte 0xe9\)") as err:
            items(p)
        assert str(p) in str(err.value) and "iconv" in str(err.value)


def test_unreadable_inputs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="cannot read"):
        items(tmp_path / "missing.jsonl")
    with pytest.raises(UserError, match="is a folder"):
        items(tmp_path, file_format="jsonl")
    with pytest.raises(UserError, match="unknown file type '.xlsx'"):
        file_type("data.xlsx")


def test_apply_map_with_dotted_paths():
    record = {"q": "Why?", "answers": [{"text": "Because."}], "meta": {"a": 1}}
    hits = [0, 0, 0]
    mapping = [("prompt", ["q"]), ("completion", ["answers", "0", "text"]), ("system", ["meta", "missing"])]
    out = apply_map(record, mapping, hits)
    assert out["prompt"] == "Why?" and out["completion"] == "Because." and "system" not in out
    assert hits == [1, 1, 0] and "prompt" not in record  # the input is not modified


# --------------------------------------------------------------------------- the trainer's reader


def test_read_dataset_for_the_trainer(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text(json.dumps({"messages": USER_ASSISTANT}) + "\n" + json.dumps({"instruction": "a", "output": "b"}) + "\n")
    ds = read_dataset(p)
    assert ds.format == "chat" and len(ds.records) == 2 and ds.lines == [1, 2]
    assert read_dataset(p, "completions").records[0] == {"prompt": "2+2?", "completion": "4"}
    p.write_text('{"text": "a"}\nnot json\n{"messages": []}\n')
    with pytest.raises(UserError) as err:
        read_dataset(p)
    msg = str(err.value)
    assert f"{p}:2: not valid JSON" in msg and f"{p}:3: field 'messages' is empty" in msg
    p.write_text("")
    with pytest.raises(UserError, match="no records"):
        read_dataset(p)


# --------------------------------------------------------------------------- properties

texts = st.text(min_size=1).filter(lambda s: s.strip())


@given(st.lists(st.tuples(st.sampled_from(["user", "assistant"]), texts), min_size=1, max_size=4),
       st.one_of(st.none(), texts))
@settings(max_examples=150, deadline=None)
def test_fast_json_lines_equal_json_dumps(turns, system):
    messages = [{"role": r, "content": c} for r, c in turns]
    try:
        ex = to_example({"messages": messages})
    except RecordError:
        return
    for to in TRAINER_FORMATS:
        try:
            expected = json.dumps(render(ex, to, system if to == "chat" else None), ensure_ascii=False)
        except RecordError:
            continue
        assert dumps_example(ex, to, system if to == "chat" else None) == expected


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["messages", "role", "content", "instruction", "output", "input", "prompt", "completion",
                         "question", "answer", "text", "conversations", "from", "value", "tools", "tool_calls",
                         "system", "x"]) | st.text(max_size=5), children, max_size=5),
    max_leaves=20,
)


@given(json_values)
@example({"prompt": "q", "completion": "a"})  # each trainer format's rendering runs, not only the errors
@example({"text": "plain"})
@example({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
@example({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"},
                            {"from": "human", "value": "more"}, {"from": "gpt", "value": "b"}]})
@settings(max_examples=200, deadline=None)
def test_any_json_value_is_an_example_or_a_record_error(value):
    try:
        ex = to_example(value)
    except RecordError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    for to in TRAINER_FORMATS:
        try:
            line = dumps_example(ex, to)
        except RecordError as exc:  # no form in this format (a multi-turn chat as completions, ...)
            assert str(exc) and "\n" not in str(exc) and "use --to" in str(exc)
            continue
        # One JSONL line, byte-identical to json.dumps, that reads back as a valid record of that format.
        row = json.loads(line)
        assert "\n" not in line and line == json.dumps(row, ensure_ascii=False)
        assert validate_record(row) is None, (to, row)
        assert detect_format(row) == to


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".tsv", ".txt"])
@given(data=st.binary(max_size=300))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_random_bytes_give_items_or_a_user_error(tmp_path, suffix, data):
    p = tmp_path / f"r{suffix}"
    p.write_bytes(data)
    try:
        got = items(p)
    except UserError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    for line, value, error in got:
        assert isinstance(line, int) and line >= 1
        assert (value is None) != (error is None) or value is None and error


def test_text_file_mode_limit_and_crlf(tmp_path):
    p = tmp_path / "d.txt"
    p.write_bytes("é" .encode() * 60 + b"\r\nend\r\n")
    assert values(p, text_mode="file") == [{"text": "é" * 60 + "\nend"}]
    assert "over the 100-byte limit" in items(p, text_mode="file", max_record_bytes=100)[0][2]
    assert values(p) == [{"text": "é" * 60 + "\nend"}]
