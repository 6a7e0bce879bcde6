"""Many adapters on one base through the real server: load, switch, unload, LRU eviction
and reload, limits (max_lora_rank, another base, paths outside the adapters root), and
concurrent requests on different adapters answered exactly as when served alone."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_util import letter_bias, make_adapter, serve_in_thread  # noqa: E402

# Backend-sensitive: `make test-accelerator` runs this file on the Metal/CUDA code path too.
pytestmark = pytest.mark.accelerator


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from mlx_tune.model.loading import load_model
    from mlx_tune.server import build_app
    from mlx_tune.testing.tiny import save_tiny_folder

    tmp = tmp_path_factory.mktemp("adapters")
    base = save_tiny_folder(tmp / "base")
    other = save_tiny_folder(tmp / "other", hidden_size=32, head_dim=8, intermediate_size=64)
    root = tmp / "root"
    for i, name in enumerate(("a1", "a2", "a3")):
        make_adapter(base, root / name, rank=4, seed=10 + i)
    make_adapter(base, root / "big", rank=64, seed=5)
    make_adapter(other, root / "foreign", rank=4, seed=6)
    make_adapter(base, tmp / "outside", rank=4, seed=7)
    model, tokenizer, info = load_model(str(base))
    app, registry, engine = build_app(model, tokenizer, info, adapters={"a1": str(root / "a1")},
                                      adapters_root=str(root), max_loras=2, max_lora_rank=32, max_batch=8)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client, registry, tokenizer, tmp


def ask(client, model, tokenizer, prompt="tell me", n=12):
    r = client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0,
                                             "logit_bias": letter_bias(tokenizer)})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_lifecycle_switch_evict_reload_unload(setup):
    client, registry, tok, _ = setup
    base, a1 = ask(client, "base", tok), ask(client, "a1", tok)
    assert a1 != base  # the adapter changes the answer
    r = client.post("/v1/adapters", json={"name": "a2", "path": "a2"})
    assert r.status_code == 201 and r.json()["rank"] == 4 and r.json()["resident"]
    a2 = ask(client, "a2", tok)
    assert a2 not in (base, a1)
    # Alternating never changes an answer (switching is only a name on each layer).
    assert [ask(client, m, tok) for m in ("a1", "a2", "base", "a1")] == [a1, a2, base, a1]

    # max_loras=2: loading a3 evicts the least recently used (a2), listed but not resident.
    assert client.post("/v1/adapters", json={"name": "a3", "path": "a3"}).status_code == 201
    cards = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert set(cards) >= {"base", "a1", "a2", "a3"}
    assert not cards["a2"]["resident"] and cards["a1"]["resident"] and cards["a3"]["resident"]
    assert len(registry.resident) == 2
    # Asking for a2 reloads it from disk (evicting a1 now), with the same answer.
    assert ask(client, "a2", tok) == a2
    assert "a2" in registry.resident and len(registry.resident) == 2

    r = client.delete("/v1/adapters/a3")
    assert r.status_code == 200 and r.json()["name"] == "a3"
    assert client.delete("/v1/adapters/a3").status_code == 404
    r = client.post("/v1/completions", json={"model": "a3", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    assert ask(client, "base", tok) == base  # unloading leaves the base as it was
    names = [a["name"] for a in client.get("/v1/adapters").json()]
    assert names == ["a1", "a2"]


@pytest.mark.parametrize("path, status, words", [
    ("../outside", 403, "outside the adapters root"),
    ("a1/../../outside", 403, "outside the adapters root"),
    ("ABSOLUTE_OUTSIDE", 403, "outside the adapters root"),
    ("missing", 404, "does not exist"),
    ("big", 400, "max_lora_rank"),
    ("foreign", 400, "base mismatch"),
])
def test_refused_loads(setup, path, status, words):
    client, registry, _, tmp = setup
    if path == "ABSOLUTE_OUTSIDE":
        path = str(tmp / "outside")
    before = dict(registry.entries)
    r = client.post("/v1/adapters", json={"name": "x1", "path": path})
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]
    assert registry.entries == before and "x1" not in registry.resident


def test_name_conflicts_and_bad_names(setup):
    client = setup[0]
    assert client.post("/v1/adapters", json={"name": "a1", "path": "a1"}).status_code == 409
    assert client.post("/v1/adapters", json={"name": "base", "path": "a1"}).status_code == 409
    r = client.post("/v1/adapters", json={"name": "../x", "path": "a1"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "name"
    assert client.delete("/v1/adapters/nobody").status_code == 404


def test_concurrent_requests_on_different_adapters(setup):
    client, registry, tok, _ = setup
    if "a2" not in registry.entries:
        client.post("/v1/adapters", json={"name": "a2", "path": "a2"})
    jobs = [(m, f"question {i}") for i, m in enumerate(["base", "a1", "a2", "a1", "base", "a2", "a1", "a2"])]
    alone = [ask(client, m, tok, p) for m, p in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda j: ask(client, j[0], tok, j[1]), jobs))
    assert together == alone
    assert not registry.busy  # every request released its adapter


def test_concurrent_different_adapters_share_forward_passes(setup):
    client, registry, tok, _ = setup
    from mlx_tune.server import mixing

    assert mixing.install_row_shim()
    jobs = [(m, f"shared {i}") for i, m in enumerate(["a1", "a2", "base", "a1", "a2", "base"])]
    with ThreadPoolExecutor(len(jobs)) as pool:
        list(pool.map(lambda j: ask(client, j[0], tok, j[1], n=24), jobs))
    assert setup_route(registry).most_mixed >= 2


def setup_route(registry):
    """The engine's row route, found through the pseudo adapter on any wrapper."""
    from mlx_tune.server.mixing import ROUTE

    for w in registry._wrappers:
        if ROUTE in w.adapters:
            return w.adapters[ROUTE]._route.value
    raise AssertionError("no layer ever mixed rows")


def test_row_mixing_equals_each_adapter_alone(tmp_path):
    """Rows on base / a / b in one pass give each row's own model output."""
    import mlx.core as mx

    from mlx_tune.adapters import AdapterManager
    from mlx_tune.model.loading import load_model
    from mlx_tune.server.mixing import RowRoute, RowRouter, install
    from mlx_tune.testing.tiny import save_tiny_folder

    base = save_tiny_folder(tmp_path / "base")
    make_adapter(base, tmp_path / "a", rank=4, seed=1)
    make_adapter(base, tmp_path / "b", rank=8, seed=2, targets=["q_proj", "down_proj"])
    model, _, _ = load_model(str(base))
    manager = AdapterManager(model)
    manager.add("a", tmp_path / "a")
    manager.add("b", tmp_path / "b")
    x = mx.array([[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16], [5, 6, 7, 8]])
    choice = [None, "a", "b", "b"]
    alone = []
    for i, name in enumerate(choice):
        manager.activate(name)
        alone.append(model(x[i:i + 1]))
    route = RowRoute()
    install([w for w in manager._wrappers], route)
    router = RowRouter(model, route, lambda uid: choice[uid])
    router.rows = [0, 1, 2, 3]
    mixed = router(x)
    assert route.most_mixed == 3
    for i in range(len(choice)):
        assert mx.allclose(mixed[i:i + 1], alone[i], atol=1e-4).item(), i
    assert not mx.allclose(alone[0], alone[1], atol=1e-3).item()  # the adapters matter
