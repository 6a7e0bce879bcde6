"""``data_transform.py``: raw dataset files in, ``train/valid/test.jsonl`` + ``report.json`` out.

Two streaming passes, so memory grows by 17 bytes per record, never with file size:

1. Read every input (``readers.read_records``), apply ``--map``, validate and convert
   each record (``records.to_example`` + ``render``), append the output line to a spool
   file, and keep two 64-bit hashes per record: of the whole record and of its prompt
   (all turns but the last), both after collapsing whitespace and lower-casing.
2. Dedup: the first record of each whole-record hash is kept, later ones are counted.
3. Split: records sharing a prompt go to the same split, in a seeded pseudo-random
   order of prompt groups (``split.assign_splits``, where the rule is stated); the same
   inputs and seed give byte-identical files.
4. Copy the spool lines to their split files in input order, write ``report.json``
   (token lengths with ``--tokenizer``: ``token_stats``), all in a temporary folder in
   ``--out``; only when all are complete are they fsynced and renamed into ``--out``
   (``mlx_tune.atomic``), so a failure leaves the outputs there as they were.

``read == sum(written) + len(skipped) + duplicates`` always holds: every item a reader
yields is counted exactly once.

``--to preference`` / ``--to prompts`` (or ``auto``, the default: from the first record,
``preference.detect_mode``; SFT data gives ``chat`` as before) convert through
``preference`` instead of ``records`` + ``render``; the passes are the same, a pair is
one record keyed on its prompt, and the report adds ``pairs`` and ``kto`` (rows written).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mlx_tune.atomic import fsync_dir, fsync_file, temp_dir_beside
from mlx_tune.data.preference import CONVERTERS, MODES, PREFERENCE_FIELDS, detect_mode
from mlx_tune.data.readers import FILE_TYPES, MAX_RECORD_BYTES, file_type, read_records
from mlx_tune.data.records import RECORD_FIELDS, SHAPES, RecordError, apply_map, to_example
from mlx_tune.data.render import RENDERERS, TRAINER_FORMATS, dumps_example, dumps_record
from mlx_tune.data.split import assign_splits, example_keys, split_sizes
from mlx_tune.data.token_stats import length_stats, load_tokenizer, token_length
from mlx_tune.errors import UserError, run_reporting_errors

SPLITS = ("train", "valid", "test")
OUTPUTS = tuple(f"{s}.jsonl" for s in SPLITS) + ("report.json",)
MAPPABLE = sorted(RECORD_FIELDS | PREFERENCE_FIELDS)
FORMATS = TRAINER_FORMATS + MODES
SHOWN_ERRORS = 100  # bad records echoed to stderr without --strict (all are in report.json)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="CSV, TSV, JSON, JSONL or text files (optionally .gz)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for train/valid/test.jsonl and report.json")
    p.add_argument("--to", choices=("auto",) + FORMATS, default="auto",
                   help="output format (default auto: preference or prompts when the first record is one, else chat)")
    p.add_argument("--valid-ratio", type=float, default=0.1, help="share of records for valid.jsonl (default 0.1)")
    p.add_argument("--test-ratio", type=float, default=0.1, help="share of records for test.jsonl (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    p.add_argument("--map", action="append", default=[], metavar="FIELD=SOURCE_FIELD",
                   help="read FIELD from SOURCE_FIELD (dotted path for nested JSON: answers.0.text); repeatable")
    p.add_argument("--system", help="add this system message to chats that have none (--to chat)")
    p.add_argument("--strict", action="store_true", help="exit 2 and write nothing if any record is bad")
    p.add_argument("--force", action="store_true", help="overwrite outputs already in --out")
    p.add_argument("--tokenizer", metavar="MODEL", help="report token-length statistics with this model's tokenizer")
    p.add_argument("--max-seq-length", type=int, default=2048,
                   help="with --tokenizer: count examples longer than this (default 2048)")
    p.add_argument("--input-format", choices=("auto",) + FILE_TYPES, default="auto",
                   help="file type of every input (default: from each file's suffix)")
    p.add_argument("--text-mode", choices=("blocks", "file"), default="blocks",
                   help="text files: one example per blank-line separated block (default) or per file")
    p.add_argument("--max-record-bytes", type=int, default=MAX_RECORD_BYTES,
                   help=f"skip records longer than this (default {MAX_RECORD_BYTES})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="data_transform.py",
        description="Convert datasets (CSV, TSV, JSON, JSONL, text; Alpaca, ShareGPT, OpenAI messages, "
        "prompt/completion, question/answer, text) into train/valid/test JSONL for mlx_tune.",
    )
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The script's entry point: exit 0 on success, 2 for any user-side problem."""
    args = build_parser().parse_args(argv)
    return run_reporting_errors(lambda: run(args))


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    report = transform(
        args.inputs,
        args.out,
        to=args.to,
        valid_ratio=args.valid_ratio,
        test_ratio=args.test_ratio,
        seed=args.seed,
        mapping=parse_map(args.map),
        system=args.system,
        strict=args.strict,
        force=args.force,
        input_format=None if args.input_format == "auto" else args.input_format,
        text_mode=args.text_mode,
        max_record_bytes=args.max_record_bytes,
        tokenizer=tokenizer,
        max_seq_length=args.max_seq_length,
    )
    w = report["written"]
    print(
        f"read {report['read']} records from {len(args.inputs)} file(s) in {time.perf_counter() - start:.1f}s: "
        f"train {w['train']}, valid {w['valid']}, test {w['test']}; "
        f"{len(report['skipped'])} skipped, {report['duplicates']} duplicates -> {args.out}"
    )
    if "tokens" in report:
        t = report["tokens"]
        print(
            f"tokens per example: min {t['min']}, median {t['median']}, p95 {t['p95']}, max {t['max']}; "
            f"{t['truncated']} of {t['count']} longer than --max-seq-length {t['max_seq_length']}"
        )
    return 0


def parse_map(items: Iterable[str]) -> list[tuple[str, list[str]]]:
    """``["prompt=question_body"]`` -> ``[("prompt", ["question_body"])]``; bad ones are a UserError."""
    mapping = []
    for item in items:
        target, sep, source = item.partition("=")
        target, source = target.strip(), source.strip()
        if not sep or not target or not source:
            raise UserError(f"--map {item!r}: expected FIELD=SOURCE_FIELD, for example --map prompt=question_body")
        if target not in RECORD_FIELDS | PREFERENCE_FIELDS:
            raise UserError(f"--map {item!r}: {target!r} is not a field mlx_tune reads; use one of {', '.join(MAPPABLE)}")
        mapping.append((target, source.split(".")))
    return mapping


def _mapped_shape(mapping: list[tuple[str, list[str]]]) -> str | None:
    """The shape the user points at by mapping one of its identifying fields."""
    targets = {t for t, _ in mapping}
    for name, (fields, _) in SHAPES.items():
        if targets & set(fields):
            return name
    return None


def _explain_map(reason: str, mapping: list[tuple[str, list[str]]]) -> str:
    for target, source in mapping:
        if reason == f"missing field {target!r}":
            return f"{reason} (--map {target}={'.'.join(source)}: the record has no {'.'.join(source)!r})"
    return reason


def _check_ratios(valid_ratio: float, test_ratio: float) -> None:
    for name, r in (("--valid-ratio", valid_ratio), ("--test-ratio", test_ratio)):
        if not 0.0 <= r < 1.0:
            raise UserError(f"{name} {r}: must be in [0, 1)")
    if valid_ratio + test_ratio >= 1.0:
        raise UserError(f"--valid-ratio {valid_ratio} + --test-ratio {test_ratio} must be < 1 to leave training data")


@dataclass(frozen=True)
class Options:
    """Every setting of a conversion (the CLI flags, one field each)."""

    to: str = "auto"  # auto: resolved from the first record (``_resolve_to``)
    valid_ratio: float = 0.1
    test_ratio: float = 0.1
    seed: int = 0
    mapping: tuple = ()  # ((FIELD, [SOURCE, path, parts]), ...) from parse_map
    system: str | None = None
    strict: bool = False
    force: bool = False
    input_format: str | None = None  # None: from each file's suffix
    text_mode: str = "blocks"
    max_record_bytes: int = MAX_RECORD_BYTES
    max_seq_length: int | None = None

    def check(self) -> None:
        if self.to not in RENDERERS and self.to not in CONVERTERS and self.to != "auto":
            raise UserError(f"--to {self.to!r}: use one of {', '.join(FORMATS)}")
        _check_ratios(self.valid_ratio, self.test_ratio)
        if self.system is not None and self.to not in ("chat", "auto"):
            raise UserError("--system adds a system message to chats; it needs --to chat")
        if self.system is not None and not self.system.strip():
            raise UserError("--system is empty; give the system message text")
        if self.max_record_bytes <= 0:
            raise UserError(f"--max-record-bytes {self.max_record_bytes}: must be positive")


@dataclass
class _Pass1:
    """What reading and converting every input left behind (the spool holds the lines)."""

    read: int = 0
    skipped: list = field(default_factory=list)
    shapes: dict = field(default_factory=dict)
    files: list = field(default_factory=list)
    record_hashes: bytearray = field(default_factory=bytearray)  # 8 bytes per converted record
    prompt_hashes: bytearray = field(default_factory=bytearray)
    map_hits: list = field(default_factory=list)
    kinds: bytearray = field(default_factory=bytearray)  # --to preference: 1 a pair, 2 a KTO row


def transform(
    inputs: list[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    tokenizer: Any = None,
    echo: Callable[[str], None] | None = None,
    **options: Any,
) -> dict:
    """Convert ``inputs`` into ``out_dir``; return the report (also written as report.json).

    ``options`` are the fields of ``Options``. Raises ``UserError`` (exit 2) when nothing
    is usable, with ``strict`` and any bad record, or for an unreadable input or an
    occupied ``out_dir`` without ``force``; then nothing in ``out_dir`` changes. Bad
    records are echoed as ``file:line: reason`` through ``echo`` (stderr by default).
    """
    opts = Options(**{**options, "mapping": tuple(options.get("mapping", ()))})
    opts.check()
    echo = echo or (lambda line: print(line, file=sys.stderr))
    if not inputs:
        raise UserError("no input files given")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; give a folder")
    existing = [name for name in OUTPUTS if (out / name).exists()]
    if existing and not opts.force:
        raise UserError(f"--out {out}: already holds {', '.join(existing)}; pass --force to overwrite")
    for path in inputs:  # fail on a missing file before reading gigabytes of the others
        if not Path(path).exists():
            raise UserError(f"{path}: no such file")
        if opts.input_format is None:
            file_type(path)
    if opts.to == "auto":
        opts = replace(opts, to=_resolve_to(inputs, opts))
        opts.check()  # --system on a file that turned out to hold pairs

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    # Everything is written next to its final place, then moved in (``_move_in``).
    tmp = temp_dir_beside(out / "data_transform")
    try:
        spool = tmp / "spool.jsonl"
        with open(spool, "wb") as f:
            p1 = _read_and_convert(inputs, opts, f.write)
        _check_usable(p1, inputs, opts, out, echo)
        report = _dedup_split_write(p1, spool, tmp, opts, tokenizer)
        _move_in(tmp, out, OUTPUTS)
        return report
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_and_convert(inputs, opts: Options, write: Callable[[bytes], Any]) -> _Pass1:
    """Pass 1: every record read, mapped, validated, converted and spooled (or skipped)."""
    p1 = _Pass1(map_hits=[0] * len(opts.mapping))
    # Hot loop: bind everything it calls to locals.
    dumps, convert, remap = dumps_example, to_example, apply_map
    tools_text = json.JSONEncoder(ensure_ascii=False, sort_keys=True).encode
    blake2b = hashlib.blake2b
    to, system, mapping, map_hits = opts.to, opts.system, list(opts.mapping), p1.map_hits
    forced_shape = _mapped_shape(mapping)
    shapes, skipped = p1.shapes, p1.skipped
    record_hashes, prompt_hashes = p1.record_hashes, p1.prompt_hashes
    special = CONVERTERS.get(to)
    for path in inputs:
        file_read = 0
        fmt = opts.input_format or file_type(path)
        for line, value, error in read_records(
            path, fmt, text_mode=opts.text_mode, max_record_bytes=opts.max_record_bytes
        ):
            file_read += 1
            if error is None and special is not None:
                error = _convert_special(special, remap(value, mapping, map_hits) if mapping else value, p1, write)
                if error is None:
                    continue
            elif error is None:
                try:
                    if mapping:
                        value = remap(value, mapping, map_hits)
                    ex = convert(value, forced_shape)
                    data = (dumps(ex, to, system) + "\n").encode("utf-8")
                    rkey, pkey = example_keys(ex, tools_text)
                except RecordError as exc:
                    error = _explain_map(str(exc), mapping)
                except UnicodeEncodeError:
                    error = "text holds an unpaired surrogate (invalid Unicode escape)"
                except RecursionError:
                    error = "JSON nested too deeply"
                else:
                    write(data)
                    record_hashes += blake2b(rkey.encode("utf-8", "surrogatepass"), digest_size=8).digest()
                    prompt_hashes += blake2b(pkey.encode("utf-8", "surrogatepass"), digest_size=8).digest()
                    shapes[ex.shape] = shapes.get(ex.shape, 0) + 1
                    continue
            skipped.append({"file": str(path), "line": line, "reason": error})
        p1.read += file_read
        p1.files.append({"file": str(path), "format": fmt, "read": file_read})
    return p1


def _convert_special(convert, value, p1: _Pass1, write: Callable[[bytes], Any]) -> str | None:
    """One record through ``preference``'s ``convert``, spooled and hashed; the reason if bad."""
    try:
        row, shape, rkey, pkey = convert(value)
        data = (dumps_record(row) + "\n").encode("utf-8")
    except RecordError as exc:
        return str(exc)
    except UnicodeEncodeError:
        return "text holds an unpaired surrogate (invalid Unicode escape)"
    except RecursionError:
        return "JSON nested too deeply"
    write(data)
    p1.record_hashes += hashlib.blake2b(rkey.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    p1.prompt_hashes += hashlib.blake2b(pkey.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    p1.shapes[shape] = p1.shapes.get(shape, 0) + 1
    p1.kinds.append(2 if shape.startswith("kto") else 1)
    return None


def _resolve_to(inputs, opts: Options) -> str:
    """``--to auto``: ``preference`` or ``prompts`` when the first record is one, else ``chat``."""
    mapping = list(opts.mapping)
    for path in inputs:
        records = read_records(path, opts.input_format or file_type(path), text_mode=opts.text_mode,
                               max_record_bytes=opts.max_record_bytes)
        try:
            for _line, value, error in records:
                if error is None:
                    return detect_mode(apply_map(value, mapping) if mapping else value) or "chat"
        finally:
            records.close()
    return "chat"


def _check_usable(p1: _Pass1, inputs, opts: Options, out: Path, echo) -> None:
    """Echo the bad records; raise for an empty input, --strict, or nothing usable."""
    skipped = p1.skipped
    shown = len(skipped) if opts.strict else min(len(skipped), SHOWN_ERRORS)
    for s in skipped[:shown]:
        echo(f"{s['file']}:{s['line']}: {s['reason']}")
    if shown < len(skipped):
        echo(f"... and {len(skipped) - shown} more bad records (all listed in {out / 'report.json'})")
    for (target, source), hits in zip(opts.mapping, p1.map_hits):
        if not hits:
            echo(f"warning: --map {target}={'.'.join(source)}: no record has field {'.'.join(source)!r}")
    names = ", ".join(str(p) for p in inputs)
    if p1.read == 0:
        raise UserError(f"no records in {names} (empty input)")
    if opts.strict and skipped:
        raise UserError(f"--strict: {len(skipped)} of {p1.read} records are bad (listed above); nothing was written")
    if not p1.record_hashes:
        raise UserError(f"no usable record in {names}: all {p1.read} records were skipped (reasons above)")


def _dedup_split_write(p1: _Pass1, spool: Path, tmp: Path, opts: Options, tokenizer: Any) -> dict:
    """Passes 2-4 of the module doc: dedup, split, copy the spool into the split files."""
    import numpy as np

    n = len(p1.record_hashes) // 8
    _, first = np.unique(np.frombuffer(bytes(p1.record_hashes), dtype=np.uint64), return_index=True)
    first.sort()  # the first occurrence of each record survives, in input order
    duplicates = n - len(first)
    prompts = np.frombuffer(bytes(p1.prompt_hashes), dtype=np.uint64)[first]
    n_valid, n_test = split_sizes(len(first), opts.valid_ratio, opts.test_ratio)
    dest = np.full(n, 3, dtype=np.uint8)  # 3: a duplicate, not written
    dest[first] = assign_splits(prompts, n_valid, n_test, opts.seed)

    counts = [0, 0, 0]
    lengths: list[int] = []
    outs = [open(tmp / f"{s}.jsonl", "wb") for s in SPLITS]
    try:
        writers = [f.write for f in outs]
        with open(spool, "rb") as f:
            for data, d in zip(f, dest.tobytes()):
                if d < 3:
                    writers[d](data)
                    counts[d] += 1
                    if tokenizer is not None:
                        lengths.append(token_length(json.loads(data), tokenizer))
    finally:
        for f in outs:
            f.close()
    spool.unlink()

    report: dict[str, Any] = {
        "read": p1.read,
        "written": dict(zip(SPLITS, counts)),
        "skipped": p1.skipped,
        "duplicates": duplicates,
        "to": opts.to,
        "seed": opts.seed,
        "valid_ratio": opts.valid_ratio,
        "test_ratio": opts.test_ratio,
        "inputs": p1.files,
        "shapes": dict(sorted(p1.shapes.items())),
    }
    if opts.to == "preference":
        kinds = np.frombuffer(bytes(p1.kinds), dtype=np.uint8)[dest < 3]
        report["pairs"] = int((kinds == 1).sum())
        report["kto"] = int((kinds == 2).sum())
    if tokenizer is not None:
        report["tokens"] = length_stats(lengths, opts.max_seq_length)
    if sum(counts) + len(p1.skipped) + duplicates != p1.read:  # a bug, never the user's
        raise RuntimeError(f"record accounting is off: {counts} + {len(p1.skipped)} + {duplicates} != {p1.read}")
    # A plain write: tmp is already the temporary folder, and _move_in fsyncs and renames it.
    (tmp / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return report


def _move_in(tmp: Path, out: Path, names: Iterable[str]) -> None:
    """The finished files ``names`` of ``tmp`` into ``out``: all on disk (fsynced) before
    the first rename, each rename atomic, then ``out``'s entries fsynced."""
    names = list(names)
    for name in names:
        fsync_file(tmp / name)
    for name in names:
        os.replace(tmp / name, out / name)
    fsync_dir(out)
