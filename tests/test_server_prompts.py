"""Shared prompts: the prefix cache (a repeated long system prompt is computed once,
answers are the same as without it, entries are per adapter, the byte bound holds),
``n`` answers from one prefill, and completions ``echo`` scoring the prompt's tokens."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.server_util import letter_bias, make_adapter, serve_in_thread

pytestmark = pytest.mark.accelerator

SYSTEM = "You are a careful assistant. " * 12


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from mlx_tune.testing.tiny import save_tiny_folder

    tmp = tmp_path_factory.mktemp("prefix")
    base = save_tiny_folder(tmp / "base")
    return base, make_adapter(base, tmp / "ad", rank=4, seed=3)


def answers(folders, cache_bytes: int):
    from mlx_tune.model.loading import load_model
    from mlx_tune.server import build_app

    base, adapter = folders
    model, tokenizer, info = load_model(str(base))
    app, _, engine = build_app(model, tokenizer, info, adapters={"ad": str(adapter)}, prompt_cache_bytes=cache_bytes)
    out = []
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        for model_name, question in (("base", "first?"), ("base", "second?"), ("ad", "second?"), ("ad", "third?"),
                                     ("base", "first?")):
            r = c.post("/v1/chat/completions", json={
                "model": model_name, "temperature": 0, "max_tokens": 10, "logit_bias": letter_bias(tokenizer),
                "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]})
            assert r.status_code == 200, r.text
            out.append(r.json()["choices"][0]["message"]["content"])
    return out, engine.prefix.stats(), engine.prefix


def test_reused_prefix_gives_the_same_answers(folders):
    cold, stats, _ = answers(folders, 0)
    warm, stats, cache = answers(folders, 64 * 2**20)
    assert warm == cold  # the cache changes no answer
    assert stats["hits"] == 3  # 2nd base, 2nd adapter, 5th base; the adapter's first request found nothing
    assert stats["reused_tokens"] >= 3 * 40
    assert {k[0][0] for k in cache.entries} == {None, "ad"}  # kept per adapter


def test_byte_bound_evicts_least_recently_used(folders):
    _, stats, cache = answers(folders, 64 * 2**20)
    one = max(e.nbytes for e in cache.entries.values())
    _, stats, small = answers(folders, int(one * 1.5))
    assert small.total <= int(one * 1.5) and len(small.entries) == 1


def test_n_answers_share_one_prefill(folders):
    from mlx_tune.model.loading import load_model
    from mlx_tune.server import build_app

    base, _ = folders
    model, tokenizer, info = load_model(str(base))
    app, _, engine = build_app(model, tokenizer, info, max_batch=4)
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "go"}]
    body = {"model": "base", "messages": msgs, "temperature": 1.0, "max_tokens": 8, "seed": 11,
            "logit_bias": letter_bias(tokenizer)}
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/v1/chat/completions", json={**body, "n": 3}).json()
        assert engine.prefix.hits >= 2  # rows 1 and 2 started from row 0's prefill
        assert [ch["index"] for ch in r["choices"]] == [0, 1, 2]
        texts = [ch["message"]["content"] for ch in r["choices"]]
        # Row i is the request alone with seed + i: the shared prefill changes nothing.
        alone = [c.post("/v1/chat/completions", json={**body, "seed": 11 + i}).json() for i in range(3)]
        assert texts == [a["choices"][0]["message"]["content"] for a in alone]
        assert r["usage"]["completion_tokens"] == sum(a["usage"]["completion_tokens"] for a in alone)
        assert r["usage"]["prompt_tokens"] == alone[0]["usage"]["prompt_tokens"]
        with c.stream("POST", "/v1/chat/completions", json={**body, "n": 2, "stream": True,
                                                           "stream_options": {"include_usage": True}}) as s:
            lines = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "[DONE]"
        chunks = [json.loads(x) for x in lines[:-1]]
        got = {0: "", 1: ""}
        finished = set()
        for ch in chunks:
            for choice in ch["choices"]:
                got[choice["index"]] += choice["delta"].get("content") or ""
                if choice["finish_reason"]:
                    finished.add(choice["index"])
        assert finished == {0, 1} and got == {0: texts[0], 1: texts[1]}
        assert chunks[-1]["usage"]["completion_tokens"] == sum(a["usage"]["completion_tokens"] for a in alone[:2])


def test_completions_echo_scores_the_prompt(folders):
    import mlx.core as mx

    from mlx_tune.model.loading import load_model
    from mlx_tune.server import build_app

    base, _ = folders
    model, tokenizer, info = load_model(str(base))
    app, _, _ = build_app(model, tokenizer, info)
    prompt = "the cat sat on the mat"
    ids = tokenizer.encode(prompt)
    logits = model(mx.array(ids)[None])[0].astype(mx.float32)
    want = (logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    want = [float(want[i - 1, ids[i]].item()) for i in range(1, len(ids))]
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/v1/completions", json={"model": "base", "prompt": prompt, "echo": True, "logprobs": 2,
                                            "max_tokens": 1, "temperature": 0}).json()
        choice = r["choices"][0]
        assert choice["text"].startswith(prompt)
        lp = choice["logprobs"]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing before the first token
        got = lp["token_logprobs"][1: len(ids)]
        assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4  # what lm-eval sums to score a continuation
        assert len(lp["tokens"]) == len(ids) + 1 and all(1 <= len(t) <= 2 for t in lp["top_logprobs"][1:])
        r = c.post("/v1/completions", json={"model": "base", "prompt": prompt, "echo": True, "max_tokens": 2,
                                            "temperature": 0, "stream": True})
        first = next(json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {"))
        assert first["choices"][0]["text"] == prompt


def test_constrained_rows_on_different_adapters_decode_together(folders):
    from concurrent.futures import ThreadPoolExecutor

    import jsonschema

    from mlx_tune.model.loading import load_model
    from mlx_tune.server import build_app

    base, adapter = folders
    model, tokenizer, info = load_model(str(base))
    app, _, engine = build_app(model, tokenizer, info, adapters={"ad": str(adapter)}, max_batch=8)
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    fmt = {"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}}
    free = {"logit_bias": letter_bias(tokenizer), "max_tokens": 10}

    def ask(c, model_name, extra):
        return c.post("/v1/chat/completions", json={"model": model_name, "temperature": 0, "max_tokens": 16,
                                                    "messages": [{"role": "user", "content": "go"}], **extra}).json()

    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        alone = {m: ask(c, m, free)["choices"][0]["message"]["content"] for m in ("base", "ad")}
        jobs = [("ad", fmt), ("base", free), ("ad", free), ("base", fmt)] * 2
        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(lambda j: ask(c, *j)["choices"][0]["message"]["content"], jobs))
    for (model_name, extra), text in zip(jobs, answers):
        if extra is fmt:
            jsonschema.validate(json.loads(text), schema)
        else:
            assert text == alone[model_name]  # neither the masks nor the other adapter reach a free row
    assert engine.mixing  # the rows shared one forward pass, each on its own adapter
