"""report_to: each tracker against its real library, offline, with the files it leaves read back."""

from __future__ import annotations

import glob
import importlib.util
import struct
import time
from pathlib import Path

import pytest
from needs import missing

from mlx_tune.config import config_from_dict
from mlx_tune.errors import UserError
from mlx_tune.training.callbacks import MetricsLog, plot_losses
from mlx_tune.training.tracking import numbers, open_trackers

ROWS = [
    {"step": 1, "loss": 2.5, "learning_rate": 1e-3, "tokens_per_sec": 100.0, "peak_memory_gb": 0.1},
    {"step": 2, "loss": 2.0, "learning_rate": 1e-3, "tokens_per_sec": 110.0, "peak_memory_gb": 0.1},
    {"step": 2, "val_loss": 2.2, "val_perplexity": 9.0},
    {"step": 2, "eval_accuracy": 0.5, "eval_accuracy_exact": 0.5},
    {"step": 2, "early_stopped": True, "reason": "why", "best_step": 2},
]


def _need(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        missing(f"{module} is not installed (the tracking extra: pip install 'mlx-tune[tracking]')")


def _run(tmp_path: Path, which: str):
    cfg = config_from_dict({"model": "m", "train": {"iters": 2}, "output_dir": str(tmp_path / "run"), "report_to": [which]})
    out = Path(cfg.output_dir)
    (tracker,) = open_trackers(cfg, out, log=lambda m: None)
    log = MetricsLog(out / "metrics.jsonl")
    for row in ROWS:
        log.write(row)
        (tracker.on_eval if "loss" not in row else tracker.on_report)(row)
    plot = plot_losses(out / "metrics.jsonl", out / "loss.png")
    tracker.finish({"model": "m", "train": {"iters": 2}}, plot)
    return out, plot


def test_numbers_are_the_finite_numeric_fields():
    assert numbers({"step": 3, "loss": 1.0, "early_stopped": True, "reason": "x", "v": float("nan"), "n": 4}) == \
        {"loss": 1.0, "n": 4.0}


def test_tensorboard_event_file(tmp_path):
    _need("tensorboardX")
    from tensorboardX.proto import event_pb2

    out, plot = _run(tmp_path, "tensorboard")
    (path,) = glob.glob(str(out / "tensorboard" / "events.out.tfevents.*"))
    data, pos, scalars, tags = Path(path).read_bytes(), 0, {}, set()
    while pos < len(data):  # TFRecord: u64 length, u32 crc, payload, u32 crc
        (n,) = struct.unpack("<Q", data[pos:pos + 8])
        event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
        pos += 16 + n
        for v in event.summary.value:
            tags.add(v.tag)
            if v.HasField("simple_value"):
                scalars[(v.tag, event.step)] = v.simple_value
    assert scalars[("loss", 1)] == pytest.approx(2.5) and scalars[("loss", 2)] == pytest.approx(2.0)
    assert scalars[("eval_accuracy", 2)] == pytest.approx(0.5) and scalars[("val_loss", 2)] == pytest.approx(2.2)
    assert ("best_step", 2) in scalars and not any(t[0] == "early_stopped" for t in scalars)
    assert any(t.startswith("config") for t in tags) and (plot is None or "loss_plot" in tags)


def test_mlflow_local_file_store(tmp_path, monkeypatch):
    _need("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from mlflow.tracking import MlflowClient

    out, plot = _run(tmp_path, "mlflow")
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("mlx-tune").experiment_id])
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [(1, 2.5), (2, 2.0)]
    assert run.data.metrics["eval_accuracy"] == 0.5 and run.info.status == "FINISHED"
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config.json" in names and (plot is None or "loss.png" in names)


def _wandb_records(path: str):
    """The protobuf records of a W&B run file (LevelDB log blocks: crc u32, length u16, type u8)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf, block = Path(path).read_bytes(), 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0:
            break
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # FULL or LAST
            yield pb.Record.FromString(buf)
            buf = b""


def _has_exit(path: str) -> bool:
    try:
        return any(r.WhichOneof("record_type") == "exit" for r in _wandb_records(path))
    except Exception:  # a record still being written
        return False


@pytest.mark.slow
def test_wandb_offline_run(tmp_path, monkeypatch):
    _need("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out, _ = _run(tmp_path, "wandb")
    (path,) = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    deadline = time.monotonic() + 60
    # wandb-core (its own process) may still be writing the file when finish() returns:
    # read once its closing "exit" record is there.
    while not _has_exit(path) and time.monotonic() < deadline:
        time.sleep(0.2)
    history, config = {}, {}
    for rec in _wandb_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            items = {(i.key or "/".join(i.nested_key)): i.value_json for i in rec.history.item}
            for k, v in items.items():
                if not k.startswith("_"):
                    history[(k, int(items["_step"]))] = v
        elif kind == "config":
            config.update({i.key: i.value_json for i in rec.config.update})
    assert float(history[("loss", 1)]) == 2.5 and float(history[("eval_accuracy", 2)]) == 0.5
    assert "train" in config and any(k.startswith("loss_plot") for k, _ in history)


def test_a_tracker_without_its_library_is_a_one_line_error(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name.split(".")[0] == "wandb":
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    monkeypatch.setattr("importlib.import_module", lambda name: no_wandb(name))
    cfg = config_from_dict({"model": "m", "train": {"iters": 2}, "output_dir": str(tmp_path), "report_to": ["wandb"]})
    with pytest.raises(UserError, match=r"report_to: wandb needs the wandb package; pip install 'mlx-tune\[tracking\]'"):
        open_trackers(cfg, tmp_path)
