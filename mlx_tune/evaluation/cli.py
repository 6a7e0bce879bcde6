"""``python test_mlx.py``: score a served model on a prompts file.

    python test_mlx.py --base-url http://127.0.0.1:8080 --prompts data/demo/prompts.jsonl \
        [--model NAME | --compare MODEL_A MODEL_B] [--report OUT.json] [--concurrency N]
        [--stream] [--max-tokens 256] [--temperature 0] [--api-key KEY] [--timeout 120]
        [--min-accuracy X]

Works against any OpenAI-compatible server (mlx-tune serve, mlx_lm.server, Ollama, ...).
The report JSON (one model, or ``{"compare": [report_A, report_B], ...}`` with
``--compare``) is described field by field in ``mlx_tune/evaluation/report.py``.
Exit codes: 0 every row got an answer (whatever the accuracy); 1 some row failed on the
server, or accuracy is below ``--min-accuracy`` (with ``--compare``: MODEL_B's, the
candidate's); 2 a mistake to fix before anything can run (prompts file, server down,
unknown model, bad option).
"""

from __future__ import annotations

import argparse
import os
import sys

from mlx_tune.atomic import write_json_atomic
from mlx_tune.errors import UserError
from mlx_tune.evaluation.client import OpenAIClient
from mlx_tune.evaluation.prompts import read_prompts
from mlx_tune.evaluation.report import RunOptions, compare_report, format_compare, format_results, format_summary, run_model

DEFAULT_BASE_URL = "http://127.0.0.1:8080"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction between 0 and 1 (0.8 for 80%), got {text}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="test_mlx.py",
        description="Send a prompts file to an OpenAI-compatible server, score the answers, "
                    "print a table and write a JSON report.",
    )
    p.add_argument("--base-url", default=os.environ.get("MLX_TUNE_BASE_URL", DEFAULT_BASE_URL),
                   help=f"server root, with or without /v1 (default {DEFAULT_BASE_URL})")
    p.add_argument("--prompts", required=True, metavar="FILE.jsonl",
                   help='one JSON object per line: {"prompt"|"messages", "expected", "match"}')
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", metavar="NAME", help="model id (default: the first in GET /v1/models)")
    which.add_argument("--compare", nargs=2, metavar=("MODEL_A", "MODEL_B"),
                       help="run the prompts against two models and show them side by side")
    p.add_argument("--report", metavar="OUT.json", help="write the JSON report here (atomically)")
    p.add_argument("--concurrency", type=_positive_int, default=1, metavar="N",
                   help="requests in flight at once (default 1)")
    p.add_argument("--stream", action="store_true", help="ask for server-sent events (stream: true)")
    p.add_argument("--max-tokens", type=_positive_int, default=256, help="max tokens per answer (default 256)")
    p.add_argument("--temperature", type=_non_negative, default=0.0, help="sampling temperature (default 0: greedy)")
    p.add_argument("--api-key", default=None,
                   help="bearer token (default: $MLX_TUNE_API_KEY, then $OPENAI_API_KEY)")
    p.add_argument("--timeout", type=_positive_float, default=120.0, help="seconds per request (default 120)")
    p.add_argument("--min-accuracy", type=_fraction, default=None, metavar="X",
                   help="exit 1 when accuracy is below X (0..1)")
    p.add_argument("--skip-model-check", action="store_true",
                   help="do not check the model name against GET /v1/models")
    return p


def _progress(model: str, total: int, concurrency: int):
    print(f"asking {model}: {total} prompts, {concurrency} at a time", file=sys.stderr, flush=True)
    if not sys.stderr.isatty():
        return None  # a log file gets the line above, not a carriage-return counter

    def show(done: int, total: int) -> None:
        end = "\n" if done == total else ""
        print(f"\r{model}: {done}/{total} answered", end=end, file=sys.stderr, flush=True)

    return show


def evaluate(args: argparse.Namespace) -> int:
    rows = read_prompts(args.prompts)
    api_key = args.api_key or os.environ.get("MLX_TUNE_API_KEY") or os.environ.get("OPENAI_API_KEY")
    opts = RunOptions(max_tokens=args.max_tokens, temperature=args.temperature,
                      stream=args.stream, concurrency=args.concurrency)
    if args.compare and args.compare[0] == args.compare[1]:
        raise UserError(f"--compare needs two different models, got '{args.compare[0]}' twice")
    with OpenAIClient(args.base_url, api_key=api_key, timeout=args.timeout,
                      concurrency=args.concurrency) as client:
        check = not args.skip_model_check
        # Resolve every model before the first prompt so a typo costs no generation time.
        names = ([client.resolve_model(m, check=check) for m in args.compare] if args.compare
                 else [client.resolve_model(args.model, check=check)])
        reports = []
        for name in names:
            report = run_model(client, rows, name, opts, progress=_progress(name, len(rows), args.concurrency))
            reports.append(report)
            if not args.compare:
                print(format_results(report))
            print(format_summary(report))
    if args.compare:
        print()
        final = compare_report(*reports)
        print(format_compare(final))
    else:
        final = reports[0]
    if args.report:
        write_json_atomic(args.report, final)
        print(f"report written to {args.report}")

    status = 0
    for report in reports:
        failed = [r for r in report["results"] if "error" in r]
        if failed:
            first = failed[0]
            print(f"error: {len(failed)} of {report['n']} rows failed for model {report['model']} "
                  f"(first, line {first['line']}: {first['error']})", file=sys.stderr)
            status = 1
    candidate = reports[-1]
    if args.min_accuracy is not None:
        acc = candidate["accuracy"]
        if acc is None or acc < args.min_accuracy:
            shown = "no scored rows" if acc is None else f"{100 * acc:.1f}%"
            print(f"error: accuracy of {candidate['model']} is {shown}, below --min-accuracy "
                  f"{100 * args.min_accuracy:.1f}%", file=sys.stderr)
            status = 1
    return status


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return evaluate(args)
    except UserError as exc:
        for line in str(exc).splitlines() or [""]:
            print(f"error: {line}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
