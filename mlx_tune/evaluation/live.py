"""Scoring prompts in-process: the loaded model answers through the server's decoder.

``LiveScorer(model, tokenizer)`` puts the model behind a ``server.registry.ModelRegistry``
and a ``server.engine.Engine`` that is never started as a thread: ``answer`` queues
every row as a greedy request and ``Engine.run_pending`` decodes them on the calling
thread in continuous batches, exactly as ``mlx-tune serve`` would, with no server
process and no copy of any weight. ``report`` scores the answers with
``evaluation.report.build_report``, so the report is test_mlx.py's.

Prompts are encoded as the server encodes them: chat rows with the tokenizer's chat
template and the generation prompt, prompt rows as plain text.

During training the model is the live one: its adapter (already in the model) is
registered as resident under its own name, dropout is switched off while answering
(``model.eval()``) and the previous mode, active adapter and layers are restored
afterwards. On the CPU backend the quantized base layers are swapped for the server's
(``server.fastpath``: a cached fp32 copy for batched rows) while answering, within
``swap_budget`` bytes of copies, and swapped back (the same arrays: nothing is copied
into the trained model). ``mlx-tune eval`` prepares the model as ``mlx-tune serve`` does.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from mlx.utils import tree_unflatten

from mlx_tune.evaluation.client import Answer
from mlx_tune.evaluation.prompts import PromptRow, content_text
from mlx_tune.evaluation.report import RunOptions, build_report


def encode_row(tokenizer, row: PromptRow) -> list[int]:
    """The prompt tokens the server would decode from for ``row``."""
    if row.messages is None:
        ids = tokenizer.encode(row.prompt or "")
        return ids or [getattr(tokenizer, "bos_token_id", None) or 0]
    messages = [{"role": m["role"], "content": content_text(m.get("content", ""))} for m in row.messages]
    if getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        if isinstance(out, dict) or hasattr(out, "input_ids"):
            out = out["input_ids"]
        return list(out)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
    return tokenizer.encode(text)


@contextlib.contextmanager
def serving_layers(model, budget: int):
    """The server's CPU layers in ``model`` for the duration (``budget``: bytes of fp32 copies)."""
    from mlx_tune.server.fastpath import SWAPS, prepare_for_serving

    before = [(p, m) for p, m in model.named_modules() if type(m) in SWAPS]
    if before:
        prepare_for_serving(model, dense_budget_bytes=budget, measure=False)
    try:
        yield
    finally:
        if before:
            model.update_modules(tree_unflatten(before))


class LiveScorer:
    """Answers prompt rows with ``model`` (base or its adapters) on the calling thread."""

    def __init__(self, model, tokenizer, info=None, *, adapters: dict[str, str] | None = None,
                 max_batch: int = 16, mix_adapters: bool = False, swap_budget: int | None = None):
        from mlx_tune.server.engine import Engine
        from mlx_tune.server.registry import ModelRegistry

        self.model = model
        self.tokenizer = tokenizer
        self.swap_budget = swap_budget  # None: leave the layers as they are
        self.registry = ModelRegistry(model, tokenizer, info, max_loras=max(8, len(adapters or {}) + 1))
        for name, path in (adapters or {}).items():
            self.registry.add(name, path, trusted=True)
        self.engine = Engine(self.registry, max_batch=max_batch, max_queue=1 << 30, mix_adapters=mix_adapters)

    def use_resident(self, name: str) -> None:
        """Serve adapter ``name`` already in the model (the one being trained)."""
        if name not in self.registry.entries:
            self.registry.add_resident(name)

    def answer(self, rows: list[PromptRow], adapter: str | None, max_tokens: int) -> list[Answer]:
        """Greedy answers to ``rows`` from ``adapter`` (None: the base alone)."""
        from mlx_tune.server.engine import Delta, Done, Failed, GenRequest

        answers = [Answer() for _ in rows]
        start = time.perf_counter()

        def collect(i: int):
            def emit(event) -> None:
                a = answers[i]
                if isinstance(event, Delta):
                    a.output += event.text
                elif isinstance(event, Done):
                    a.completion_tokens = event.completion_tokens
                    a.latency_s = time.perf_counter() - start
                elif isinstance(event, Failed):
                    a.error = event.error.message
                    a.latency_s = time.perf_counter() - start
            return emit

        # The weights may have changed since the last call (training between evaluations): a
        # prompt's cached KV from then is stale.
        self.engine.forget_prefixes(adapter)
        was_training, active = self.model.training, self.registry.manager.active
        self.model.eval()  # no dropout while answering
        layers = serving_layers(self.model, self.swap_budget) if self.swap_budget is not None else contextlib.nullcontext()
        try:
            with layers:
                for i, row in enumerate(rows):
                    request = GenRequest(prompt=encode_row(self.tokenizer, row), adapter=adapter,
                                         max_tokens=max_tokens, temperature=0.0)
                    self.engine.submit(request, collect(i))
                self.engine.run_pending()
        finally:
            # Switching adapters also switches which one is trainable: put the model back as it was.
            self.registry.activate(active)
            self.model.train(was_training)
        return answers

    def report(self, rows: list[PromptRow], adapter: str | None, max_tokens: int, label: str | None = None) -> dict:
        """test_mlx.py's report for ``adapter``'s answers (model name ``label``)."""
        tic = time.perf_counter()
        answers = self.answer(rows, adapter, max_tokens)
        name = label or adapter or "base"
        return build_report(name, rows, answers, RunOptions(max_tokens=max_tokens, temperature=0.0,
                                                            concurrency=len(rows)), time.perf_counter() - tic)


def accuracy_metrics(report: dict[str, Any]) -> dict[str, float | None]:
    """``eval_accuracy`` and ``eval_accuracy_<match>`` per match type, as flat metrics keys."""
    out: dict[str, float | None] = {"eval_accuracy": report["accuracy"]}
    by_match: dict[str, list[bool]] = {}
    for r in report["results"]:
        if r["correct"] is not None:
            by_match.setdefault(r["match"], []).append(bool(r["correct"]))
    for match, marks in sorted(by_match.items()):
        out[f"eval_accuracy_{match}"] = round(sum(marks) / len(marks), 6)
    return out


def step_scorer(scorer: LiveScorer, rows: list[PromptRow], adapter: str | None, max_tokens: int):
    """``score(step) -> (metrics row, answers)`` for the eval prompts during training."""
    def score(step: int) -> tuple[dict, list[dict]]:
        tic = time.perf_counter()
        report = scorer.report(rows, adapter, max_tokens, label=f"step {step}")
        row = {"step": step, **accuracy_metrics(report), "eval_prompts": len(rows),
               "eval_time_s": round(time.perf_counter() - tic, 3)}
        keys = ("line", "prompt", "expected", "output", "correct", "match", "completion_tokens")
        return row, [{k: r.get(k) for k in keys} for r in report["results"]]
    return score


def score_models(model, tokenizer, info, adapters: dict[str, str], rows: list[PromptRow], *, max_tokens: int,
                 max_batch: int = 16, base: bool = True) -> list[dict]:
    """test_mlx.py reports for the base (``base``) and each adapter {name: folder}, in that order.

    Every adapter is loaded beside the base once; each model's rows are decoded as one batch.
    """
    from mlx_tune.server.fastpath import prepare_for_serving

    prepare_for_serving(model)  # as `mlx-tune serve` does (a no-op off the CPU backend)
    scorer = LiveScorer(model, tokenizer, info, adapters=adapters, max_batch=max_batch, mix_adapters=True)
    names: list[str | None] = ([None] if base else []) + list(adapters)
    return [scorer.report(rows, name, max_tokens, label=name or "base") for name in names]
