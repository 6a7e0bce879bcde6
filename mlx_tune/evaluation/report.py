"""Running the prompts against a model, and the report built from the answers.

Report of one model (the fields in the contract first, then extras)::

    {"model": str, "n": rows sent, "accuracy": correct / scored rows (None if none scored),
     "results": [{"prompt", "output", "expected", "correct", "latency_s",
                  + "match", "line", "completion_tokens", ("messages", "id", "ttft_s", "error")}],
     "latency_s_p50": median latency of rows that answered,
     "tokens_per_sec": sum(completion tokens) / sum(latency) over rows that answered,
     "throughput_tokens_per_sec": sum(completion tokens) / wall time of the whole run,
     "token_count": "usage" | "words" | "usage+words", "scored", "correct", "errors", "wall_s", ...}

``correct`` is None for a row without ``expected``; a row that failed counts as wrong.
``tokens_per_sec`` is the speed one client sees (independent of ``--concurrency``);
``throughput_tokens_per_sec`` is what the server delivered to all clients together.
Completion tokens come from the server's ``usage``; where a server sends none, words
(whitespace-separated) are counted instead and ``token_count`` says so.

Report of ``--compare A B``: ``{"compare": [report_A, report_B], "models": [A, B], "n",
"accuracy": {A: .., B: ..}, "latency_s_p50": {A: .., B: ..}, "tokens_per_sec": {A: .., B: ..},
"errors": {A: .., B: ..}, "differences": [{"index", "line", "prompt", "expected",
"outputs": {A, B}, "correct": {A, B}}]}``. Two rows differ when their correctness differs
(an error counts as wrong), or, for unscored rows, when their trimmed outputs differ.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from mlx_tune.evaluation.client import Answer, OpenAIClient
from mlx_tune.evaluation.prompts import PromptRow
from mlx_tune.evaluation.scoring import score


@dataclass(frozen=True)
class RunOptions:
    max_tokens: int = 256
    temperature: float = 0.0
    stream: bool = False
    concurrency: int = 1


def run_model(client: OpenAIClient, rows: list[PromptRow], model: str, opts: RunOptions,
              progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Send every row (``opts.concurrency`` at a time), score the answers, build the report."""
    answers: list[Answer | None] = [None] * len(rows)

    def one(i: int) -> None:
        answers[i] = client.ask(rows[i], model, max_tokens=opts.max_tokens,
                                temperature=opts.temperature, stream=opts.stream)

    start = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=max(1, opts.concurrency))
    try:
        for done, _ in enumerate(pool.map(one, range(len(rows))), start=1):
            if progress:
                progress(done, len(rows))
    except BaseException:
        # Ctrl-C: drop the queued rows instead of sending them all before exiting.
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    wall_s = time.perf_counter() - start
    return build_report(model, rows, answers, opts, wall_s)  # type: ignore[arg-type]


def _result(row: PromptRow, answer: Answer) -> dict[str, Any]:
    correct = score(answer.output, row.expected, row.match)
    if answer.error is not None and row.expected is not None:
        correct = False
    result: dict[str, Any] = {
        "prompt": row.display,
        "output": answer.output,
        "expected": row.expected,
        "correct": correct,
        "latency_s": round(answer.latency_s, 4),
        "match": row.match,
        "line": row.line,
        "completion_tokens": answer.completion_tokens,
    }
    if row.is_chat:
        result["messages"] = row.messages
    if row.id is not None:
        result["id"] = row.id
    if answer.ttft_s is not None:
        result["ttft_s"] = round(answer.ttft_s, 4)
    if answer.error is not None:
        result["error"] = answer.error
    return result


def build_report(model: str, rows: list[PromptRow], answers: list[Answer], opts: RunOptions,
                 wall_s: float) -> dict[str, Any]:
    results = [_result(r, a) for r, a in zip(rows, answers)]
    ok = [a for a in answers if a.error is None]
    scored = [r for r in results if r["correct"] is not None]
    n_correct = sum(1 for r in scored if r["correct"])
    sources = set()
    tokens = 0
    for a in ok:
        if a.completion_tokens is not None:
            tokens += a.completion_tokens
            sources.add("usage")
        else:
            tokens += len(a.output.split())
            sources.add("words")
    gen_s = sum(a.latency_s for a in ok)
    return {
        "model": model,
        "n": len(rows),
        "accuracy": round(n_correct / len(scored), 6) if scored else None,
        "results": results,
        "latency_s_p50": round(statistics.median(a.latency_s for a in ok), 4) if ok else None,
        "tokens_per_sec": round(tokens / gen_s, 3) if gen_s > 0 else None,
        "throughput_tokens_per_sec": round(tokens / wall_s, 3) if wall_s > 0 and ok else None,
        "completion_tokens": tokens,
        "token_count": "+".join(sorted(sources, reverse=True)) or None,
        "scored": len(scored),
        "correct": n_correct,
        "errors": len(answers) - len(ok),
        "wall_s": round(wall_s, 4),
        "stream": opts.stream,
        "concurrency": opts.concurrency,
        "max_tokens": opts.max_tokens,
        "temperature": opts.temperature,
    }


def shown_answer(result: dict[str, Any]) -> str:
    """The answer as printed: the output, or ``[error] why`` for a row that failed."""
    return f"[error] {result['error']}" if "error" in result else result["output"]


def differ(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Rows differ in correctness; unscored rows differ in their (trimmed) output."""
    if a["correct"] is None and b["correct"] is None:
        return ("error" in a) != ("error" in b) or a["output"].strip() != b["output"].strip()
    return a["correct"] != b["correct"]


def compare_report(report_a: dict[str, Any], report_b: dict[str, Any]) -> dict[str, Any]:
    a_name, b_name = report_a["model"], report_b["model"]
    differences = []
    for i, (ra, rb) in enumerate(zip(report_a["results"], report_b["results"])):
        if differ(ra, rb):
            differences.append({
                "index": i,
                "line": ra["line"],
                "prompt": ra["prompt"],
                "expected": ra["expected"],
                "outputs": {a_name: shown_answer(ra), b_name: shown_answer(rb)},
                "correct": {a_name: ra["correct"], b_name: rb["correct"]},
            })
    per_model = lambda key: {r["model"]: r[key] for r in (report_a, report_b)}  # noqa: E731
    return {
        "compare": [report_a, report_b],
        "models": [a_name, b_name],
        "n": report_a["n"],
        "accuracy": per_model("accuracy"),
        "latency_s_p50": per_model("latency_s_p50"),
        "tokens_per_sec": per_model("tokens_per_sec"),
        "errors": per_model("errors"),
        "differences": differences,
    }


# -- printing --------------------------------------------------------------------------------
def cell(value: Any, width: int) -> str:
    """One line of at most ``width`` characters: newlines shown as ``\\n``, cut with ``…``."""
    if value is None:
        text = "-"
    elif isinstance(value, str):
        text = value
    else:
        text = json.dumps(value, ensure_ascii=False)
    text = text.replace("\r", "").replace("\n", "\\n").replace("\t", " ")
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def _mark(result: dict[str, Any]) -> str:
    if "error" in result:
        return "ERROR"
    return {True: "yes", False: "no", None: "-"}[result["correct"]]


def _table(headers: list[str], widths: list[int], rows: list[list[str]]) -> str:
    def fmt(values: list[str]) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip()

    lines = [fmt(headers), fmt(["-" * w for w in widths])]
    lines += [fmt([cell(v, w) for v, w in zip(r, widths)]) for r in rows]
    return "\n".join(lines)


def _text_widths(fixed: int, parts: int) -> int:
    columns = shutil.get_terminal_size((120, 24)).columns
    return max(12, (max(columns, 80) - fixed) // parts)


def format_results(report: dict[str, Any]) -> str:
    """Table of rows: #, prompt, expected, answer, correct, latency (long cells cut)."""
    w = _text_widths(fixed=4 + 6 + 9 + 10, parts=4)
    rows = []
    for i, r in enumerate(report["results"], start=1):
        rows.append([str(i), r["prompt"], r["expected"], shown_answer(r), _mark(r), f"{r['latency_s']:.3f}s"])
    return _table(["#", "prompt", "expected", "answer", "correct", "latency"],
                  [3, w, w, 2 * w, 7, 8], rows)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_summary(report: dict[str, Any]) -> str:
    note = "" if report["token_count"] in (None, "usage") else (
        "  (tokens counted as words: the server sent no usage)")
    return (
        f"model {report['model']}: accuracy {_pct(report['accuracy'])} "
        f"({report['correct']}/{report['scored']} scored, {report['n']} rows), "
        f"p50 latency {_num(report['latency_s_p50'], '.3f')} s, "
        f"{_num(report['tokens_per_sec'], '.1f')} tokens/s, {report['errors']} failed{note}"
    )


def format_compare(comparison: dict[str, Any]) -> str:
    a, b = comparison["compare"]
    names = comparison["models"]
    w = max(12, *(len(n) for n in names))
    def row(label: str, x: str, y: str) -> str:
        return f"{label:16}{x:>{w}}  {y:>{w}}"

    lines = [
        row("", names[0], names[1]),
        row("accuracy", _pct(a["accuracy"]), _pct(b["accuracy"])),
        row("correct/scored", f"{a['correct']}/{a['scored']}", f"{b['correct']}/{b['scored']}"),
        row("p50 latency (s)", _num(a["latency_s_p50"], ".3f"), _num(b["latency_s_p50"], ".3f")),
        row("tokens/s", _num(a["tokens_per_sec"], ".1f"), _num(b["tokens_per_sec"], ".1f")),
        row("errors", str(a["errors"]), str(b["errors"])),
    ]
    diffs = comparison["differences"]
    lines.append("")
    if not diffs:
        lines.append("the two models agree on every row")
        return "\n".join(lines)
    lines.append(f"rows where they differ ({len(diffs)} of {comparison['n']}):")
    tw = _text_widths(fixed=4 + 2 * 5 + 12, parts=4)
    rows = []
    for d in diffs:
        marks = [{True: "yes", False: "no", None: "-"}[d["correct"][m]] for m in names]
        rows.append([str(d["index"] + 1), d["prompt"], d["expected"],
                     d["outputs"][names[0]], marks[0], d["outputs"][names[1]], marks[1]])
    lines.append(_table(["#", "prompt", "expected", f"{names[0]}", "ok", f"{names[1]}", "ok"],
                        [3, tw, tw, tw, 3, tw, 3], rows))
    return "\n".join(lines)
