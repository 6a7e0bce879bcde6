"""Datasets: raw files in, validated training records out, then tokens and batches.

``readers`` reads files (CSV, TSV, JSON, JSONL, text; ``json_reader`` and ``textio``
underneath); ``records`` knows the record shapes and what makes a record valid;
``render`` writes an example in a trainer format; ``dataset`` is the trainer's reading
of its JSONL (through the same ``records``, so data_transform.py and the trainer agree
on every record); ``preference`` knows preference pairs, KTO rows and prompt-only
(GRPO) rows; ``transform`` is ``data_transform.py``: dedup, split, report; ``tokenize``
turns records into ids and a loss mask, with ``masks`` deciding which chat tokens are
trained (``train.mask``: reasoning, tool calls, tool results).
"""

from mlx_tune.data.dataset import Dataset, detect_format, read_dataset
from mlx_tune.data.readers import read_jsonl_records, read_records
from mlx_tune.data.records import Example, RecordError, check_messages, detect_shape, to_example, validate_record
from mlx_tune.data.render import TRAINER_FORMATS, dumps_example, render

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
