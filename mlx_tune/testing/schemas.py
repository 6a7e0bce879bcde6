"""JSON schemas the structured-output checks run: nested objects, arrays, enums, numbers,
optional and required keys, each with one valid instance. Shared by the tests and
``bench/bench_grammar.py`` so both judge the same cases."""

from __future__ import annotations

SUITE: dict[str, tuple[dict, object]] = {
    "flat": (
        {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
         "required": ["name", "age"], "additionalProperties": False},
        {"name": "Ada", "age": 36},
    ),
    "nested": (
        {"type": "object", "properties": {
            "user": {"type": "object", "properties": {"id": {"type": "integer"}, "email": {"type": "string"}},
                     "required": ["id", "email"], "additionalProperties": False},
            "active": {"type": "boolean"}},
         "required": ["user", "active"], "additionalProperties": False},
        {"user": {"id": 7, "email": "a@b.c"}, "active": True},
    ),
    "array": (
        {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}, "minItems": 1,
                                                   "maxItems": 4}},
         "required": ["tags"], "additionalProperties": False},
        {"tags": ["red", "blue"]},
    ),
    "enum": (
        {"type": "object", "properties": {"sentiment": {"type": "string", "enum": ["positive", "negative", "neutral"]}},
         "required": ["sentiment"], "additionalProperties": False},
        {"sentiment": "positive"},
    ),
    "numbers": (
        {"type": "object", "properties": {"price": {"type": "number"}, "qty": {"type": "integer", "minimum": 0,
                                                                              "maximum": 99}},
         "required": ["price", "qty"], "additionalProperties": False},
        {"price": 2.5, "qty": 3},
    ),
    "optional": (
        {"type": "object", "properties": {"title": {"type": "string"}, "subtitle": {"type": "string"},
                                          "year": {"type": "integer"}},
         "required": ["title"], "additionalProperties": False},
        {"title": "Dune", "year": 1965},
    ),
}
