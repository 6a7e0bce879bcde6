"""test_mlx.py / mlx_tune.evaluation: scoring, the prompts file, and end-to-end runs
against a real OpenAI-compatible HTTP server (tests/echo_server.py, uvicorn on a free
127.0.0.1 port) through plain HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlx_tune.evaluation import main, read_prompts, score
from mlx_tune.evaluation.client import api_root
from mlx_tune.evaluation.prompts import PromptsFileError
from mlx_tune.evaluation.report import cell
from mlx_tune.evaluation.scoring import check_expected, extract_json

sys.path.insert(0, str(Path(__file__).parent))
from echo_server import FakeModel, free_port, make_app, serve_in_thread  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# -- scoring ------------------------------------------------------------------------------
@pytest.mark.parametrize("output, expected, match, want", [
    ("  Paris\n", "Paris", "exact", True),
    ("Paris.", "Paris", "exact", False),
    ("paris", "Paris", "exact", False),
    ("The capital is Paris.", "Paris", "contains", True),
    ("The capital is paris.", "Paris", "contains", False),
    ("answer: 42 apples", r"\b42\b", "regex", True),
    ("answer: 420", r"\b42\b", "regex", False),
    ("HELLO there", "(?i)^hello", "regex", True),
    ('{"a": 1, "b": [1, 2]}', '{"b": [1, 2], "a": 1}', "json", True),
    ('Sure! ```json\n{"a": 1}\n``` hope it helps', {"a": 1}, "json", True),
    ('The result is {"a": 1.0} as asked', {"a": 1}, "json", True),
    ('{"a": true}', {"a": 1}, "json", False),
    ('{"a": 1, "b": 2}', {"a": 1}, "json", False),
    ("[1, 2, 3]", "[1, 2, 3]", "json", True),
    ("no json here", {"a": 1}, "json", False),
    ("anything", None, "exact", None),
])
def test_score_modes(output, expected, match, want):
    assert score(output, expected, match) is want


def test_extract_json_skips_braces_that_are_not_json():
    assert extract_json('use {curly} then {"k": [1]}') == (True, {"k": [1]})
    assert extract_json("{not json") == (False, None)


@pytest.mark.parametrize("match, expected, message", [
    ("regex", "([unclosed", "not a valid regular expression"),
    ("json", "{bad json", "not valid JSON text"),
    ("exact", {"a": 1}, "must be a string"),
])
def test_check_expected_rejects_unusable_values(match, expected, message):
    with pytest.raises(ValueError, match=message):
        check_expected(match, expected)


def test_api_root_accepts_v1_and_bare_host():
    assert api_root("http://h:8080/v1/") == "http://h:8080"
    assert api_root("127.0.0.1:8080") == "http://127.0.0.1:8080"


@pytest.mark.parametrize("url", ["ftp://x", "http://[::1", ":::", "http://"])
def test_bad_base_url_is_a_user_error(url, prompts, capsys):
    code, _, err = run_cli(capsys, "--base-url", url, "--prompts", prompts)
    assert code == 2 and err.startswith("error: --base-url") and len(err.strip().splitlines()) == 1


def test_cell_truncates_and_flattens():
    assert cell("line one\nline two", 100) == "line one\\nline two"
    assert cell("x" * 50, 10) == "x" * 9 + "…"
    assert cell(None, 5) == "-"
    assert cell({"a": 1}, 20) == '{"a": 1}'


# -- the prompts file ---------------------------------------------------------------------
def write_lines(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_read_prompts_both_shapes_and_blank_lines(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [
        {"prompt": "2+2=", "expected": "4"},
        "",
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
         "expected": "hi", "match": "contains", "id": "greet"},
    ])
    rows = read_prompts(path)
    assert [r.line for r in rows] == [1, 3]
    assert not rows[0].is_chat and rows[0].match == "exact" and rows[0].display == "2+2="
    assert rows[1].is_chat and rows[1].display == "Hi?" and rows[1].id == "greet"


@pytest.mark.parametrize("line, reason", [
    ("{not json", "invalid JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"prompt": "x", "expceted": "y"}', "unknown key 'expceted' (did you mean 'expected'?)"),
    ('{"expected": "y"}', "exactly one of 'prompt'"),
    ('{"prompt": "x", "messages": [{"role": "user", "content": "x"}]}', "exactly one of"),
    ('{"prompt": ""}', "'prompt' must be a non-empty string"),
    ('{"messages": []}', "'messages' must be a non-empty list"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "messages[0].role is 'robot'"),
    ('{"messages": [{"role": "user"}]}', "messages[0].content must be a string"),
    ('{"prompt": "x", "expected": "y", "match": "contain"}', "did you mean 'contains'"),
    ('{"prompt": "x", "match": "regex"}', "needs an 'expected' value"),
    ('{"prompt": "x", "expected": "(", "match": "regex"}', "not a valid regular expression"),
    ('{"prompt": "x", "completion": "y", "expected": "y"}', "'expected' or 'completion', not both"),
    ('{"messages": [{"role": "user", "content": "x"}], "completion": "y"}', "beside a 'prompt'"),
    ('{"messages": [{"role": "assistant", "content": "x"}]}', "nothing to ask"),
])
def test_malformed_rows_name_file_and_line(tmp_path, line, reason):
    path = write_lines(tmp_path / "p.jsonl", [{"prompt": "fine"}, line])
    with pytest.raises(PromptsFileError) as err:
        read_prompts(path)
    assert str(err.value).startswith(f"{path}:2: ")
    assert reason in str(err.value)


def test_held_out_split_rows_carry_their_answer(tmp_path):
    """data_transform.py's test.jsonl: the completion / final assistant turn is the expected answer."""
    path = write_lines(tmp_path / "test.jsonl", [
        {"prompt": "2+2=", "completion": " 4"},
        {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello!"}]},
        {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hey"}],
         "expected": "Hello", "match": "contains"},
    ])
    a, b, c = read_prompts(path)
    assert (a.prompt, a.expected, a.match) == ("2+2=", " 4", "exact")
    assert b.messages == [{"role": "user", "content": "Hi?"}] and b.expected == "Hello!"
    assert len(c.messages) == 2 and c.expected == "Hello"  # an explicit expected wins; nothing dropped


def test_every_bad_row_is_listed(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", ["{bad", {"prompt": "ok"}, {"nope": 1}])
    with pytest.raises(PromptsFileError) as err:
        read_prompts(path)
    lines = str(err.value).splitlines()
    assert [ln.split(": ")[0] for ln in lines] == [f"{path}:1", f"{path}:3"]


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(PromptsFileError, match="prompts file not found"):
        read_prompts(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(PromptsFileError, match="no prompts"):
        read_prompts(tmp_path / "empty.jsonl")


# -- end to end against a real HTTP server ------------------------------------------------
TUNED = {
    "2+2=": "4",
    "Capital of France?": "The capital is Paris.",
    "Order as JSON": '```json\n{"item": "tea", "qty": 2}\n```',
    "say hello": "hello there",
}
PROMPTS = [
    {"prompt": "2+2=", "expected": "4"},
    {"messages": [{"role": "system", "content": "Answer in one sentence."},
                  {"role": "user", "content": "Capital of France?"}], "expected": "Paris", "match": "contains"},
    {"messages": [{"role": "user", "content": "Order as JSON"}], "expected": {"qty": 2, "item": "tea"},
     "match": "json"},
    {"prompt": "say hello", "expected": "(?i)^hello", "match": "regex"},
    {"prompt": "ok", "expected": "OK"},  # both models echo "OK": right for both
    {"prompt": "no expectation"},  # sent and timed, not scored
]


@pytest.fixture(scope="module")
def server():
    app = make_app({
        "base": FakeModel(),
        "tuned": FakeModel(TUNED),
        "nousage": FakeModel(TUNED, usage=False),
    }, delay_s=0.02)
    with serve_in_thread(app) as url:
        yield url, app.state.stats


@pytest.fixture
def prompts(tmp_path):
    return write_lines(tmp_path / "prompts.jsonl", PROMPTS)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_report_fields_and_table(server, prompts, tmp_path, capsys):
    url, _ = server
    report_path = tmp_path / "out" / "report.json"
    code, out, err = run_cli(capsys, "--base-url", url, "--prompts", prompts, "--model", "tuned",
                             "--report", report_path)
    assert code == 0, err
    report = json.loads(report_path.read_text())
    for key in ("model", "n", "accuracy", "results", "latency_s_p50", "tokens_per_sec"):
        assert key in report
    assert report["model"] == "tuned" and report["n"] == 6
    assert report["accuracy"] == 1.0 and (report["scored"], report["correct"], report["errors"]) == (5, 5, 0)
    res = report["results"]
    assert [set(r) >= {"prompt", "output", "expected", "correct", "latency_s"} for r in res] == [True] * 6
    assert [r["correct"] for r in res] == [True, True, True, True, True, None]
    assert res[1]["prompt"] == "Capital of France?" and res[1]["output"] == "The capital is Paris."
    assert res[1]["messages"][0]["role"] == "system" and "messages" not in res[0]
    assert res[5]["output"] == "NO EXPECTATION" and not any("error" in r for r in res)
    # Token counts come from the server's usage (one per character in the echo server).
    assert [r["completion_tokens"] for r in res] == [len(r["output"]) for r in res]
    assert report["token_count"] == "usage"
    assert report["completion_tokens"] == sum(len(r["output"]) for r in res)
    latencies = sorted(r["latency_s"] for r in res)
    assert latencies[2] <= report["latency_s_p50"] <= latencies[3]
    assert report["tokens_per_sec"] > 0
    # The printed table: a header, one line per row, and the summary.
    lines = out.splitlines()
    assert lines[0].split() == ["#", "prompt", "expected", "answer", "correct", "latency"]
    assert len([ln for ln in lines if ln[:3].strip().isdigit()]) == 6
    assert "The capital is Paris." in out and "\\n" in out  # the fenced JSON answer stays on one line
    assert "model tuned: accuracy 100.0% (5/5 scored, 6 rows)" in out and "0 failed" in out
    assert f"report written to {report_path}" in out
    assert not list(report_path.parent.glob("*.tmp"))


def test_default_model_is_first_listed(server, prompts, capsys):
    url, _ = server
    code, out, _ = run_cli(capsys, "--base-url", url + "/v1/", "--prompts", prompts)
    assert code == 0
    assert "model base: accuracy 20.0% (1/5 scored, 6 rows)" in out


def test_stream_gives_same_answers_with_usage(server, prompts, tmp_path, capsys):
    url, stats = server
    paths = {}
    for mode in ("plain", "stream"):
        paths[mode] = tmp_path / f"{mode}.json"
        extra = ["--stream"] if mode == "stream" else []
        assert run_cli(capsys, "--base-url", url, "--prompts", prompts, "--model", "tuned",
                       "--report", paths[mode], *extra)[0] == 0
    plain, streamed = (json.loads(p.read_text()) for p in paths.values())
    assert [r["output"] for r in streamed["results"]] == [r["output"] for r in plain["results"]]
    assert streamed["accuracy"] == 1.0 and streamed["token_count"] == "usage"
    assert all(r["ttft_s"] <= r["latency_s"] for r in streamed["results"])
    assert streamed["stream"] is True
    assert stats["bodies"][-1]["stream"] is True
    assert stats["bodies"][-1]["stream_options"] == {"include_usage": True}
    assert stats["bodies"][-1]["temperature"] == 0.0


def test_concurrency_overlaps_requests_and_keeps_order(server, tmp_path, capsys):
    url, stats = server
    many = write_lines(tmp_path / "many.jsonl", [{"prompt": f"q{i}", "expected": f"Q{i}"} for i in range(12)])
    stats["max_in_flight"] = 0
    report_path = tmp_path / "r.json"
    code, _, _ = run_cli(capsys, "--base-url", url, "--prompts", many, "--model", "base",
                         "--concurrency", "4", "--report", report_path)
    assert code == 0
    report = json.loads(report_path.read_text())
    assert [r["output"] for r in report["results"]] == [f"Q{i}" for i in range(12)]
    assert report["accuracy"] == 1.0 and report["concurrency"] == 4
    assert 2 <= stats["max_in_flight"] <= 4


def test_compare_side_by_side(server, prompts, tmp_path, capsys):
    url, _ = server
    report_path = tmp_path / "cmp.json"
    code, out, err = run_cli(capsys, "--base-url", url, "--prompts", prompts,
                             "--compare", "base", "tuned", "--report", report_path, "--concurrency", "2")
    assert code == 0, err
    report = json.loads(report_path.read_text())
    a, b = report["compare"]
    assert (a["model"], b["model"]) == ("base", "tuned") and report["models"] == ["base", "tuned"]
    assert report["accuracy"] == {"base": 0.2, "tuned": 1.0}
    assert set(report["latency_s_p50"]) == set(report["tokens_per_sec"]) == {"base", "tuned"}
    assert len(a["results"]) == len(b["results"]) == 6
    diffs = report["differences"]
    assert [d["index"] for d in diffs] == [0, 1, 2, 3]
    assert diffs[0]["outputs"] == {"base": "2+2=", "tuned": "4"}
    assert diffs[0]["correct"] == {"base": False, "tuned": True}
    # Printed: accuracy, latency and tokens/s in two columns, then the differing rows.
    acc_line = next(ln for ln in out.splitlines() if ln.startswith("accuracy"))
    assert acc_line.split() == ["accuracy", "20.0%", "100.0%"]
    assert any(ln.startswith("p50 latency") for ln in out.splitlines())
    assert any(ln.startswith("tokens/s") for ln in out.splitlines())
    assert "rows where they differ (4 of 6):" in out
    assert "no expectation" not in out.split("rows where they differ")[1]


def test_words_counted_when_server_sends_no_usage(server, prompts, tmp_path, capsys):
    url, _ = server
    report_path = tmp_path / "r.json"
    for extra in ([], ["--stream"]):
        code, out, _ = run_cli(capsys, "--base-url", url, "--prompts", prompts, "--model", "nousage",
                               "--report", report_path, *extra)
        assert code == 0
        report = json.loads(report_path.read_text())
        assert report["token_count"] == "words"
        assert report["completion_tokens"] == sum(len(r["output"].split()) for r in report["results"])
        assert "tokens counted as words" in out


def test_unreachable_server(prompts, capsys):
    url = f"http://127.0.0.1:{free_port()}"
    code, out, err = run_cli(capsys, "--base-url", url, "--prompts", prompts)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert f"{url}/v1/models" in lines[0] and "start it with" in lines[0]


def test_unknown_model_lists_known_ones(server, prompts, capsys):
    url, stats = server
    before = stats["requests"]
    code, _, err = run_cli(capsys, "--base-url", url, "--prompts", prompts, "--compare", "base", "tunde")
    assert code == 2
    assert err.strip().startswith(f"error: model 'tunde' is not served at {url}; known models: base, tuned, nousage ")
    assert stats["requests"] == before  # checked before any prompt was sent


def test_bad_prompts_file_exits_2_with_file_line(server, tmp_path, capsys):
    url, _ = server
    bad = write_lines(tmp_path / "bad.jsonl", [{"prompt": "ok"}, "{oops"])
    code, out, err = run_cli(capsys, "--base-url", url, "--prompts", bad)
    assert code == 2 and out == ""
    assert err.startswith(f"error: {bad}:2: invalid JSON")
    code, _, err = run_cli(capsys, "--base-url", url, "--prompts", tmp_path / "missing.jsonl")
    assert code == 2 and "missing.jsonl: prompts file not found" in err


def test_server_error_on_one_row_marks_it_and_goes_on(server, tmp_path, capsys):
    url, _ = server
    path = write_lines(tmp_path / "p.jsonl", [
        {"prompt": "2+2=", "expected": "4"},
        {"prompt": "please FAIL here", "expected": "x"},
        {"messages": [{"role": "user", "content": "FAIL too"}]},
        {"prompt": "say hello", "expected": "hello there"},
    ])
    report_path = tmp_path / "r.json"
    for extra in ([], ["--stream"]):
        code, out, err = run_cli(capsys, "--base-url", url, "--prompts", path, "--model", "tuned",
                                 "--report", report_path, *extra)
        assert code == 1
        report = json.loads(report_path.read_text())
        res = report["results"]
        assert [("error" in r) for r in res] == [False, True, True, False]
        assert res[1]["error"].startswith("HTTP 500: the echo server was told to fail")
        assert res[1]["correct"] is False and res[2]["correct"] is None
        assert res[3]["output"] == "hello there" and res[3]["correct"] is True
        assert report["errors"] == 2 and report["accuracy"] == pytest.approx(2 / 3, abs=1e-6)
        assert "ERROR" in out
        assert "2 of 4 rows failed for model tuned (first, line 2: HTTP 500" in err


def test_timeout_marks_the_row(server, tmp_path, capsys):
    url, _ = server
    path = write_lines(tmp_path / "p.jsonl", [{"prompt": "SLOW one", "expected": "x"}, {"prompt": "ok", "expected": "OK"}])
    report_path = tmp_path / "r.json"
    code, _, err = run_cli(capsys, "--base-url", url, "--prompts", path, "--model", "base", "--timeout", "0.5",
                           "--report", report_path)
    assert code == 1
    res = json.loads(report_path.read_text())["results"]
    assert res[0]["error"] == "timed out after 0.5 s" and res[0]["correct"] is False
    assert res[1]["correct"] is True
    assert "line 1: timed out after 0.5 s" in err


def test_min_accuracy_sets_exit_code(server, prompts, capsys):
    url, _ = server
    args = ["--base-url", url, "--prompts", prompts, "--compare", "tuned", "base"]
    code, _, err = run_cli(capsys, *args, "--min-accuracy", "0.5")
    assert code == 1 and "accuracy of base is 20.0%, below --min-accuracy 50.0%" in err
    assert run_cli(capsys, *args, "--min-accuracy", "0.2")[0] == 0
    with pytest.raises(SystemExit) as exc:
        main(["--prompts", str(prompts), "--min-accuracy", "80"])
    assert exc.value.code == 2


def test_api_key_from_flag_or_environment(prompts, capsys, monkeypatch):
    monkeypatch.delenv("MLX_TUNE_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with serve_in_thread(make_app({"m": FakeModel()}, api_key="sekret")) as url:
        code, _, err = run_cli(capsys, "--base-url", url, "--prompts", prompts)
        assert code == 2 and "HTTP 401" in err and "--api-key" in err
        assert run_cli(capsys, "--base-url", url, "--prompts", prompts, "--api-key", "sekret")[0] == 0
        monkeypatch.setenv("MLX_TUNE_API_KEY", "sekret")
        assert run_cli(capsys, "--base-url", url, "--prompts", prompts)[0] == 0


def test_test_mlx_script_runs_as_a_subprocess_without_mlx(server, prompts, tmp_path):
    url, _ = server
    report_path = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLX_TUNE_API_KEY", "OPENAI_API_KEY")}
    proc = subprocess.run(
        [sys.executable, "test_mlx.py", "--base-url", url, "--prompts", str(prompts),
         "--model", "tuned", "--report", str(report_path), "--stream", "--concurrency", "3"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "model tuned: accuracy 100.0%" in proc.stdout
    assert json.loads(report_path.read_text())["accuracy"] == 1.0
    # A client only: importing it (and the script) must not load mlx.
    probe = ("import sys, runpy; runpy.run_path('test_mlx.py', run_name='probe'); "
             "import mlx_tune.evaluation; print(sorted(m for m in sys.modules if m.split('.')[0] == 'mlx'))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_against_mlx_lm_server_on_a_tiny_model(tmp_path, capsys):
    """Another real OpenAI-compatible server (mlx_lm.server) serving a tiny random model:
    its /v1/models answers an empty 200 without a Hugging Face cache, so --model is used
    unchecked; greedy plain and streamed answers must agree and carry real usage counts."""
    pytest.importorskip("mlx_lm")
    import httpx

    from mlx_tune.testing.tiny import save_tiny_folder

    folder = save_tiny_folder(tmp_path / "tiny")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_CACHE"] = str(tmp_path / "no-cache")
    server = subprocess.Popen([sys.executable, "-m", "mlx_lm", "server", "--model", str(folder),
                               "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60  # importing mlx_lm takes a few seconds on 2 cores
        while True:
            assert server.poll() is None, "mlx_lm.server exited"
            assert time.monotonic() < deadline, "mlx_lm.server did not start"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        prompts = write_lines(tmp_path / "p.jsonl", [
            {"prompt": "hello world", "expected": "hello"},
            {"messages": [{"role": "user", "content": "hi"}]},
        ])
        reports = []
        for extra in ([], ["--stream", "--concurrency", "2"]):
            report_path = tmp_path / f"r{len(reports)}.json"
            code, _, err = run_cli(capsys, "--base-url", url, "--prompts", prompts, "--model", "default_model",
                                   "--max-tokens", "6", "--report", report_path, *extra)
            assert code == 0, err
            assert "gave no model list" in err and "using --model default_model unchecked" in err
            reports.append(json.loads(report_path.read_text()))
        plain, streamed = reports
        assert [r["output"] for r in plain["results"]] == [r["output"] for r in streamed["results"]]
        assert plain["token_count"] == streamed["token_count"] == "usage"
        assert all(0 < r["completion_tokens"] <= 6 for r in plain["results"] + streamed["results"])
        assert plain["n"] == 2 and plain["accuracy"] in (0.0, 1.0)
    finally:
        server.terminate()
        server.wait(timeout=10)
