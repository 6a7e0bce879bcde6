"""A tiny training workspace for subprocess tests: a tiny model folder, JSONL data, a config.

The data is a small arithmetic chat task, so the loss falls within a few dozen steps.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def write_data(folder: Path, n_train: int = 160, n_valid: int = 16, seed: int = 0) -> Path:
    rnd = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)

    def record() -> dict:
        a, b = rnd.randint(0, 99), rnd.randint(0, 99)
        return {"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                             {"role": "assistant", "content": f"{a} + {b} = {a + b}"}]}

    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_valid)):
        with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for _ in range(n):
                f.write(json.dumps(record()) + "\n")
    return folder


def workspace(tmp: Path, model_folder: Path, out_name: str = "out", **train) -> Path:
    """Write ``tmp/config.yaml`` (tiny model, dense fp32, dropout on) and return its path."""
    data = tmp / "data"
    if not data.is_dir():
        write_data(data)
    cfg = {
        "model": str(model_folder),
        "quantize": None,
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.1, "target_modules": "all-linear"},
        "data": str(data),
        "train": {"iters": 20, "batch_size": 4, "max_seq_length": 64, "learning_rate": 2e-3,
                  "warmup_steps": 2, "steps_per_report": 1, "steps_per_eval": 1000, "save_every": 5,
                  "keep_checkpoints": 2, "seed": 3, **train},
        "output_dir": str(tmp / out_name),
    }
    path = tmp / f"{out_name}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def env() -> dict:
    e = dict(os.environ)
    if e.pop("MLX_TUNE_TESTS_PINNED_WIDTH", None):  # conftest's pin is for the pytest process only
        e.pop("MLX_BFS_MAX_WIDTH", None)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def train_cmd(config: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "mlx_tune", "train", str(config), *overrides]


def run_train(config: Path, *overrides: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(config, *overrides), env=env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def losses(metrics: Path) -> dict[int, float]:
    """step -> train loss from a metrics.jsonl."""
    out = {}
    for line in metrics.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if "loss" in row:
            out[row["step"]] = row["loss"]
    return out


def start_and_signal(config: Path, at_step: int, sig: int, *overrides: str, timeout: float = 120):
    """Start a training subprocess, send ``sig`` once metrics.jsonl shows ``step >= at_step``.

    Returns (CompletedProcess, the step seen when signalled).
    """
    metrics = Path(yaml.safe_load(config.read_text())["output_dir"]) / "metrics.jsonl"
    proc = subprocess.Popen(train_cmd(config, *overrides), env=env(), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    seen = -1
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.is_file():
                steps = [json.loads(x).get("step", -1) for x in metrics.read_text().splitlines() if x.endswith("}")]
                seen = max(steps, default=-1)
                if seen >= at_step:
                    proc.send_signal(sig)
                    break
            time.sleep(0.01)
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            out, err = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), seen


def start_train(config: Path, *overrides: str) -> subprocess.Popen:
    """A training subprocess in the background (finish it with ``.communicate()``)."""
    return subprocess.Popen(train_cmd(config, *overrides), env=env(), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


__all__ = ["write_data", "workspace", "run_train", "losses", "start_and_signal", "start_train", "signal"]
