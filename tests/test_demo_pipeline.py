"""`make demo`'s own script, shortened: the same four steps through the same entry points
(data_transform.py, train_by_mlx.sh, convert_and_serve.sh in the background, test_mlx.py
--compare), on a tiny model with two training steps and three prompts, so it cannot rot."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(sys.platform == "win32", reason="bash scripts")
def test_demo_script_runs_every_step_end_to_end(tmp_path, tiny_folder):
    config = tmp_path / "demo.yaml"
    config.write_text(
        f"model: {tiny_folder}\nquantize: null\n"
        "lora: {rank: 4, alpha: 8, target_modules: [q_proj, v_proj]}\n"
        "train: {iters: 2, batch_size: 2, max_seq_length: 128, steps_per_report: 1, steps_per_eval: 2, "
        "val_batches: 1, save_every: 2}\n"
        f"output_dir: {tmp_path / 'out'}\nfused_dir: {tmp_path / 'out' / 'fused'}\n"
        "serve: {adapter_name: demo-adapter}\n"
    )
    prompts = tmp_path / "prompts.jsonl"
    rows = [json.loads(line) for line in (ROOT / "data" / "demo_prompts.jsonl").read_text().splitlines()[:3]]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {**os.environ, "DEMO_CONFIG": str(config), "DEMO_PROMPTS": str(prompts), "DEMO_PORT": str(free_port()),
           "DEMO_DATA_OUT": str(tmp_path / "data"), "PYTHONPATH": str(ROOT)}
    r = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    for step in ("1/4 data", "2/4 train", "3/4 fuse + serve", "4/4 test", "accuracy on held-out demo prompts",
                 "studio: 1 runs listed"):  # the served studio sees the run that was just trained
        assert step in out, step
    report = json.loads((tmp_path / "out" / "eval_report.json").read_text())
    assert report["models"] == ["base", "demo-adapter"] and report["n"] == 3
    for name in ("adapters.safetensors", "adapter_config.json", "metrics.jsonl"):
        assert (tmp_path / "out" / name).is_file(), name
    assert (tmp_path / "out" / "fused" / "config.json").is_file()
    assert (tmp_path / "data" / "train.jsonl").is_file()
