"""GRPO reward functions: loaded from ``grpo.reward_functions`` specs, called in TRL's convention.

A reward function is ``fn(prompts, completions, **columns) -> list[float | None]``, one
value per completion (TRL's ``GRPOTrainer`` convention). ``prompts[i]`` is the prompt
string or its message list; ``completions[i]`` is a string for text prompts and
``[{"role": "assistant", "content": text}]`` for chat prompts. Every other dataset column
arrives as a keyword list aligned with the completions (a prompt's value repeated for each
of its generations), plus ``completion_ids`` (the generated token ids). ``None`` means "no
opinion" (TRL: NaN) and is left out of the weighted sum, which is TRL's
``nansum(rewards_per_func * reward_weights, dim=1)``.

Specs:

- ``FILE.py:FUNC``: ``FUNC`` from ``FILE.py``, a path relative to the config file's folder,
  else to the current folder; imported by file path (nothing is added to ``sys.path``).
- ``builtin:NAME`` (``builtin:json_schema:FILE.json`` for a schema file), all in [0, 1]
  except the length penalty:

  ==================  =====================================================================
  ``exact_match``     1 if the completion text, stripped, equals the ``answer`` column stripped
  ``contains``        1 if the ``answer`` column occurs in the completion text
  ``regex``           1 if the ``pattern`` column (a Python regex) is found in the completion
  ``json_valid``      1 if the completion (stripped, one ```json fence removed) parses as JSON
  ``json_schema``     1 if it parses and validates against the ``schema`` column (a JSON object
                      or its text) or the schema file; 0 otherwise (needs ``jsonschema``)
  ``length_penalty``  ``-len(completion_ids) / grpo.max_completion_length`` (in [-1, 0])
  ``tool_call_valid`` 1 if the completion holds a tool call in the model's syntax (the server's
                      parser, ``server.tools``) whose name is in the ``tools`` column (OpenAI
                      tool dicts; any name without one) and whose arguments are a JSON object
                      valid against that tool's ``parameters`` (when ``jsonschema`` is there)
  ==================  =====================================================================

A file that fails to import, a missing function, a function that raises, or one that
returns the wrong number of values or a non-number stops the run with one ``UserError``
line naming the file and function.
"""

from __future__ import annotations

import importlib.util
import json
import math
import numbers
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlx_tune.errors import UserError

RewardFn = Callable[..., Sequence[Any]]


@dataclass
class RewardContext:
    """What the built-ins may need besides the rows."""

    base_dir: Path | None = None  # the config file's folder (specs' paths are relative to it)
    max_completion_length: int = 256
    tokenizer: Any = None  # for tool_call_valid's parser
    _syntax: Any = field(default=None, repr=False)


@dataclass
class Reward:
    spec: str  # as written in the config
    name: str  # the metrics key: FUNC or the builtin's NAME
    fn: RewardFn
    weight: float = 1.0


def completion_text(completion: Any) -> str:
    """The text of a completion: the string itself, or a message list's last content."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content") or "")
    return str(completion)


def _column(kwargs: dict, key: str, builtin: str, n: int) -> list:
    if key not in kwargs:
        raise UserError(f"grpo.reward_functions: builtin:{builtin} needs a {key!r} column in the prompt rows "
                        f"(columns here: {', '.join(sorted(k for k in kwargs if k != 'completion_ids')) or 'none'})")
    return list(kwargs[key])[:n]


def _strip_fence(text: str) -> str:
    t = text.strip()
    m = re.fullmatch(r"```(?:json)?\s*\n?(.*?)\n?```", t, re.S)
    return m.group(1).strip() if m else t


def _parse_json(text: str) -> tuple[bool, Any]:
    try:
        return True, json.loads(_strip_fence(text))
    except (json.JSONDecodeError, ValueError):
        return False, None


def exact_match(prompts, completions, **kw) -> list[float]:
    answers = _column(kw, "answer", "exact_match", len(completions))
    return [float(completion_text(c).strip() == str(a).strip()) for c, a in zip(completions, answers)]


def contains(prompts, completions, **kw) -> list[float]:
    answers = _column(kw, "answer", "contains", len(completions))
    return [float(str(a) in completion_text(c)) for c, a in zip(completions, answers)]


def regex(prompts, completions, **kw) -> list[float]:
    patterns = _column(kw, "pattern", "regex", len(completions))
    out = []
    for c, p in zip(completions, patterns):
        try:
            out.append(float(re.search(str(p), completion_text(c)) is not None))
        except re.error as exc:
            raise UserError(f"grpo.reward_functions: builtin:regex: pattern {p!r} is not a valid regex ({exc})") from None
    return out


def json_valid(prompts, completions, **kw) -> list[float]:
    return [float(_parse_json(completion_text(c))[0]) for c in completions]


def _validator():
    try:
        import jsonschema
    except ImportError:
        raise UserError("grpo.reward_functions: builtin:json_schema needs jsonschema: "
                        "pip install 'jsonschema>=4' (or mlx-tune[grpo])") from None
    return jsonschema


def _valid(jsonschema, value: Any, schema: Any) -> bool:
    try:
        jsonschema.validate(value, schema)
        return True
    except jsonschema.ValidationError:
        return False


def make_json_schema(schema_file: Path | None) -> RewardFn:
    jsonschema = _validator()
    fixed = None
    if schema_file is not None:
        try:
            fixed = json.loads(schema_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"grpo.reward_functions: builtin:json_schema: cannot read {schema_file} ({exc})") from None

    def json_schema(prompts, completions, **kw) -> list[float]:
        schemas = [fixed] * len(completions) if fixed is not None else _column(kw, "schema", "json_schema",
                                                                                len(completions))
        out = []
        for c, s in zip(completions, schemas):
            ok, value = _parse_json(completion_text(c))
            s = json.loads(s) if isinstance(s, str) else s
            out.append(float(ok and _valid(jsonschema, value, s)))
        return out
    return json_schema


def make_length_penalty(max_len: int) -> RewardFn:
    def length_penalty(prompts, completions, completion_ids=None, **kw) -> list[float]:
        if completion_ids is None:  # called outside the loop: characters / 4 as a token estimate
            return [-min(1.0, len(completion_text(c)) / 4 / max_len) for c in completions]
        return [-len(ids) / max_len for ids in completion_ids]
    return length_penalty


def _json_call(text: str, tools: Any = None) -> Any:
    return json.loads(text.strip())  # the generic form's parser (server.tools), for a tokenizer-less context


def make_tool_call_valid(ctx: RewardContext) -> RewardFn:
    from mlx_tune.server import tools as server_tools

    if ctx._syntax is None:
        ctx._syntax = server_tools.syntax(ctx.tokenizer) if ctx.tokenizer is not None else \
            server_tools.ToolSyntax(*server_tools.GENERIC, _json_call, "json")
    try:
        import jsonschema
    except ImportError:
        jsonschema = None

    def calls(text: str) -> list[dict]:
        splitter = server_tools.CallSplitter(ctx._syntax)
        splitter.feed(text)
        splitter.finish()
        if not splitter.calls:
            splitter.bare_call(text)
        return splitter.calls

    def tool_call_valid(prompts, completions, **kw) -> list[float]:
        offered = list(kw.get("tools") or [None] * len(completions))
        out = []
        for c, tools in zip(completions, offered):
            found = calls(completion_text(c))
            out.append(float(bool(found) and all(_call_ok(call, tools, jsonschema) for call in found)))
        return out
    return tool_call_valid


def _call_ok(call: dict, tools: Any, jsonschema) -> bool:
    try:
        args = json.loads(call["arguments"])
    except (json.JSONDecodeError, TypeError):
        return False
    if not isinstance(args, dict):
        return False
    if not tools:
        return True
    by_name = {}
    for t in tools:
        fn = t.get("function", t) if isinstance(t, dict) else {}
        if isinstance(fn, dict) and "name" in fn:
            by_name[fn["name"]] = fn.get("parameters") or {"type": "object"}
    if call["name"] not in by_name:
        return False
    return jsonschema is None or _valid(jsonschema, args, by_name[call["name"]])


BUILTINS: dict[str, Callable[[RewardContext, str | None], RewardFn]] = {
    "exact_match": lambda ctx, arg: exact_match,
    "contains": lambda ctx, arg: contains,
    "regex": lambda ctx, arg: regex,
    "json_valid": lambda ctx, arg: json_valid,
    "json_schema": lambda ctx, arg: make_json_schema(_resolve(arg, ctx.base_dir) if arg else None),
    "length_penalty": lambda ctx, arg: make_length_penalty(ctx.max_completion_length),
    "tool_call_valid": lambda ctx, arg: make_tool_call_valid(ctx),
}


def _resolve(path: str, base_dir: Path | None) -> Path:
    p = Path(path)
    if not p.is_absolute() and base_dir is not None and (base_dir / p).exists():
        return base_dir / p
    return p


def _from_file(spec: str, ctx: RewardContext) -> Reward:
    file, func = spec.rsplit(":", 1)
    path = _resolve(file, ctx.base_dir)
    if not path.is_file():
        where = f"{ctx.base_dir} or the current folder" if ctx.base_dir else "the current folder"
        raise UserError(f"grpo.reward_functions: {file} not found (relative to {where})")
    module_name = f"mlx_tune_reward_{abs(hash(str(path.resolve())))}"
    try:
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        if module_spec is None or module_spec.loader is None:
            raise ImportError("not a Python source file")
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    except Exception as exc:
        raise UserError(f"grpo.reward_functions: {file} failed to import: {type(exc).__name__}: {exc}") from None
    fn = getattr(module, func, None)
    if not callable(fn):
        raise UserError(f"grpo.reward_functions: {file} has no function {func!r}")
    return Reward(spec, func, fn)


def load_rewards(specs: Sequence[str], weights: Sequence[float] | None = None,
                 ctx: RewardContext | None = None) -> list[Reward]:
    """The reward functions ``specs`` name, with their weights (None: all 1)."""
    ctx = ctx or RewardContext()
    out = []
    for spec in specs:
        if spec.startswith("builtin:"):
            name, _, arg = spec[len("builtin:"):].partition(":")
            if name not in BUILTINS:
                raise UserError(f"grpo.reward_functions: {spec!r}: no builtin {name!r} "
                                f"(built-ins: {', '.join(BUILTINS)})")
            out.append(Reward(spec, name, BUILTINS[name](ctx, arg or None)))
        else:
            out.append(_from_file(spec, ctx))
    if weights is not None:
        if len(weights) != len(out):
            raise UserError(f"grpo.reward_weights: {len(weights)} weights for {len(out)} reward functions")
        for r, w in zip(out, weights):
            r.weight = float(w)
    seen: dict[str, int] = {}
    for r in out:  # two specs with one name (two files' `reward`) get distinct metrics keys
        seen[r.name] = seen.get(r.name, 0) + 1
        if seen[r.name] > 1:
            r.name = f"{r.name}_{seen[r.name]}"
    return out


def _values(reward: Reward, got: Any, n: int) -> list[float]:
    where = f"grpo.reward_functions: {reward.spec}"
    try:
        values = list(got)
    except TypeError:
        raise UserError(f"{where} returned {type(got).__name__}, not a list of {n} numbers") from None
    if len(values) != n:
        raise UserError(f"{where} returned {len(values)} values for {n} completions")
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append(math.nan)
        elif isinstance(v, numbers.Real) or (isinstance(v, np.ndarray) and v.shape == ()):
            out.append(float(v))
        else:
            raise UserError(f"{where} returned {type(v).__name__} {v!r:.40} at index {i}; rewards are numbers or None")
    return out


def score(rewards: Sequence[Reward], prompts: list, completions: list, columns: dict[str, list]
          ) -> tuple[np.ndarray, np.ndarray]:
    """``(total (n,), per_function (n, k))``: every function on every completion, then
    ``nansum(per_function * weights, axis=1)``; per_function keeps the NaNs (None), and a
    row that every function left None is NaN in ``total`` too (TRL's unscorable row)."""
    n = len(completions)
    per = np.full((n, len(rewards)), np.nan, dtype=np.float64)
    for j, r in enumerate(rewards):
        try:
            got = r.fn(prompts=prompts, completions=completions, **columns)
        except UserError:
            raise
        except Exception as exc:
            raise UserError(f"grpo.reward_functions: {r.spec} raised {type(exc).__name__}: {exc}") from None
        per[:, j] = _values(r, got, n)
    weights = np.array([r.weight for r in rewards], dtype=np.float64)
    total = np.nansum(per * weights, axis=1)
    total[np.isnan(per).all(axis=1)] = np.nan  # TRL: unscorable (every function None), no baseline, advantage 0
    return total, per
