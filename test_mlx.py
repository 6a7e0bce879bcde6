#!/usr/bin/env python3
<<<<<<< HEAD
"""Score a served model on a prompts file: see `python test_mlx.py --help`."""
import sys

print("test_mlx.py: not yet available in this version", file=sys.stderr)
raise SystemExit(3)
=======
"""Score a served model on a prompts file; see ``mlx_tune/evaluation/cli.py``.

A client only: it talks HTTP to an OpenAI-compatible server and never imports mlx.
"""

from mlx_tune.evaluation import main

if __name__ == "__main__":
    raise SystemExit(main())
>>>>>>> evalclient
