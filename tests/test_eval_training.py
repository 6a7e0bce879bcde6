"""Evaluation during training: in-process answers, eval_accuracy rows, keep-best, early
stopping (also across SIGKILL and resume), and ``mlx-tune eval``."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import mlx.core as mx
import pytest
import yaml
from mlx.utils import tree_flatten
from train_workspace import run_train, start_and_signal, workspace

from mlx_tune import adapters
from mlx_tune.config import LoraConfig
from mlx_tune.evaluation.live import LiveScorer, accuracy_metrics
from mlx_tune.evaluation.prompts import parse_row
from mlx_tune.evaluation.scoring import score, tool_calls
from mlx_tune.model.attention import enable_packing
from mlx_tune.testing.tiny import tiny_model, tiny_tokenizer
from mlx_tune.training.best import BestTracker
from mlx_tune.training.recompute import grad_checkpoint

pytestmark = pytest.mark.accelerator


def test_tool_call_match():
    want = {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert score('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', want, "tool_call")
    assert score('{"name": "get_weather", "parameters": {"city": "Paris"}}', json.dumps(want), "tool_call")  # Llama 3.1
    assert score('{"function": {"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}}', want, "tool_call")
    assert not score('{"name": "get_weather", "arguments": {"city": "Rome"}}', want, "tool_call")
    assert not score('{"name": "get_time", "arguments": {"city": "Paris"}}', want, "tool_call")
    assert not score("It is sunny in Paris.", want, "tool_call")
    two = "<tool_call>{\"name\": \"a\", \"arguments\": {}}</tool_call><tool_call>{\"name\": \"b\", \"arguments\": {}}</tool_call>"
    assert [n for n, _ in tool_calls(two)] == ["a", "b"]
    assert score(two, [{"name": "a", "arguments": {}}, {"name": "b", "arguments": {}}], "tool_call")
    assert not score(two, {"name": "a", "arguments": {}}, "tool_call")  # one call expected, two made
    with pytest.raises(ValueError, match="tool_call"):
        parse_row({"prompt": "x", "expected": {"city": "Paris"}, "match": "tool_call"}, 1)


def test_live_answers_are_batched_greedy_and_leave_the_training_model_as_it_was():
    """The live adapter answers through the server's engine on a packing-wrapped, recomputed
    model in train mode: batched answers equal one-by-one answers, train mode comes back."""
    model, tok = tiny_model(seed=1), tiny_tokenizer()
    adapters.inject(model, LoraConfig(rank=4, alpha=8, dropout=0.5))
    for _, w in adapters.wrappers(model):  # a non-zero adapter, so it changes the answers
        w.adapters["default"].lora_b = mx.random.normal(w.adapters["default"].lora_b.shape) * 0.5
    enable_packing(model)
    grad_checkpoint(model)
    model.train()
    rows = [parse_row({"messages": [{"role": "user", "content": f"say {i}"}], "expected": "x", "match": "contains"}, i)
            for i in range(1, 5)] + [parse_row({"prompt": "abc", "expected": "abc", "match": "regex"}, 9)]
    scorer = LiveScorer(model, tok, max_batch=8)
    scorer.use_resident("default")
    before = sorted(k for k, _ in tree_flatten(model.trainable_parameters()))
    batched = scorer.answer(rows, "default", 6)
    alone = [scorer.answer([r], "default", 6)[0] for r in rows]
    base = scorer.answer(rows, None, 6)
    assert [a.output for a in batched] == [a.output for a in alone]
    assert all(a.completion_tokens == 6 and a.error is None for a in batched)
    assert [a.output for a in base] != [a.output for a in batched]  # the adapter is what answered
    assert model.training
    assert sorted(k for k, _ in tree_flatten(model.trainable_parameters())) == before  # nothing frozen or added
    report = scorer.report(rows, "default", 6)
    assert set(accuracy_metrics(report)) == {"eval_accuracy", "eval_accuracy_contains", "eval_accuracy_regex"}


def test_live_answers_after_the_weights_change_equal_a_fresh_scorers():
    """Between two evaluations training changes the adapter in place: the engine's prefix
    cache must not answer the second round with the first round's prompt KV."""
    model, tok = tiny_model(seed=1), tiny_tokenizer()
    adapters.inject(model, LoraConfig(rank=4, alpha=8))
    long = "a prompt long enough for the engine to keep its KV for reuse, " * 2
    rows = [parse_row({"prompt": f"{long}{i}", "expected": "x", "match": "contains"}, i) for i in range(3)]
    scorer = LiveScorer(model, tok, max_batch=8)
    scorer.use_resident("default")
    first = [a.output for a in scorer.answer(rows, "default", 8)]
    for _, w in adapters.wrappers(model):  # "training": the adapter moves
        w.adapters["default"].lora_b = mx.random.normal(w.adapters["default"].lora_b.shape, key=mx.random.key(4)) * 2.0
    again = [a.output for a in scorer.answer(rows, "default", 8)]
    fresh = LiveScorer(model, tok, max_batch=8)
    fresh.use_resident("default")
    want = [a.output for a in fresh.answer(rows, "default", 8)]
    assert again == want and want != first
    assert scorer.engine.prefix.hits == fresh.engine.prefix.hits  # nothing stale was reused


def test_best_tracker_min_delta_patience_and_state():
    t = BestTracker("val_loss", min_delta=0.1, patience=2)
    assert [t.update(s, v) for s, v in [(5, 3.0), (10, 2.95), (15, 2.8), (20, 2.75), (25, float("nan"))]] == \
        [True, False, True, False, False]
    assert (t.best_step, t.best_value, t.stale, t.exhausted) == (15, 2.8, 2, True)
    u = BestTracker("val_loss", 0.1, 2)
    u.load_state_dict(t.state_dict())
    assert (u.best_step, u.stale) == (15, 2)
    acc = BestTracker("eval_accuracy")
    assert [acc.update(s, v) for s, v in [(1, 0.2), (2, 0.2), (3, 0.5)]] == [True, False, True]


def _prompts(path: Path) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for a, b in [(1, 2), (30, 4), (10, 20)]:
            f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"}],
                                "expected": f"{a} + {b} = {a + b}", "match": "contains"}) + "\n")
        f.write(json.dumps({"prompt": "What is 2 plus 2?", "expected": r"\d", "match": "regex"}) + "\n")
    return path


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _expected_best(rows: list[dict], min_delta: float, patience: int) -> tuple[int, int]:
    """(best step, stop step) recomputed from the val_loss rows (steps > 0)."""
    best, best_step, stale = None, None, 0
    for r in rows:
        if "val_loss" in r and r["step"] > 0:
            if best is None or r["val_loss"] < best - min_delta:
                best, best_step, stale = r["val_loss"], r["step"], 0
            else:
                stale += 1
                if stale >= patience:
                    return best_step, r["step"]
    raise AssertionError("early stopping never triggered")


@pytest.mark.slow
def test_keep_best_and_early_stopping_survive_sigkill_and_resume(tmp_path, tiny_folder):
    """val_loss with min_delta 0.3 and patience 2: the run stops early, keeps the best step's
    adapter (its checkpoint spared by keep_checkpoints=1) and says why; a run killed after the
    best and resumed ends the same way, with the same files."""
    prompts = _prompts(tmp_path / "prompts.jsonl")
    train = dict(iters=60, steps_per_eval=5, save_every=5, keep_checkpoints=1, learning_rate=5e-3,
                 early_stopping_patience=2, early_stopping_min_delta=0.3)
    extra = [f"eval.prompts={prompts}", "eval.every=5", "eval.max_tokens=10", "train.best_metric=val_loss"]
    full = workspace(tmp_path, tiny_folder, "full", **train)
    res = run_train(full, *extra)
    assert res.returncode == 0, res.stderr[-2000:]
    out = tmp_path / "full"
    rows = _rows(out / "metrics.jsonl")
    best_step, stop_step = _expected_best(rows, 0.3, 2)
    assert stop_step < 60 and best_step < stop_step
    stop = [r for r in rows if r.get("early_stopped")]
    assert len(stop) == 1 and stop[0]["step"] == stop_step and stop[0]["best_step"] == best_step
    assert "early stopping: val_loss did not improve" in res.stdout + res.stderr
    assert max(r["step"] for r in rows) == stop_step
    acc_steps = [r["step"] for r in rows if "eval_accuracy" in r]
    assert acc_steps == list(range(0, stop_step + 1, 5))
    assert all("eval_accuracy_contains" in r and "eval_accuracy_regex" in r for r in rows if "eval_accuracy" in r)
    samples = _rows(out / "eval_samples.jsonl")
    assert len(samples) == 4 * len(acc_steps) and {s["step"] for s in samples} == set(acc_steps)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["step"] == best_step and config["metric"] == "val_loss"
    assert config["val_loss"] == pytest.approx(next(r["val_loss"] for r in rows if r.get("step") == best_step
                                                    and "val_loss" in r), rel=1e-6)
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert f"step_{best_step:06d}" in ckpts and f"step_{stop_step:06d}" in ckpts and len(ckpts) == 2
    kept = mx.load(str(out / "adapters.safetensors"))
    best_ckpt = mx.load(str(out / "checkpoints" / f"step_{best_step:06d}" / "adapter.safetensors"))
    assert len(kept) == len(best_ckpt) and all(mx.array_equal(kept[k], v).item() for k, v in
                                               zip(sorted(kept), (best_ckpt[k] for k in sorted(best_ckpt))))
    assert (out / "loss.png").stat().st_size > 0

    killed = workspace(tmp_path, tiny_folder, "killed", **train)
    proc, seen = start_and_signal(killed, best_step + 6, signal.SIGKILL, *extra)
    assert proc.returncode == -signal.SIGKILL and seen < stop_step, (seen, proc.stderr[-1500:])
    res = run_train(killed, *extra, "train.resume=true")
    assert res.returncode == 0, res.stderr[-2000:]
    k = tmp_path / "killed"
    strip = lambda rs: [{a: b for a, b in r.items() if not a.endswith(("time_s", "tokens_per_sec", "memory_gb"))}
                        for r in rs]
    assert strip(_rows(k / "metrics.jsonl")) == strip(rows)
    assert _rows(k / "eval_samples.jsonl") == samples
    assert json.loads((k / "adapter_config.json").read_text())["step"] == best_step
    again = mx.load(str(k / "adapters.safetensors"))
    assert all(mx.array_equal(again[key], kept[key]).item() for key in kept)


def test_mlx_tune_eval_scores_base_and_adapter_side_by_side(tmp_path, tiny_folder, capsys):
    from mlx_tune.cli import main
    from mlx_tune.model.loading import load_model

    model, _, info = load_model(str(tiny_folder), None)
    adapters.inject(model, LoraConfig(rank=4, alpha=8))
    adapters.save_adapter(model, tmp_path / "ad", info=info)  # B = 0: answers as the base does
    prompts = _prompts(tmp_path / "p.jsonl")
    rc = main(["eval", "--model", str(tiny_folder), "--adapter", f"mine={tmp_path / 'ad'}", "--prompts", str(prompts),
               "--max-tokens", "4", "--report", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "model base: accuracy" in out and "model mine: accuracy" in out and "the two models agree on every row" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["models"] == ["base", "mine"] and report["n"] == 4
    assert [r["output"] for r in report["compare"][0]["results"]] == [r["output"] for r in report["compare"][1]["results"]]
    cfg = yaml.safe_load(workspace(tmp_path, tiny_folder).read_text())
    assert main(["eval", "--model", cfg["model"]]) == 2  # no prompts: a one-line error
    assert "--prompts" in capsys.readouterr().err


def test_server_cpu_layers_are_borrowed_while_answering_and_given_back():
    import mlx.nn as nn

    from mlx_tune.model import quant

    model, tok = tiny_model(seed=2), tiny_tokenizer()
    nn.quantize(model, group_size=32, bits=4)
    quant.prepare_for_backend(model)
    adapters.inject(model, LoraConfig(rank=4, alpha=8))
    kinds = [(p, type(m)) for p, m in model.named_modules()]
    rows = [parse_row({"prompt": f"count {i}", "expected": "x", "match": "contains"}, i) for i in range(3)]
    scorer = LiveScorer(model, tok, swap_budget=2**30)
    scorer.use_resident("default")
    swapped = [a.output for a in scorer.answer(rows, "default", 5)]
    assert [(p, type(m)) for p, m in model.named_modules()] == kinds
    scorer.swap_budget = None
    assert [a.output for a in scorer.answer(rows, "default", 5)] == swapped


def test_new_keys_are_validated_before_anything_loads(tmp_path):
    from train_workspace import write_data

    from mlx_tune.config import config_from_dict
    from mlx_tune.errors import ConfigError, UserError
    from mlx_tune.training.run import precheck

    with pytest.raises(ConfigError) as err:
        config_from_dict({"model": "m", "train": {"iters": 1, "best_metric": "eval_accuracy", "early_stopping_patience": 0,
                                                  "mask": {"reasoning": "hide"}}, "eval": {"every": 0},
                          "report_to": ["tensorbord"]})
    text = str(err.value)
    for part in ("train.best_metric: eval_accuracy needs eval.prompts", "train.early_stopping_patience: 0 must be > 0",
                 "train.mask.reasoning: 'hide' is not valid", "eval.every: 0 must be > 0", "report_to: ['tensorbord']"):
        assert part in text
    cfg = config_from_dict({"model": "m", "train": {"iters": 1}, "eval": {"prompts": "p.jsonl"}})
    assert cfg.best_metric == "eval_accuracy"
    assert config_from_dict({"model": "m", "train": {"iters": 1}}).best_metric == "val_loss"
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "x", "match": "tool_call", "expected": {"city": 1}}\n')
    cfg = config_from_dict({"model": "not-loaded", "data": str(write_data(tmp_path / "d")), "train": {"iters": 1},
                            "eval": {"prompts": str(bad)}})
    with pytest.raises(UserError, match=r"p.jsonl:1: 'expected' for match tool_call"):
        precheck(cfg)
