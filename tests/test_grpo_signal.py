"""GRPO's learning signal on a tiny model: the log-probs the loss is built on are the ones the
sampler drew with (same positions, same adapter, same temperature), and a reward the policy
can reach is learned: its exact probability under the policy rises step after step."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
import yaml

from mlx_tune import adapters
from mlx_tune.config import LoraConfig, load_config
from mlx_tune.testing.tiny import tiny_model, tiny_tokenizer
from mlx_tune.training import grpo, grpo_rollout
from mlx_tune.training.grpo_loss import LossSettings
from mlx_tune.training.optim import build_optimizer
from mlx_tune.training.rewards import RewardContext, load_rewards

pytestmark = pytest.mark.accelerator

REWARD = '''
def first_even(prompts, completions, completion_ids, **kw):
    """1 when the first generated token id is even: about half of a random model's samples."""
    return [float(bool(ids) and ids[0] % 2 == 0) for ids in completion_ids]
'''


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_training_logps_are_the_samplers(temperature):
    """completion_logps (the training step's) == the generator's log-softmax of each drawn token at
    the temperature: no shift between prompt and completion positions, chat prefix included, the
    adapter on while sampling; and the reference (adapter off) differs."""
    model, tok = tiny_model(seed=2), tiny_tokenizer()
    adapters.inject(model, LoraConfig(rank=4, alpha=8, dropout=0.0))
    for _, w in adapters.wrappers(model):  # a non-zero adapter: sampling without it would show
        w.adapters["default"].lora_b = mx.random.normal(w.adapters["default"].lora_b.shape) * 0.5
    rows = [{"messages": [{"role": "user", "content": "pick one"}]}, {"prompt": "a longer plain prompt"}]
    prompts = [grpo_rollout.encode_prompt(tok, r) for r in rows for _ in range(3)]
    seeds = [grpo_rollout.completion_seed(0, 0, i) for i in range(len(prompts))]
    outs = grpo_rollout.sample(model, tok, prompts, seeds, max_tokens=6, temperature=temperature, top_p=1.0,
                               logps=True)
    rows = grpo_rollout.pad_rows(prompts, [c.ids for c in outs])
    mask = rows.mask
    lp = np.array(grpo_rollout.completion_logps(model, rows, temperature))
    with grpo_rollout.reference(model):
        ref = np.array(grpo_rollout.completion_logps(model, rows, temperature))
    for b, c in enumerate(outs):
        assert c.logps is not None and len(c.logps) == len(c.ids) > 0
        np.testing.assert_allclose(lp[b, : len(c.ids)], c.logps, atol=2e-4)
    assert np.abs((lp - ref) * np.array(mask)).max() > 1e-2


def _p_first_even(model, prompts: list[list[int]]) -> float:
    """The policy's exact probability that the first completion token is even, mean over prompts."""
    probs = []
    for p in prompts:
        logits = model(mx.array([p]))[0, -1].astype(mx.float32)
        pr = mx.softmax(logits, axis=-1)
        probs.append(float(pr[::2].sum().item()))
    return float(np.mean(probs))


def test_grpo_learns_a_reachable_reward(tmp_path, tiny_folder):
    """reward = [first token id is even]: the sampled reward and its exact probability rise."""
    data = tmp_path / "data"
    data.mkdir()
    with open(data / "train.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"question {i}"}]}) + "\n")
    (tmp_path / "reward.py").write_text(REWARD)
    cfg_dict = {"model": str(tiny_folder), "quantize": None, "data": str(data), "output_dir": str(tmp_path / "out"),
                "lora": {"rank": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
                "train": {"method": "grpo", "iters": 12, "batch_size": 4, "learning_rate": 1e-2, "seed": 3},
                "grpo": {"reward_functions": ["reward.py:first_even"], "num_generations": 8,
                         "max_completion_length": 3, "temperature": 1.0}}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(cfg_dict))
    cfg = load_config(tmp_path / "g.yaml")
    model, tok = tiny_model(seed=0), tiny_tokenizer()
    adapters.inject(model, cfg.lora)
    rows = grpo_rollout.read_prompt_rows(data / "train.jsonl")
    prompts = [grpo_rollout.encode_prompt(tok, r) for r in rows]
    rewards = load_rewards(cfg.grpo.reward_functions, None, RewardContext(tmp_path, 3, tok))
    rollouts = grpo.Rollouts(cfg, model, tok, rows, rewards)
    stepper = grpo.GrpoStep(model, build_optimizer(cfg.train, 12), rollouts,
                            LossSettings("dapo", max_completion_length=3), None)
    probs, sampled = [_p_first_even(model, prompts)], []
    model.train()
    for _ in range(12):
        sampled.append(stepper.step()["reward_mean"])
        probs.append(_p_first_even(model, prompts))
    rises = sum(b > a for a, b in zip(probs, probs[1:]))
    assert rises >= 9, probs  # monotone-ish: nearly every update makes the rewarded token likelier
    assert probs[-1] > probs[0] + 0.2, [round(p, 3) for p in probs]
    assert np.mean(sampled[-4:]) > np.mean(sampled[:4]) + 0.15, sampled

