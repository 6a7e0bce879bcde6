"""Datasets: raw files in, validated training records out.

``formats`` reads files (CSV, TSV, JSON, JSONL, text) and knows the record shapes and
what makes a record valid; ``transform`` is ``data_transform.py``: dedup, split, report.
The trainer reads its JSONL through ``formats`` too, so both agree on every record.
"""

from mlx_tune.data.formats import (
    TRAINER_FORMATS,
    Dataset,
    Example,
    RecordError,
    check_messages,
    detect_format,
    detect_shape,
    dumps_example,
    read_dataset,
    read_jsonl_records,
    read_records,
    render,
    to_example,
    validate_record,
)

__all__ = [
    "Dataset",
    "Example",
    "check_messages",
    "dumps_example",
    "RecordError",
    "TRAINER_FORMATS",
    "detect_format",
    "detect_shape",
    "read_dataset",
    "read_jsonl_records",
    "read_records",
    "render",
    "to_example",
    "validate_record",
]
