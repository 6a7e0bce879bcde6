"""The GRPO demo's rewards (configs/grpo-demo.yaml): a reply style, and the fact in it.

The prompts ask for a reply that ends with an exclamation mark. SmolLM2-135M-Instruct's greedy
reply ends with a period ("The capital of Egypt is Cairo."), while a good share of its samples
at temperature 1 hold a "!" somewhere, and some end with one: the within-group variance GRPO
learns from. The style is independent of the country, so it carries over to held-out ones.

TRL's convention: ``fn(prompts, completions, **columns) -> list[float]``; the prompts are
chat rows, so each completion is ``[{"role": "assistant", "content": text}]``; ``answer``
is the data column holding the capital.
"""


def _text(completion) -> str:
    return completion[-1]["content"] if isinstance(completion, list) else completion


def correct(prompts, completions, answer, **kwargs):
    """1 when the capital is named anywhere in the reply."""
    return [float(a.lower() in _text(c).lower()) for c, a in zip(completions, answer)]


def exclaims(prompts, completions, answer, **kwargs):
    """1 when the reply ends with "!" and names the capital; 0.25 when it ends with "!" without it,
    or holds a "!" elsewhere; else 0. Paying the style alone in full, the model learns "The
    capital of Greece!" within a few steps (correct falls to 0); the small credit keeps the
    style's signal while the base rarely combines both."""
    out = []
    for c, a in zip(completions, answer):
        text = _text(c).strip()
        named = a.lower() in text.lower()
        out.append(1.0 if text.endswith("!") and named else 0.25 if "!" in text else 0.0)
    return out
