"""The studio's routes over a real server: the static page and its headers, the key on its
data, runs and their reports, the data view's trained mask, and confinement (``..``,
absolute paths, symlinks)."""

from __future__ import annotations

import os

import httpx
import pytest

from tests.studio_util import API_KEY, make_runs, studio_server

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    paths = make_runs(tmp_path_factory.mktemp("studio"))
    outside = paths["tmp"] / "secret"
    outside.mkdir()
    (outside / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    (outside / "train.jsonl").write_text('{"text": "secret"}\n')
    os.symlink(outside, paths["runs"] / "link")
    with studio_server(paths) as (url, registry), httpx.Client(base_url=url, timeout=60) as client:
        yield client, paths, registry


def test_page_is_static_with_a_strict_csp(studio):
    client, _, _ = studio
    r = client.get("/studio")  # no key needed: the page holds no data
    assert r.status_code == 200 and "mlx_tune studio" in r.text
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    assert "http" not in r.text.replace("http-equiv", "")  # nothing from another host
    for name in ("studio.js", "studio.css", "uPlot-1.6.32.iife.min.js", "uPlot-1.6.32.LICENSE"):
        assert client.get(f"/studio/assets/{name}").status_code == 200
    assert client.get("/studio/assets/..%2Froutes.py").status_code == 404
    assert client.get("/studio/assets/index.py").status_code == 404


def test_data_routes_need_the_key(studio):
    client, _, _ = studio
    for path in ("/studio/api/runs", "/studio/api/info", "/studio/api/datasets"):
        assert client.get(path).status_code == 401
        assert client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get(path, headers=AUTH).status_code == 200


def test_runs_list_detail_and_reports(studio):
    client, _, _ = studio
    runs = client.get("/studio/api/runs", headers=AUTH).json()["runs"]
    by_name = {r["name"]: r for r in runs}
    assert "arith" in by_name and "link" not in by_name  # the symlinked folder outside is never listed
    run = by_name["arith"]
    assert run["steps"] == 6 and run["has_adapter"] and run["last_loss"] > 0
    detail = client.get("/studio/api/run", params={"name": "arith"}, headers=AUTH).json()
    steps = [r["step"] for r in detail["rows"] if "loss" in r]
    assert steps == list(range(1, 7))
    assert detail["charts"]["loss"] == ["loss", "val_loss"] and "learning_rate" in detail["charts"]["learning rate"]
    assert detail["config"]["lora.rank"] == 4
    assert detail["fuse_report"]["top1_agreement"] == 0.98
    assert detail["test_reports"][0]["file"] == "eval_report.json"
    tail = client.get("/studio/api/run", params={"name": "arith", "since": detail["total_rows"] - 1},
                      headers=AUTH).json()
    assert tail["rows"] == detail["rows"][-1:]  # the page polls for the new rows only


@pytest.mark.parametrize("name", ["../secret", "/etc", "link", "arith/../../secret", "nope"])
def test_run_paths_are_confined(studio, name):
    client, paths, _ = studio
    r = client.get("/studio/api/run", params={"name": name}, headers=AUTH)
    assert r.status_code in (403, 404), r.text
    assert "secret" not in r.text or r.status_code == 403
    if name == "link":
        assert r.status_code == 403 and "outside" in r.json()["error"]["message"]


def test_data_view_shows_the_trained_mask(studio):
    from mlx_tune.data.inspect import inspect_rows

    client, paths, registry = studio
    folders = client.get("/studio/api/datasets", headers=AUTH).json()["folders"]
    assert {"root": "runs", "path": "data"} in folders and all("link" not in f["path"] for f in folders)
    view = client.get("/studio/api/data", params={"root": "runs", "path": "data", "rows": 2}, headers=AUTH).json()
    assert view["counts"] == {"train": 24, "valid": 4, "test": 4} and view["format"] == "chat"
    want = inspect_rows(paths["data"] / "train.jsonl", registry.tokenizer, rows=2)
    for got, row in zip(view["rows"], want):
        trained = "".join(s["text"] for s in got["segments"] if s["trained"])
        assert trained == "".join(s.text for s in row.segments if s.trained) and trained.strip()
        assert got["trained"] == sum(row.train) < got["tokens"]
    assert sum(view["lengths"]["counts"]) == 24
    for bad in ("../secret", "/tmp", "link"):
        r = client.get("/studio/api/data", params={"root": "runs", "path": bad}, headers=AUTH)
        assert r.status_code == 403, (bad, r.text)
    assert client.get("/studio/api/data", params={"root": "elsewhere"}, headers=AUTH).status_code == 404


def test_a_runs_adapter_loads_through_the_api(studio):
    client, paths, _ = studio
    r = client.post("/v1/adapters", json={"name": "arith", "path": str(paths["run"])}, headers=AUTH)
    assert r.status_code == 201, r.text
    ids = [m["id"] for m in client.get("/v1/models", headers=AUTH).json()["data"]]
    assert "arith" in ids
    r = client.post("/v1/adapters", json={"name": "leak", "path": str(paths["runs"] / "link")}, headers=AUTH)
    assert r.status_code == 403
