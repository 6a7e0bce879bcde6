"""``mlx-tune runs DIR``: tiny real runs compared, differing config keys found, bad input handled."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_workspace import ROOT, env, run_train, workspace  # noqa: E402

from mlx_tune.errors import UserError  # noqa: E402
from mlx_tune.training.runs import differing_keys, format_runs, list_runs, runs_as_dicts  # noqa: E402

FAST = {"iters": 4, "steps_per_eval": 2, "save_every": 2, "val_batches": 1}


def cli(*args):
    return subprocess.run([sys.executable, "-m", "mlx_tune", *args], capture_output=True, text=True, cwd=ROOT, env=env(),
                          timeout=300)


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory, tiny_folder) -> Path:
    """Three real runs: a (rank 4, lr 2e-3), b (rank 8), sweep/c (lr 1e-3), all 4 steps."""
    root = tmp_path_factory.mktemp("runs")
    (root / "sweep").mkdir()
    configs = [workspace(root, tiny_folder, "a", **FAST), workspace(root, tiny_folder, "b", **FAST),
               workspace(root, tiny_folder, "sweep/c", **FAST, learning_rate=1e-3)]
    procs = [run_train(configs[0]), run_train(configs[1], "lora.rank=8"), run_train(configs[2])]
    for p in procs:
        assert p.returncode == 0, p.stderr
    return root


def test_table_columns_and_differing_keys(runs_dir):
    runs = list_runs(runs_dir)
    assert [r.name for r in runs] == ["a", "b", "sweep/c"]
    assert differing_keys(runs) == ["lora.rank", "train.learning_rate"]
    for r in runs:
        assert r.steps == 4 and r.last_loss > 0 and r.best_val_step in (2, 4) and r.best_val_loss > 0
        assert r.tokens_per_sec > 0 and r.peak_memory_gb is not None and r.malformed_lines == 0
    table = format_runs(runs, runs_dir).splitlines()
    assert table[0].split()[:3] == ["run", "steps", "last"] and table[0].split()[-2:] == ["lora.rank", "train.learning_rate"]
    cells = {line.split()[0]: line.split() for line in table[1:4]}
    assert cells["a"][-2:] == ["4", "0.002"] and cells["b"][-2:] == ["8", "0.002"] and cells["sweep/c"][-2:] == ["4", "0.001"]
    assert cells["a"][1] == "4"


def test_json_is_the_same_table(runs_dir):
    r = cli("runs", str(runs_dir), "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [x["run"] for x in rows] == ["a", "b", "sweep/c"]
    assert [x["config_diff"] for x in rows] == [{"lora.rank": 4, "train.learning_rate": 0.002},
                                               {"lora.rank": 8, "train.learning_rate": 0.002},
                                               {"lora.rank": 4, "train.learning_rate": 0.001}]
    assert rows == json.loads(json.dumps(runs_as_dicts(list_runs(runs_dir))))
    r = cli("runs", str(runs_dir))
    assert r.returncode == 0 and r.stdout.startswith("run ") and "lora.rank" in r.stdout


def test_corrupt_metrics_line_and_unreadable_config(runs_dir, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(runs_dir / "a", root / "a")
    shutil.copytree(runs_dir / "b", root / "b")
    with open(root / "a" / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 5, "loss": 1.\n[1, 2]\n')
    shutil.rmtree(root / "b" / "checkpoints")  # b falls back to adapter_config.json
    (root / "c").mkdir()
    (root / "c" / "metrics.jsonl").write_text('{"step": 1, "loss": 3.5}\n', encoding="utf-8")  # no config at all
    runs = {r.name: r for r in list_runs(root)}
    assert runs["a"].malformed_lines == 2 and runs["a"].steps == 4
    assert runs["b"].config_source == "adapter_config.json" and runs["b"].config["lora.rank"] == 8
    assert runs["c"].config is None and runs["c"].steps == 1 and runs["c"].last_loss == 3.5
    r = cli("runs", str(root))
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert "* a: 2 malformed line(s) in metrics.jsonl skipped" in r.stdout
    line_c = next(x for x in r.stdout.splitlines() if x.startswith("c "))
    assert "lora.rank" in r.stdout and line_c.split()[-1] == "?"


def test_empty_and_missing_dir(tmp_path):
    (tmp_path / "empty" / "deep" / "er" / "still" / "x").mkdir(parents=True)
    (tmp_path / "empty" / "deep" / "er" / "still" / "x" / "metrics.jsonl").write_text("{}\n")  # past depth 3
    r = cli("runs", str(tmp_path / "empty"))
    assert r.returncode == 0 and r.stdout.strip().count("\n") == 0 and "no training runs" in r.stdout
    r = cli("runs", str(tmp_path / "missing"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: ")
    with pytest.raises(UserError, match="no such folder"):
        list_runs(tmp_path / "missing")


def test_metrics_reread_only_when_appended(tmp_path):
    """The remembered rows follow appends, a half-written line, a cut-and-rewritten file and a replaced one."""
    from mlx_tune.training.runs import read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')
    assert [r["step"] for r in read_metrics(path)[0]] == [1, 2]
    with path.open("a") as f:
        f.write('{"step": 3, "loss": 1.2}\n{"step": 4, "lo')  # a writer half way through a line
    rows, bad = read_metrics(path)
    assert [r["step"] for r in rows] == [1, 2, 3] and bad == 1
    with path.open("a") as f:
        f.write('ss": 1.1}\nnot json\n')
    rows, bad = read_metrics(path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and bad == 1
    # a resume cuts the file back to step 1 (same inode) and writes longer rows after it
    with path.open("r+") as f:
        f.truncate(len('{"step": 1, "loss": 2.0}\n'))
        f.seek(0, 2)
        f.write('{"step": 2, "loss": 1.75, "val_loss": 1.8}\n{"step": 3, "loss": 1.6}\n{"step": 4, "loss": 1.4}\n')
    rows, bad = read_metrics(path)
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 2.0), (2, 1.75), (3, 1.6), (4, 1.4)] and bad == 0
    other = tmp_path / "new.jsonl"
    other.write_text('{"step": 9, "loss": 0.5}\n')
    other.replace(path)  # written atomically: another inode
    assert [r["step"] for r in read_metrics(path)[0]] == [9]
