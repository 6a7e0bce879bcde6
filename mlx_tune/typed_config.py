"""Dataclasses built from YAML mappings by their type hints: the engine behind ``config``.

``build(cls, raw, prefix, errs)`` converts each value to its field's hinted type
(Literal, unions with null, lists, mappings, nested dataclasses, numbers written as
strings such as ``1e-4``), names unknown keys with the nearest valid one, runs each
object's ``check()`` and collects every problem in ``errs`` instead of stopping at the
first. ``parse_override`` / ``apply_overrides`` read dotted ``KEY=VALUE`` overrides;
``reference_table`` renders a markdown table of keys, types, defaults and docs.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union

import yaml

from mlx_tune.errors import ConfigError


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping of names to paths"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return {int: "integer", float: "number", str: "string", bool: "true/false"}.get(tp, str(tp))


class Bad(Exception):
    pass


def coerce(value: Any, tp: Any, key: str, errs: list[str]) -> Any:
    """Convert a YAML value to ``tp`` or raise Bad; nested dataclasses collect into errs."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise Bad
        return build(tp, value, key, errs)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise Bad
        # Literal and exact types first, so "all" is not read as something else.
        for arg in sorted((a for a in args if a is not type(None)), key=lambda a: typing.get_origin(a) is not Literal):
            try:
                return coerce(value, arg, key, errs)
            except Bad:
                continue
        raise Bad
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise Bad
    if origin is list:
        if isinstance(value, str) or not isinstance(value, list):
            raise Bad
        return [coerce(v, typing.get_args(tp)[0], key, errs) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise Bad
        return {str(k): coerce(v, typing.get_args(tp)[1], key, errs) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise Bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise Bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:  # YAML reads "1e-4" (no dot) as a string.
                return float(value)
            except ValueError:
                raise Bad from None
        raise Bad
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise Bad
    raise Bad


def build(cls: type, raw: dict, prefix: str, errs: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f"; did you mean '{prefix}{near[0]}'?" if near else f"; valid keys: {', '.join(fields)}"
            errs.append(f"{dotted}: unknown key{hint}")
            continue
        try:
            kwargs[key] = coerce(value, hints[key], f"{dotted}.", errs)
        except Bad:
            errs.append(f"{dotted}: {value!r} is not valid; expected {type_name(hints[key])}")
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    for n in missing:
        if f"{prefix}{n}" not in " ".join(errs):
            errs.append(f"{prefix}{n}: required key is missing")
    if missing:
        return None
    for n, f in fields.items():
        # Absent sections still get their defaults checked (train needs iters or epochs).
        if n not in kwargs and f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            kwargs[n] = build(f.default_factory, {}, f"{prefix}{n}.", errs)
    obj = cls(**kwargs)
    if hasattr(obj, "check"):
        errs.extend(obj.check())
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.iters=50"`` -> (["train", "iters"], 50); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, for example train.iters=50")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override {text!r}: the key is empty")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
    return raw


def reference_table(cls: type) -> str:
    """A markdown table of every key of ``cls``, its type, default and meaning."""
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name == "source_path":
                continue
            tp = hints[f.name]
            inner = [a for a in typing.get_args(tp) if isinstance(a, type) and dataclasses.is_dataclass(a)]
            sub = tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else (inner[0] if inner else None)
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = "(required)"
            if sub is not None:
                rows.append(f"| `{prefix}{f.name}` | mapping{' or null' if inner else ''} | | {f.metadata.get('doc', '')} |")
                walk(sub, f"{prefix}{f.name}.")
                continue
            shown = "null" if default is None else (str(default).lower() if isinstance(default, bool) else default)
            rows.append(f"| `{prefix}{f.name}` | {type_name(tp)} | `{shown}` | {f.metadata.get('doc', '')} |")

    walk(cls, "")
    return "\n".join(rows)
