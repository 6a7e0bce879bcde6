"""Evaluation against a served model: the engine behind ``test_mlx.py``.

``prompts`` reads and checks the prompts file, ``scoring`` holds the match modes,
``client`` talks OpenAI-compatible HTTP (httpx, no mlx: it also runs against Ollama or
any remote server), ``report`` runs the rows, builds the JSON report and prints tables,
and ``cli`` is the command line. The report's fields are documented in ``report``.
``live`` answers the same rows in-process (the server's engine on a loaded model, no
HTTP): evaluation during training and ``mlx-tune eval``; it imports ``server`` (and so
mlx) only when used.
"""

from mlx_tune.evaluation.cli import main
from mlx_tune.evaluation.prompts import PromptRow, read_prompts
from mlx_tune.evaluation.report import compare_report, run_model
from mlx_tune.evaluation.scoring import MATCHERS, score

__all__ = ["MATCHERS", "PromptRow", "compare_report", "main", "read_prompts", "run_model", "score"]
