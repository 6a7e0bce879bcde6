"""The studio's routes on the API server's FastAPI app.

``GET /studio`` and ``/studio/assets/*`` are the static page (no data in them); the
page's data comes from ``/studio/api/*``, which the server's Guard holds behind the same
API key as ``/v1`` (the page asks for the key once and keeps it for the tab's session).
Every studio response carries a Content-Security-Policy that allows this origin only:
the page can load, fetch and draw nothing from another host.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from mlx_tune.server.errors import ApiError
from mlx_tune.studio import views
from mlx_tune.studio.files import confine

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "font-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "X-Frame-Options": "DENY", "Cache-Control": "no-store"}
# The page's files: name -> media type. Nothing else under assets/ is served.
ASSETS = {
    "studio.js": "text/javascript",
    "studio.css": "text/css",
    "uPlot-1.6.32.iife.min.js": "text/javascript",
    "uPlot-1.6.32.min.css": "text/css",
    "uPlot-1.6.32.LICENSE": "text/plain",
}
MAX_ROWS = 50


def _asset(name: str) -> bytes:
    base = resources.files("mlx_tune.studio") / "assets"
    path = base / "vendor" / name if name.startswith("uPlot") else base / name
    return path.read_bytes()


def _json(data) -> JSONResponse:
    return JSONResponse(data, headers=HEADERS)


def attach(app: FastAPI, registry, *, runs_dir: str | Path | None = None,
           data_dirs: dict[str, Path] | None = None, api_key: str | None = None) -> None:
    """Add the studio to ``app``: runs under ``runs_dir``, data folders under ``data_dirs`` {label: root}."""
    runs_root = Path(runs_dir).expanduser().resolve() if runs_dir else None
    data_roots = {label: Path(p).expanduser().resolve() for label, p in (data_dirs or {}).items() if Path(p).is_dir()}

    def need_runs() -> Path:
        if runs_root is None or not runs_root.is_dir():
            raise ApiError(404, "no runs folder: start the server with --runs-dir DIR", param="runs_dir",
                           code="runs_dir_not_set")
        return runs_root

    @app.get("/studio", include_in_schema=False)
    async def page():
        return Response(_asset("index.html"), media_type="text/html; charset=utf-8", headers=HEADERS)

    @app.get("/studio/assets/{name}", include_in_schema=False)
    async def asset(name: str):
        if name not in ASSETS:
            raise ApiError(404, f"no studio asset '{name}'", code="not_found")
        return Response(_asset(name), media_type=ASSETS[name], headers=HEADERS)

    @app.get("/studio/needs-key", include_in_schema=False)
    async def needs_key():
        # Only whether a key is asked for, so the page asks before its first call (not after a 401).
        return _json({"api_key": bool(api_key)})

    @app.get("/studio/api/info", include_in_schema=False)
    async def info():
        return _json({"runs_dir": str(runs_root) if runs_root else None, "data_roots": sorted(data_roots),
                      "adapters_root": str(registry.adapters_root) if registry.adapters_root else None,
                      "base_models": list(registry.base_names)})

    @app.get("/studio/api/runs", include_in_schema=False)
    async def runs():
        root = need_runs()
        return _json({"root": str(root), "runs": await run_in_threadpool(views.run_list, root)})

    @app.get("/studio/api/run", include_in_schema=False)
    async def run(name: str, since: int = 0):
        root = need_runs()
        folder = root if name == "." else confine(root, name, param="name")
        if not (folder / "metrics.jsonl").is_file():
            raise ApiError(404, f"run '{name}': no metrics.jsonl there", param="name", code="not_found")
        return _json(await run_in_threadpool(views.run_detail, root, folder, max(0, since)))

    @app.get("/studio/api/datasets", include_in_schema=False)
    async def datasets():
        return _json({"folders": await run_in_threadpool(views.data_folders, data_roots)})

    @app.get("/studio/api/data", include_in_schema=False)
    async def data(root: str, path: str = "", split: str = "train", rows: int = 5):
        if root not in data_roots:
            raise ApiError(404, f"root '{root}': not a data root; have {', '.join(sorted(data_roots)) or 'none'}",
                           param="root", code="not_found")
        base = data_roots[root]
        folder = confine(base, path) if path else base
        n = min(max(1, rows), MAX_ROWS)
        return _json(await run_in_threadpool(views.data_view, folder, base, registry.tokenizer, split=split, rows=n))
