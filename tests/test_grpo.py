"""GRPO end to end on a tiny model: rollouts with the live adapter, rewards from a user's
file, metrics and samples, exact resume, and the log-probs the loss is built on."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml

from mlx_tune import adapters
from mlx_tune.config import LoraConfig, load_config
from mlx_tune.errors import UserError
from mlx_tune.testing.tiny import tiny_model, tiny_tokenizer
from mlx_tune.training import grpo_rollout
from mlx_tune.training.run import run_train

pytestmark = pytest.mark.accelerator

REWARD = '''
def even_ids(prompts, completions, answer, completion_ids, **kw):
    """The share of even token ids (varies within a group); None for the rows that opt out."""
    return [None if a == "skip" else sum(t % 2 == 0 for t in ids) / max(1, len(ids))
            for ids, a in zip(completion_ids, answer)]
'''


def _workspace(tmp: Path, tiny_folder: Path, **train) -> Path:
    data = tmp / "data"
    data.mkdir(exist_ok=True)
    with open(data / "train.jsonl", "w") as f:
        for i in range(6):
            row = {"prompt": f"say a {i}", "answer": "skip" if i == 5 else "a"} if i % 2 else \
                {"messages": [{"role": "user", "content": f"write a {i}"}], "answer": "a"}
            f.write(json.dumps(row) + "\n")
    with open(data / "test.jsonl", "w") as f:
        f.write(json.dumps({"prompt": "held out", "answer": "a"}) + "\n")
    (tmp / "reward.py").write_text(REWARD)
    cfg = {"model": str(tiny_folder), "quantize": None,
           "lora": {"rank": 4, "alpha": 8, "dropout": 0.1, "target_modules": "all-linear"},
           "data": str(data), "output_dir": str(tmp / "out"),
           "train": {"method": "grpo", "iters": 4, "batch_size": 2, "learning_rate": 5e-3, "steps_per_report": 1,
                     "save_every": 1, "seed": 7, "test": True,
                     "grad_checkpoint": True, **train},
           "grpo": {"reward_functions": ["reward.py:even_ids", "builtin:length_penalty"], "reward_weights": [1.0, 0.1],
                    "num_generations": 3, "max_completion_length": 6, "beta": 0.05, "steps_per_generation": 2},
           "eval": {"every": 2}}
    path = tmp / "grpo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_grpo_trains_writes_metrics_and_resumes_exactly(tmp_path, tiny_folder):
    cfg_path = _workspace(tmp_path, tiny_folder)
    result = run_train(load_config(cfg_path), log=lambda m: None)
    out = tmp_path / "out"
    assert result.state.step == 4 and (out / "adapters.safetensors").is_file()
    *rows, test = _rows(out / "metrics.jsonl")
    full = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_reward_mean" in r]  # the held-out reward (test.jsonl here) every eval.every
    assert [r["step"] for r in full] == [1, 2, 3, 4] and [r["step"] for r in val] == [0, 2, 4]
    assert {"test_reward_mean", "test_base_reward_mean", "test_reward_even_ids_mean"} <= set(test)
    assert {"val_reward_even_ids_mean", "val_completion_length", "val_prompts"} <= set(val[0])
    assert test["test_base_reward_mean"] == val[0]["val_reward_mean"]  # the same file: train.test reuses them
    assert test["test_reward_mean"] == val[-1]["val_reward_mean"]
    for key in ("loss", "reward_mean", "reward_std", "reward_even_ids_mean", "reward_length_penalty_mean", "kl",
                "completion_length", "clip_ratio", "generation_tokens_per_sec", "tokens_per_sec"):
        assert key in full[0], key
    assert all(r["kl"] >= 0 for r in full) and full[-1]["kl"] > 0  # the adapter moved away from the base
    assert full[-1]["clip_ratio"] > 0  # step 4 reuses step 3's batch after an update: ratio != 1, clipped
    # steps_per_generation 2, grad_accumulation 1: each generation batch serves 2 steps, the second off-policy
    samples = _rows(out / "samples.jsonl")
    assert [s["step"] for s in samples] == [1] * 4 + [3] * 4 and all("completion" in s for s in samples)

    # interrupted after step 3, half-way through a generation batch (the checkpoint holds its rest):
    # resumed, step 4 learns from the same completions with the same rewards and loss
    import shutil

    shutil.rmtree(out / "checkpoints" / "step_000004")
    assert json.loads((out / "checkpoints" / "step_000003" / "state.json").read_text())["grpo"]["generation"]
    for drop in ([], ["step_000003"]):  # then from step 2: a fresh generation batch right after the resume
        for name in drop:
            shutil.rmtree(out / "checkpoints" / name)
        resumed = run_train(load_config(cfg_path, ["train.resume=true"]), log=lambda m: None)
        assert resumed.state.step == 4
        *again, _ = _rows(out / "metrics.jsonl")
        assert [r["step"] for r in again if "val_reward_mean" in r] == [0, 2, 4]
        again = [r for r in again if "loss" in r]
        assert len(again) == 4
        for a, b in zip(full, again):
            for key in ("loss", "reward_mean", "kl", "completion_length", "clip_ratio"):
                assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (a["step"], key)
        shutil.rmtree(out / "checkpoints" / "step_000004")


def test_eval_prompts_is_refused_for_grpo(tmp_path, tiny_folder):
    cfg_path = _workspace(tmp_path, tiny_folder)
    with pytest.raises(UserError, match=r"eval.prompts: p.jsonl: train.method grpo does not answer"):
        run_train(load_config(cfg_path, ["eval.prompts=p.jsonl"]), log=lambda m: None)


def test_bad_reward_file_stops_with_one_line(tmp_path, tiny_folder):
    cfg_path = _workspace(tmp_path, tiny_folder)
    (tmp_path / "reward.py").write_text("def even_ids(prompts, completions, **kw):\n    return [1.0]\n")
    with pytest.raises(UserError, match=r"reward.py:even_ids returned 1 values for 6 completions"):
        run_train(load_config(cfg_path, ["train.iters=1"]), log=lambda m: None)


def test_completion_logps_equal_a_per_row_forward_and_reference_disables_lora():
    model, tok = tiny_model(seed=1), tiny_tokenizer()
    adapters.inject(model, LoraConfig(rank=4, alpha=8, dropout=0.0))
    for _, w in adapters.wrappers(model):  # a non-zero adapter: the reference differs
        w.adapters["default"].lora_b = mx.random.normal(w.adapters["default"].lora_b.shape) * 0.5
    prompts = [grpo_rollout.encode_prompt(tok, {"prompt": "abc"}),
               grpo_rollout.encode_prompt(tok, {"messages": [{"role": "user", "content": "hi there"}]})]
    seeds = [grpo_rollout.completion_seed(0, 0, i) for i in range(2)]
    outs = grpo_rollout.sample(model, tok, prompts, seeds, max_tokens=7, temperature=1.0, top_p=0.9)
    alone = grpo_rollout.sample(model, tok, prompts[1:], seeds[1:], max_tokens=7, temperature=1.0, top_p=0.9)
    assert outs[1].ids == alone[0].ids  # a completion's seed decides it, not its batch
    rows = grpo_rollout.pad_rows(prompts, [c.ids for c in outs])
    mask = rows.mask
    lp = grpo_rollout.completion_logps(model, rows)
    with grpo_rollout.reference(model):
        ref = grpo_rollout.completion_logps(model, rows)
    assert all(m.enabled for m in grpo_rollout.lora_layers(model))
    for b, (p, c) in enumerate(zip(prompts, outs)):
        for m, got in ((model, lp), (None, ref)):
            full = mx.array([p + c.ids])
            if m is None:
                with grpo_rollout.reference(model):
                    logits = model(full[:, :-1])[0]
            else:
                logits = model(full[:, :-1])[0]
            logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            want = np.array([logp[len(p) - 1 + j, t].item() for j, t in enumerate(c.ids)])
            np.testing.assert_allclose(np.array(got[b, : len(c.ids)]), want, atol=1e-5)
    assert np.abs(np.array(lp - ref) * np.array(mask)).max() > 1e-3


def test_prompt_order_is_a_function_of_seed_and_position():
    a = grpo_rollout.PromptOrder(5, seed=3)
    first = a.take(4) + a.take(4)
    b = grpo_rollout.PromptOrder(5, seed=3)
    b.take(4)
    c = grpo_rollout.PromptOrder(5, seed=3)
    c.load_state_dict(b.state_dict())
    assert c.take(4) == first[4:]
    assert sorted(first[:5]) == list(range(5))  # one epoch is a permutation


def test_other_settings_run(tmp_path, tiny_folder):
    """grad_accumulation 2 with steps_per_generation null (one generation batch per optimizer step,
    split in two, on-policy), loss_type grpo, batch scaling, truncated completions masked, no KL."""
    cfg_path = _workspace(tmp_path, tiny_folder)
    overrides = ["train.iters=2", "train.grad_accumulation=2", "train.test=false", "grpo.steps_per_generation=null",
                 "grpo.loss_type=grpo", "grpo.scale_rewards=batch", "grpo.mask_truncated_completions=true",
                 "grpo.beta=0.0"]
    result = run_train(load_config(cfg_path, overrides), log=lambda m: None)
    rows = [r for r in _rows(tmp_path / "out" / "metrics.jsonl") if "loss" in r]
    assert result.state.step == 2 and [r["step"] for r in rows] == [1, 2]
    assert "kl" not in rows[0] and rows[0]["clip_ratio"] == 0.0  # on-policy: the ratio is 1
    assert rows[0]["truncated_ratio"] == 1.0 and rows[0]["loss"] == 0.0  # every completion cut at 6 tokens: masked


def test_a_prompt_over_max_seq_length_is_one_line(tmp_path, tiny_folder):
    """GRPO's prompt budget is train.max_seq_length: a longer prompt stops the run before training."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(json.dumps({"prompt": "word " * 80}) + "\n" + json.dumps({"prompt": "hi"}) + "\n")
    (tmp_path / "r.py").write_text("def one(prompts, completions, **kw):\n    return [1.0] * len(completions)\n")
    cfg = {"model": str(tiny_folder), "quantize": None, "data": str(data), "output_dir": str(tmp_path / "out"),
           "train": {"method": "grpo", "iters": 1, "batch_size": 1, "max_seq_length": 16},
           "grpo": {"reward_functions": ["r.py:one"], "num_generations": 2, "max_completion_length": 2}}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(UserError, match=r"prompt row 1 is \d+ tokens, over train.max_seq_length 16"):
        run_train(load_config(tmp_path / "g.yaml"), log=lambda s: None)
