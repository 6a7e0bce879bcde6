"""Evaluation against a served model: the engine behind ``test_mlx.py``.

``prompts`` reads and checks the prompts file, ``scoring`` holds the match modes,
``client`` talks OpenAI-compatible HTTP (httpx, no mlx: it also runs against Ollama or
any remote server), ``report`` runs the rows, builds the JSON report and prints tables,
and ``cli`` is the command line. The report's fields are documented in ``report``.
"""

from .cli import main
from .prompts import PromptRow, read_prompts
from .report import compare_report, run_model
from .scoring import MATCHERS, score

__all__ = ["MATCHERS", "PromptRow", "compare_report", "main", "read_prompts", "run_model", "score"]
