"""A studio workspace for the tests: a tiny base model, a runs folder with a real finished
training run (its adapter, metrics, a fuse and a test report), a data folder, and the
app as `mlx-tune serve` builds it, on uvicorn in a thread."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

from tests.server_util import serve_in_thread
from tests.train_workspace import workspace, write_data

API_KEY = "studio-test-key"


def make_runs(tmp: Path) -> dict[str, Path]:
    """``tmp/base`` (tiny model), ``tmp/runs/arith`` (trained 6 steps, in process), ``tmp/runs/data``."""
    from mlx_tune.config import load_config
    from mlx_tune.testing.tiny import save_tiny_folder
    from mlx_tune.training.run import run_train

    base = save_tiny_folder(tmp / "base")
    runs = tmp / "runs"
    runs.mkdir()
    write_data(runs / "data", n_train=24, n_valid=4)
    config = workspace(tmp, base, out_name="arith", iters=6, steps_per_eval=3, val_batches=1, save_every=3)
    cfg = load_config(config, [f"data={runs / 'data'}", f"output_dir={runs / 'arith'}"])
    run_train(cfg, log=lambda _msg: None)
    run = runs / "arith"
    (run / "fused").mkdir()
    (run / "fused" / "fuse_report.json").write_text(json.dumps(
        {"format": "mlx", "top1_agreement": 0.98, "quantization": {"bits": 4, "group_size": 64}}))
    report = {"model": "model", "n": 2, "accuracy": 1.0, "scored": 2, "correct": 2, "latency_s_p50": 0.1,
              "tokens_per_sec": 50.0, "errors": 0, "results": []}
    (run / "eval_report.json").write_text(json.dumps(
        {"compare": [dict(report, model="base", accuracy=0.5, correct=1),
                     dict(report, model="arith", accuracy=1.0, correct=2)], "models": ["base", "arith"]}))
    return {"base": base, "runs": runs, "run": run, "data": runs / "data", "tmp": tmp}


@contextmanager
def studio_server(paths: dict[str, Path], api_key: str | None = API_KEY, adapters: dict[str, str] | None = None):
    """The served base + studio, as ``mlx-tune serve --runs-dir RUNS`` wires them; yields (url, registry)."""
    from mlx_tune.model.loading import load_model
    from mlx_tune.server import build_app
    from mlx_tune.studio.routes import attach

    model, tokenizer, info = load_model(str(paths["base"]))
    app, registry, _ = build_app(model, tokenizer, info, api_key=api_key, adapters_root=str(paths["runs"]),
                                 max_batch=4, adapters=adapters)
    attach(app, registry, runs_dir=paths["runs"], data_dirs={"runs": paths["runs"]}, api_key=api_key)
    with serve_in_thread(app) as url:
        yield url, registry

