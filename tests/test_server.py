"""The OpenAI-compatible server, started for real with uvicorn on a tiny model.

Every endpoint, streaming, stop strings, seeds, logprobs, each client error (400 naming
the field, 401, 404, 413, 429, the context window), client disconnects, concurrent
requests, the official ``openai`` client, ``test_mlx.py`` and ``mlx-tune serve``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_util import letter_bias, serve_in_thread  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CTX = 256  # the tiny model's context window (max_position_embeddings)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from mlx_tune.model.loading import load_model
    from mlx_tune.testing.tiny import save_tiny_folder

    folder = save_tiny_folder(tmp_path_factory.mktemp("srv") / "tiny", max_position_embeddings=CTX)
    return folder, load_model(str(folder))


@pytest.fixture(scope="module")
def server(tiny):
    from mlx_tune.server import build_app

    folder, (model, tokenizer, info) = tiny
    app, registry, engine = build_app(model, tokenizer, info, max_queue=8, max_batch=4)
    with serve_in_thread(app) as url:
        yield url, tokenizer, engine


@pytest.fixture()
def http(server):
    url = server[0]
    with httpx.Client(base_url=url, timeout=60) as client:
        yield client


def chat(client, **body):
    body = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0, **body}
    return client.post("/v1/chat/completions", json=body)


def sse(response) -> tuple[list[dict], bool]:
    """(JSON chunks, whether ``data: [DONE]`` ended the stream)."""
    chunks, done = [], False
    for line in response.iter_lines():
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        if data == "[DONE]":
            done = True
            break
        chunks.append(json.loads(data))
    return chunks, done


# -- endpoints --------------------------------------------------------------------------


def test_models_and_health(http, tiny):
    folder = str(tiny[0])
    ids = [m["id"] for m in http.get("/v1/models").json()["data"]]
    assert ids[:2] == ["base", folder]
    assert http.get("/v1/models/base").json()["id"] == "base"
    health = http.get("/health").json()
    assert health["status"] == "ok" and health["model"] == folder


def test_chat_completion_shape_and_usage(http, server):
    tokenizer = server[1]
    r = chat(http, max_tokens=5)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "base" and isinstance(body["created"], int)
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(prompt_ids)
    assert 1 <= usage["completion_tokens"] <= 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_source_name_is_the_base_too(http, tiny):
    a = chat(http, model=str(tiny[0])).json()["choices"][0]["message"]["content"]
    b = chat(http).json()["choices"][0]["message"]["content"]
    assert a == b


def test_completion_and_token_prompt(http, server):
    tokenizer = server[1]
    bias = letter_bias(tokenizer)
    r = http.post("/v1/completions", json={"model": "base", "prompt": "abc", "max_tokens": 6, "temperature": 0,
                                           "logit_bias": bias})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion"
    text = body["choices"][0]["text"]
    assert len(text) == 6 and set(text) <= set("abcd") and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 6 and body["usage"]["prompt_tokens"] == len(tokenizer.encode("abc"))
    ids = tokenizer.encode("abc")
    same = http.post("/v1/completions", json={"model": "base", "prompt": ids, "max_tokens": 6, "temperature": 0,
                                              "logit_bias": bias}).json()
    assert same["choices"][0]["text"] == text


def test_max_completion_tokens_wins(http):
    body = chat(http, max_tokens=9, max_completion_tokens=3).json()
    assert body["usage"]["completion_tokens"] <= 3


def test_unknown_fields_are_ignored(http):
    assert chat(http, frobnicate={"x": 1}, parallel_tool_calls=False).status_code == 200


# -- streaming --------------------------------------------------------------------------


def test_stream_chat_matches_non_stream(http, server):
    bias = letter_bias(server[1])
    whole = chat(http, max_tokens=10, logit_bias=bias).json()
    with http.stream("POST", "/v1/chat/completions",
                     json={"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10,
                           "temperature": 0, "logit_bias": bias, "stream": True,
                           "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        chunks, done = sse(r)
    assert done
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert [c["choices"][0]["finish_reason"] for c in finals] == [whole["choices"][0]["finish_reason"]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_stream_completion_without_usage(http):
    with http.stream("POST", "/v1/completions", json={"model": "base", "prompt": "x", "max_tokens": 4,
                                                      "temperature": 0, "stream": True}) as r:
        chunks, done = sse(r)
    assert done and all(c["usage"] is None for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


# -- stop strings, seeds, logprobs ----------------------------------------------------------


def test_stop_string_is_never_echoed(http, server):
    bias = letter_bias(server[1])
    free = chat(http, max_tokens=24, logit_bias=bias).json()["choices"][0]["message"]["content"]
    stop = free[5:7]
    expected = free[: free.find(stop)]
    body = chat(http, max_tokens=24, logit_bias=bias, stop=[stop, "zzz"]).json()
    assert body["choices"][0]["message"]["content"] == expected
    assert body["choices"][0]["finish_reason"] == "stop"
    # Streaming: the stop string arrives one letter per token and is still never sent.
    with http.stream("POST", "/v1/chat/completions",
                     json={"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 24,
                           "temperature": 0, "logit_bias": bias, "stop": stop, "stream": True}) as r:
        chunks, _ = sse(r)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == expected


def test_seed_gives_the_same_text(http, server):
    bias = letter_bias(server[1], "abcdefgh", bias=30.0)
    ask = lambda seed: chat(http, max_tokens=16, temperature=1.5, seed=seed,  # noqa: E731
                            logit_bias=bias).json()["choices"][0]["message"]["content"]
    first = ask(7)
    assert ask(7) == first
    assert any(ask(s) != first for s in (8, 9, 10))


def test_sampling_parameters_accepted(http):
    r = chat(http, temperature=0.7, top_p=0.9, top_k=20, min_p=0.05, presence_penalty=0.5,
             frequency_penalty=0.2, repetition_penalty=1.1, seed=1)
    assert r.status_code == 200, r.text
    r = chat(http, temperature=1.0, top_k=10**9, seed=3)  # more than the vocabulary: no cut
    assert r.status_code == 200, r.text


def test_logprobs_chat_and_completion(http):
    body = chat(http, max_tokens=3, logprobs=True, top_logprobs=2).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == 3
    for item in content:
        assert item["logprob"] <= 0 and len(item["top_logprobs"]) == 2
        # greedy: the chosen token is the most likely one
        assert item["logprob"] == pytest.approx(item["top_logprobs"][0]["logprob"], abs=1e-5)
    body = http.post("/v1/completions", json={"model": "base", "prompt": "q", "max_tokens": 2, "temperature": 0,
                                               "logprobs": 1}).json()
    lp = body["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == 2 and len(lp["top_logprobs"][0]) == 1


# -- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("body, param", [
    ({"max_tokens": "many"}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": -1}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 2}, "top_p"),
    ({"n": 9}, "n"),
    ({"stream": "yes"}, "stream"),
    ({"stop": 5}, "stop"),
    ({"seed": 1.5}, "seed"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"model": 3}, "model"),
    ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema.schema"),
])
def test_bad_values_are_400_naming_the_field(http, body, param):
    r = chat(http, **body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and param.split(".")[0] in err["message"]
    assert err["type"] == "invalid_request_error"


def test_missing_field_and_bad_json(http):
    r = http.post("/v1/chat/completions", json={"model": "base"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = http.post("/v1/completions", json=["a", "list"])
    assert r.status_code == 400


def test_unknown_model_and_route_are_404(http):
    r = chat(http, model="nope")
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["param"] == "model" and err["code"] == "model_not_found" and "base" in err["message"]
    assert http.get("/v1/nothing").status_code == 404
    assert "error" in http.get("/v1/nothing").json()


def test_prompt_longer_than_context_is_400(http):
    r = http.post("/v1/completions", json={"model": "base", "prompt": "x" * (CTX + 10), "max_tokens": 4})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and str(CTX) in err["message"]
    # Near the end of the window the answer is cut to what fits.
    r = http.post("/v1/completions", json={"model": "base", "prompt": "x" * (CTX - 3), "max_tokens": 50,
                                           "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3


def test_token_ids_out_of_range(http):
    r = http.post("/v1/completions", json={"model": "base", "prompt": [1, 99999]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_auth_body_limit_and_cors_off(tiny):
    from mlx_tune.server import build_app

    folder, (model, tokenizer, info) = tiny
    app, _, _ = build_app(model, tokenizer, info, api_key="sekret", max_body_bytes=2000)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        body = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = c.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer sekret"}).status_code == 200
        assert c.get("/health").status_code == 200  # health stays open for probes
        big = {**body, "messages": [{"role": "user", "content": "y" * 5000}]}
        r = c.post("/v1/chat/completions", json=big, headers={"Authorization": "Bearer sekret"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        r = c.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer sekret",
                                                               "Origin": "http://evil.example"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_queue_full_is_429_and_disconnect_stops_generation(tiny):
    from mlx_tune.server import build_app

    folder, (model, tokenizer, info) = tiny
    app, _, engine = build_app(model, tokenizer, info, max_queue=1, max_batch=1)
    long = {"model": "base", "prompt": "go", "max_tokens": CTX - 10, "temperature": 0, "stream": True}
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=long) as running:
            lines = running.iter_lines()
            next(line for line in lines if line.startswith("data: "))  # it is generating now
            waiting = ThreadPoolExecutor(1).submit(
                c.post, "/v1/completions", json={"model": "base", "prompt": "q", "max_tokens": 2, "temperature": 0})
            deadline = time.monotonic() + 10
            while engine.stats()["queued"] < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            r = c.post("/v1/completions", json={"model": "base", "prompt": "z", "max_tokens": 2})
            assert r.status_code == 429, r.text
            assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "queue_full"
            done_before = engine.completed
        # The streaming client has gone: its generation stops, the waiting request runs.
        assert waiting.result(timeout=30).status_code == 200
        deadline = time.monotonic() + 10
        while engine.stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.stats() == {"queued": 0, "running": 0}
        assert engine.completed >= done_before + 1


def test_concurrent_requests_all_answered_like_alone(http, server):
    bias = letter_bias(server[1])
    prompts = [f"prompt {i} " * (i + 1) for i in range(6)]
    ask = lambda p: http.post("/v1/completions", json={  # noqa: E731
        "model": "base", "prompt": p, "max_tokens": 12, "temperature": 0, "logit_bias": bias}).json()
    alone = [ask(p)["choices"][0]["text"] for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = [r["choices"][0]["text"] for r in pool.map(ask, prompts)]
    assert together == alone


# -- clients ------------------------------------------------------------------------------


def test_official_openai_client(server):
    openai = pytest.importorskip("openai")
    url = server[0]
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    assert "base" in [m.id for m in client.models.list()]
    out = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                         temperature=0)
    assert out.choices[0].message.role == "assistant" and out.usage.completion_tokens >= 1
    stream = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=4, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    parts = [c for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in parts if c.choices) == out.choices[0].message.content
    assert parts[-1].usage.total_tokens == out.usage.total_tokens
    comp = client.completions.create(model="base", prompt="hello", max_tokens=3, temperature=0)
    assert comp.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="ghost", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="base", messages=[{"role": "user", "content": "x"}], n=9)
    assert info.value.body["param"] == "n"
    two = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "x"}], n=2, max_tokens=3)
    assert [c.index for c in two.choices] == [0, 1]


def test_test_mlx_script_against_the_server(server, tmp_path):
    url = server[0]
    rows = [{"prompt": "hello", "expected": "nothing like this"},
            {"messages": [{"role": "user", "content": "hi"}], "expected": "x", "match": "contains"}]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(ROOT / "test_mlx.py"), "--base-url", url, "--prompts", str(prompts),
                           "--model", "base", "--max-tokens", "4", "--report", str(report)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    data = json.loads(report.read_text())
    assert data["model"] == "base" and data["n"] == 2 and len(data["results"]) == 2
    assert all(r.get("error") in (None, "") for r in data["results"])


def test_serve_command_starts_and_warns_on_public_host(tiny, tmp_path):
    from mlx_tune.cli.serve import LOCAL_HOSTS  # noqa: F401  (import check: no heavy imports)

    folder = tiny[0]
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "mlx_tune", "serve", "--model", str(folder), "--host", "0.0.0.0",
                             "--port", str(port), "--log-level", "warning"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 60
        ok = False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ok = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
            except httpx.TransportError:
                pass
            if ok:
                break
            time.sleep(0.2)
        assert ok, proc.stderr.read() if proc.poll() is not None else "no answer"
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions",
                       json={"model": "base", "prompt": "a", "max_tokens": 2}, timeout=30)
        assert r.status_code == 200
    finally:
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert "without an API key" in err


def test_serve_command_errors_are_one_line(tmp_path):
    from mlx_tune.cli import main

    assert main(["serve"]) == 2
    assert main(["serve", "--model", str(tmp_path / "missing.gguf")]) == 2
    assert main(["serve", "--model", "x", "--adapter", "noequals"]) == 2


def test_smollm2_chat(smollm2_path):
    """The demo model through the server (skipped when the file is absent)."""
    from mlx_tune.model.loading import load_model
    from mlx_tune.server import build_app
    from mlx_tune.server.fastpath import prepare_for_serving

    model, tokenizer, info = load_model(smollm2_path)
    prepare_for_serving(model)
    app, _, _ = build_app(model, tokenizer, info)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=120) as c:
        r = c.post("/v1/chat/completions", json={"model": "base", "max_tokens": 12, "temperature": 0,
                                                 "messages": [{"role": "user", "content": "What is 2+2?"}]})
        assert r.status_code == 200, r.text
        text = r.json()["choices"][0]["message"]["content"]
        assert text.strip() and "\ufffd" not in text


def test_serve_settings_from_config_and_flags(tiny, tmp_path):
    import argparse

    from server_util import make_adapter

    from mlx_tune.cli.serve import add_arguments, settings

    folder = tiny[0]
    out = make_adapter(folder, tmp_path / "out", rank=2)
    extra = make_adapter(folder, tmp_path / "extra", rank=2, seed=3)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {folder}\nquantize: null\noutput_dir: {out}\ntrain:\n  iters: 10\n"
                   f"serve:\n  adapter_name: tuned\n  adapters:\n    extra: {extra}\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([str(cfg), "serve.port=9123", "--max-loras", "3", "--adapter", f"cli={extra}"])
    source, quantize, adapters, serve, template = settings(args)
    assert template is None
    assert source == str(folder) and quantize is None
    assert adapters == {"tuned": str(out), "extra": str(extra), "cli": str(extra)}
    assert serve.port == 9123 and serve.max_loras == 3 and serve.host == "127.0.0.1"
    # No adapter trained yet: only the base is served.
    args = parser.parse_args([str(cfg), f"output_dir={tmp_path / 'empty'}"])
    assert "tuned" not in settings(args)[2]


def test_non_streaming_client_that_leaves_stops_its_generation(tmp_path):
    from mlx_tune.model.loading import load_model
    from mlx_tune.server import build_app
    from mlx_tune.testing.tiny import save_tiny_folder

    model, tokenizer, info = load_model(str(save_tiny_folder(tmp_path / "long", max_position_embeddings=8192)))
    app, _, engine = build_app(model, tokenizer, info)
    with serve_in_thread(app) as url:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{url}/v1/completions", json={"model": "base", "prompt": "go", "max_tokens": 8000,
                                                      "temperature": 0}, timeout=1.0)
        deadline = time.monotonic() + 10
        while engine.stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.stats()["running"] == 0 and engine.completed == 0  # dropped, not finished
