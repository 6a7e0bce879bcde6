"""Run trackers (``report_to: [tensorboard, wandb, mlflow]``): loop callbacks over optional libraries.

Each tracker logs every numeric field of the metrics rows (``on_report``: train rows,
``on_eval``: validation, eval-accuracy and early-stopping rows) at the row's ``step``,
and at the end (``finish``) the run's config and the loss plot. Each library is imported
only when its tracker is asked for; a missing one is a one-line ``UserError`` naming
the extra to install (``pip install 'mlx-tune[tracking]'``) before any step runs.

- ``tensorboard``: event files in ``OUTPUT_DIR/tensorboard`` (tensorboardX's writer, the
  same file format; ``tensorboard --logdir OUTPUT_DIR/tensorboard`` shows them), config as
  text, the plot as an image.
- ``wandb``: a W&B run in ``OUTPUT_DIR`` (``WANDB_MODE=offline`` works without network;
  ``wandb sync`` uploads it later); project ``$WANDB_PROJECT`` or ``mlx-tune``.
- ``mlflow``: a run in ``$MLFLOW_TRACKING_URI`` or, by default, the local file store
  ``OUTPUT_DIR/mlruns``; experiment ``$MLFLOW_EXPERIMENT_NAME`` or ``mlx-tune``.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlx_tune.errors import UserError

_EXTRA = "pip install 'mlx-tune[tracking]'"


def _need(module: str, tracker: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"report_to: {tracker} needs the {module.split('.')[0]} package; {_EXTRA}") from None


def numbers(row: dict) -> dict[str, float]:
    """The finite numeric fields of a metrics row except ``step`` (booleans left out)."""
    return {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(v)}


class _Tracker:
    def log(self, step: int, values: dict[str, float]) -> None:
        raise NotImplementedError

    def on_report(self, row: dict) -> None:
        values = numbers(row)
        if values:
            self.log(int(row["step"]), values)

    on_eval = on_bad_step = on_report

    def finish(self, config: dict, plot: Path | None) -> None:
        self.close()

    def close(self) -> None:
        pass


class TensorBoardTracker(_Tracker):
    def __init__(self, out: Path):
        tbx = _need("tensorboardX", "tensorboard")
        self.logdir = out / "tensorboard"
        self.writer = tbx.SummaryWriter(logdir=str(self.logdir))

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def finish(self, config: dict, plot: Path | None) -> None:
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)
        if plot is not None:
            import numpy as np
            from PIL import Image  # matplotlib's own dependency: there whenever the plot is

            self.writer.add_image("loss_plot", np.asarray(Image.open(plot).convert("RGB")), 0, dataformats="HWC")
        self.close()

    def close(self) -> None:
        self.writer.close()


class WandbTracker(_Tracker):
    def __init__(self, out: Path, name: str):
        wandb = _need("wandb", "wandb")
        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "mlx-tune"), name=name, dir=str(out),
                              reinit="finish_previous")

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def finish(self, config: dict, plot: Path | None) -> None:
        self.run.config.update(config, allow_val_change=True)
        if plot is not None:
            self.run.log({"loss_plot": self.wandb.Image(str(plot))})
        self.close()

    def close(self) -> None:
        self.run.finish()


class MlflowTracker(_Tracker):
    def __init__(self, out: Path, name: str):
        mlflow = _need("mlflow", "mlflow")
        self.mlflow = mlflow
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # MLflow 3 keeps the file store (no database needed) behind this switch
            uri = (out / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = mlflow.tracking.MlflowClient(tracking_uri=uri)
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", "mlx-tune")
        found = self.client.get_experiment_by_name(experiment)
        exp_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(exp_id, run_name=name).info.run_id
        self.uri = uri

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def finish(self, config: dict, plot: Path | None) -> None:
        self.client.log_dict(self.run_id, config, "config.json")
        if plot is not None:
            self.client.log_artifact(self.run_id, str(plot))
        self.close()

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def open_trackers(cfg, out: Path, log: Callable[[str], None] = print) -> list[Any]:
    """The trackers ``cfg.report_to`` names, opened (rank 0 only)."""
    name = Path(cfg.output_dir).name
    makers: dict[str, Callable[[], Any]] = {
        "tensorboard": lambda: TensorBoardTracker(out),
        "wandb": lambda: WandbTracker(out, name),
        "mlflow": lambda: MlflowTracker(out, name),
    }
    if cfg.report_to:
        out.mkdir(parents=True, exist_ok=True)
    trackers = []
    for which in cfg.report_to:
        trackers.append(makers[which]())
        log(f"report_to: {which} tracking this run")
    return trackers
