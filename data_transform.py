#!/usr/bin/env python3
"""Convert datasets into train/valid/test JSONL for mlx_tune (see mlx_tune/data/transform.py).

    python data_transform.py INPUT [INPUT...] --out DIR [--to chat|completions|text|preference|prompts]
        [--valid-ratio 0.1] [--test-ratio 0.1] [--seed 0] [--map FIELD=SOURCE_FIELD ...]
        [--system TEXT] [--strict] [--force] [--tokenizer MODEL --max-seq-length N]

Reading and converting needs no MLX; only ``--tokenizer`` loads a model (lazily).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from a checkout without installing

from mlx_tune.data.transform import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
