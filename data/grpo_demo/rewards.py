"""The GRPO demo's rewards (configs/grpo-demo.yaml): name the capital, and name only it.

TRL's convention: ``fn(prompts, completions, **columns) -> list[float]``; the prompts are
chat rows, so each completion is ``[{"role": "assistant", "content": text}]``; ``answer``
is the data column holding the capital.
"""

import re


def _text(completion) -> str:
    return completion[-1]["content"] if isinstance(completion, list) else completion


def correct(prompts, completions, answer, **kwargs):
    """1 when the capital is named anywhere in the answer."""
    return [float(a.lower() in _text(c).lower()) for c, a in zip(completions, answer)]


def concise(prompts, completions, answer, **kwargs):
    """Up to 1 for a correct answer that is the name alone: minus 0.1 per extra word."""
    out = []
    for c, a in zip(completions, answer):
        text = _text(c).strip()
        if a.lower() not in text.lower():
            out.append(0.0)
            continue
        extra = len(re.findall(r"\w+", text)) - len(a.split())
        out.append(max(0.0, 1.0 - 0.1 * extra))
    return out
