"""GRPO reward functions: file and builtin specs, TRL's calling convention, one-line errors."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest

from mlx_tune.errors import UserError
from mlx_tune.training.rewards import RewardContext, load_rewards, score


def _load(specs, weights=None, base=None, **ctx):
    return load_rewards(specs, weights, RewardContext(base_dir=base, **ctx))


def test_file_reward_gets_prompts_completions_and_columns(tmp_path):
    (tmp_path / "r.py").write_text(
        "def fn(prompts, completions, answer, **kw):\n"
        "    return [float(c == a) + len(p) / 100 for p, c, a in zip(prompts, completions, answer)]\n")
    before = list(sys.path)
    (r,) = _load(["r.py:fn"], base=tmp_path)
    assert sys.path == before and r.name == "fn"
    total, per = score([r], ["ab", "abc"], ["x", "y"], {"answer": ["x", "z"], "completion_ids": [[1], [2]]})
    np.testing.assert_allclose(total, [1.02, 0.03])
    assert per.shape == (2, 1)


def test_weighted_nansum_skips_none(tmp_path):
    (tmp_path / "r.py").write_text("def some(prompts, completions, **kw):\n    return [None, 2.0]\n")
    rewards = _load(["r.py:some", "builtin:json_valid"], [0.5, 3.0], base=tmp_path)
    total, per = score(rewards, ["p", "p"], ['{"a": 1}', "nope"], {})
    assert math.isnan(per[0, 0])
    np.testing.assert_allclose(total, [3.0, 1.0])  # TRL: nansum(per * weights)
    total, _ = score(rewards[:1], ["p", "p"], ["a", "b"], {})
    assert math.isnan(total[0]) and total[1] == 1.0  # every function None: unscorable


@pytest.mark.parametrize("body,needle", [
    ("def fn(prompts, completions, **kw):\n    raise ValueError('boom')\n", "r.py:fn raised ValueError: boom"),
    ("def fn(prompts, completions, **kw):\n    return [1.0]\n", "r.py:fn returned 1 values for 2 completions"),
    ("def fn(prompts, completions, **kw):\n    return ['a', 1]\n", "r.py:fn returned str"),
    ("def fn(prompts, completions, **kw):\n    return 3\n", "r.py:fn returned int"),
])
def test_bad_reward_function_is_one_line(tmp_path, body, needle):
    (tmp_path / "r.py").write_text(body)
    rewards = _load(["r.py:fn"], base=tmp_path)
    with pytest.raises(UserError) as err:
        score(rewards, ["p", "q"], ["a", "b"], {})
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_import_failure_and_missing_function(tmp_path):
    (tmp_path / "bad.py").write_text("import not_a_module_xyz\n")
    (tmp_path / "ok.py").write_text("x = 1\n")
    with pytest.raises(UserError, match=r"bad.py failed to import: ModuleNotFoundError"):
        _load(["bad.py:fn"], base=tmp_path)
    with pytest.raises(UserError, match=r"ok.py has no function 'fn'"):
        _load(["ok.py:fn"], base=tmp_path)
    with pytest.raises(UserError, match=r"gone.py not found"):
        _load(["gone.py:fn"], base=tmp_path)
    with pytest.raises(UserError, match=r"no builtin 'nope'"):
        _load(["builtin:nope"])


def test_match_builtins_on_text_and_chat_completions():
    chat = [[{"role": "assistant", "content": " 42 "}], [{"role": "assistant", "content": "it is 41"}]]
    cols = {"answer": ["42", "42"], "pattern": [r"^\s*\d+\s*$", r"\d+"]}
    for name, want in [("exact_match", [1, 0]), ("contains", [1, 0]), ("regex", [1, 1])]:
        total, _ = score(_load([f"builtin:{name}"]), [[{"role": "user", "content": "q"}]] * 2, chat, cols)
        assert total.tolist() == want, name
    with pytest.raises(UserError, match="builtin:exact_match needs a 'answer' column"):
        score(_load(["builtin:exact_match"]), ["p"], ["x"], {"label": ["x"]})


def test_json_builtins(tmp_path):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    comps = ['{"n": 3}', '```json\n{"n": "x"}\n```', "not json"]
    assert score(_load(["builtin:json_valid"]), ["p"] * 3, comps, {})[0].tolist() == [1, 1, 0]
    from_file = _load(["builtin:json_schema:s.json"], base=tmp_path)
    assert score(from_file, ["p"] * 3, comps, {})[0].tolist() == [1, 0, 0]
    from_column = _load(["builtin:json_schema"])
    cols = {"schema": [json.dumps(schema), schema, schema]}
    assert score(from_column, ["p"] * 3, comps, cols)[0].tolist() == [1, 0, 0]


def test_length_penalty_uses_completion_ids():
    rewards = _load(["builtin:length_penalty"], max_completion_length=10)
    total, _ = score(rewards, ["p", "p"], ["a", "b"], {"completion_ids": [[1, 2, 3], list(range(10))]})
    np.testing.assert_allclose(total, [-0.3, -1.0])


def test_tool_call_valid_with_the_generic_parser():
    tools = [{"type": "function", "function": {"name": "get", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    comps = ['<tool_call>{"name": "get", "arguments": {"city": "Oslo"}}</tool_call>',
             '<tool_call>{"name": "get", "arguments": {"town": 1}}</tool_call>',
             '{"name": "other", "arguments": {}}',
             "no call here"]
    total, _ = score(_load(["builtin:tool_call_valid"]), ["p"] * 4, comps, {"tools": [tools] * 4})
    assert total.tolist() == [1, 0, 0, 0]
    total, _ = score(_load(["builtin:tool_call_valid"]), ["p"], ['{"name": "other", "arguments": {}}'], {})
    assert total.tolist() == [1]  # no tools column: any name
