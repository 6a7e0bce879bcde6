#!/usr/bin/env python3
"""Score a served model on a prompts file; see ``mlx_tune/evaluation/cli.py``.

A client only: it talks HTTP to an OpenAI-compatible server and never imports mlx.
"""

from mlx_tune.evaluation import main

if __name__ == "__main__":
    raise SystemExit(main())
