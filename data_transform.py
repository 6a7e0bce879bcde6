#!/usr/bin/env python3
"""Convert datasets to train/valid/test JSONL: see `python data_transform.py --help`."""
import sys

print("data_transform.py: not yet available in this version", file=sys.stderr)
raise SystemExit(3)
