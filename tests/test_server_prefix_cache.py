"""The prompt prefix cache: a repeated long system prompt is computed once, answers are
the same as without the cache, entries are per adapter, and the byte bound holds."""

from __future__ import annotations

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
