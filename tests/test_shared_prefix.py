"""Shared-prefix rows: a prompt run once with its completions after it computes, for every
completion, what ``prompt + completion`` computes alone, in log-probs and in LoRA gradients,
across the attention variants of the families (softcaps, sinks, MLA scores, partial and
missing RoPE); a model whose sliding window is shorter than the row, or that cannot take
packed rows, gets plain rows."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_tune import adapters
from mlx_tune.config import LoraConfig
from mlx_tune.testing.families import FAMILIES
from mlx_tune.testing.tiny import tiny_model
from mlx_tune.training import grpo_rollout

pytestmark = pytest.mark.accelerator

# Two prompts, shuffled completions of uneven length (one of a single token: only the shared
# last prompt position predicts it).
PROMPTS = [[5, 9, 14, 3, 7], [11, 4, 8]]
ROWS = [(0, [21, 5, 6, 30]), (1, [7, 7]), (0, [12]), (1, [40, 2, 9, 33, 18, 2]), (0, [3, 19, 25])]


def _lora_model(model_type: str, **overrides):
    f = FAMILIES[model_type]
    model = tiny_model(model_type, seed=3, **{**f.overrides, **overrides})
    adapters.inject(model, LoraConfig(rank=4, alpha=8, dropout=0.0))
    for _, w in adapters.wrappers(model):  # a non-zero adapter, so its gradient reaches every layer
        w.adapters["default"].lora_b = mx.random.normal(w.adapters["default"].lora_b.shape, key=mx.random.key(1)) * 0.3
    model.train()
    return model


def _value_and_grads(model, rows):
    mask = rows.mask

    def loss(m):
        return (grpo_rollout.completion_logps(m, rows) * mask).sum()

    value, grads = nn.value_and_grad(model, loss)(model)
    lp = grpo_rollout.completion_logps(model, rows)
    mx.eval(value, grads, lp)
    return np.array(lp) * np.array(mask), dict(tree_flatten(grads))


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "phi3", "smollm3", "gpt_oss", "deepseek_v3",
                                        "qwen3_moe"])
def test_shared_rows_equal_plain_rows(model_type):
    overrides = {"sliding_window": 64} if model_type == "gpt_oss" else {}  # a window longer than the rows
    model = _lora_model(model_type, **overrides)
    prompts = [PROMPTS[p] for p, _ in ROWS]
    completions = [c for _, c in ROWS]
    shared = grpo_rollout.model_rows(model, prompts, completions)
    assert shared.prefix_ids is not None  # this family takes the shared route
    assert shared.inputs.shape[0] == 2  # one row per distinct prompt
    plain = grpo_rollout.pad_rows(prompts, completions)
    lp_s, g_s = _value_and_grads(model, shared)
    lp_p, g_p = _value_and_grads(model, plain)
    np.testing.assert_allclose(lp_s, lp_p, atol=2e-5, rtol=1e-4)
    assert set(g_s) == set(g_p) and g_s
    for k in g_p:
        ref = np.array(g_p[k])
        np.testing.assert_allclose(np.array(g_s[k]), ref, atol=2e-5 + 1e-4 * np.abs(ref).max(), err_msg=k)


def test_shared_rows_layout():
    rows = grpo_rollout.shared_rows([[1, 2, 3], [1, 2, 3]], [[4, 5], [6]], multiple=8)
    assert np.array(rows.inputs).tolist() == [[1, 2, 3, 4, 0, 0, 0, 0]]
    assert np.array(rows.segment_ids).tolist() == [[0, 0, 0, 1, -1, -1, -1, -1]]
    assert np.array(rows.prefix_ids).tolist() == [[0, 0, 0, 0, -1, -1, -1, -1]]
    assert np.array(rows.positions)[0, :4].tolist() == [0, 1, 2, 3]
    # c_0 of both completions comes from the prompt's last position; c_1 of the first from its own token
    assert np.array(rows.gather).tolist() == [[2, 3], [2, 2]]
    assert np.array(rows.mask).tolist() == [[1, 1], [1, 0]]


@pytest.mark.parametrize("model_type", ["gemma3_text", "mamba"])
def test_plain_rows_where_sharing_is_not_exact(model_type):
    """gemma3's window (5) is shorter than a shared row; mamba's state crosses segments."""
    model = _lora_model(model_type)
    rows = grpo_rollout.model_rows(model, [PROMPTS[p] for p, _ in ROWS], [c for _, c in ROWS])
    assert rows.prefix_ids is None and rows.inputs.shape[0] == len(ROWS)


def test_distinct_prompts_take_plain_rows():
    model = tiny_model(seed=0)
    rows = grpo_rollout.model_rows(model, PROMPTS, [[1, 2], [3]])
    assert rows.prefix_ids is None
