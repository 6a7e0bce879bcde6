"""How close two models are: next-token distributions compared on a few check prompts.

For a reference model P (base + adapter) and another model Q (the fused model, or the
base alone), at every position t of every check prompt::

    KL_t = sum_v P_t(v) * (log P_t(v) - log Q_t(v))
    max KL = max_t KL_t,   mean KL = mean_t KL_t,
    top-1 agreement = mean_t [argmax P_t == argmax Q_t]

A fused model that kept its adapter has a small KL and an agreement near 1 against
base + adapter, and is further from the base than from base + adapter. Greedy answers
(``greedy``) add an end-to-end check: the same first tokens of an answer.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

MAX_PROMPTS = 8
MAX_TOKENS_PER_PROMPT = 64
GREEDY_PROMPTS = 3
GREEDY_TOKENS = 8

BUILTIN_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence what a neural network is.",
    "List three prime numbers.",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 7?",
)


@dataclass
class CheckPrompt:
    """``ids``: tokens whose next-token distributions are compared; ``prompt_ids``: greedy start."""

    ids: list[int]
    prompt_ids: list[int]


@dataclass
class Closeness:
    max_kl: float
    mean_kl: float
    top1_agreement: float
    positions: int

    def row(self) -> str:
        return f"{self.max_kl:10.4g} {self.mean_kl:10.4g} {self.top1_agreement:8.3f}"

    to_dict = asdict


def _chat(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


def _from_row(row: dict, tokenizer) -> CheckPrompt | None:
    """One validation record (messages / prompt+completion / text) as a check prompt."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    messages = row.get("messages")
    if isinstance(messages, list) and messages and has_template:
        head = messages[:-1] if messages[-1].get("role") == "assistant" and len(messages) > 1 else messages
        return CheckPrompt(_chat(tokenizer, messages, False), _chat(tokenizer, head, True))
    if isinstance(row.get("prompt"), str):
        prompt = tokenizer.encode(row["prompt"])
        completion = row.get("completion")
        full = tokenizer.encode(row["prompt"] + completion) if isinstance(completion, str) else prompt
        return CheckPrompt(full, prompt)
    if isinstance(row.get("text"), str):
        ids = tokenizer.encode(row["text"])
        return CheckPrompt(ids, ids[: max(1, len(ids) // 2)])
    return None


def check_prompts(tokenizer, data_dir: str | Path | None = None) -> tuple[list[CheckPrompt], str]:
    """Up to ``MAX_PROMPTS`` check prompts from ``data_dir/valid.jsonl``, else built-in ones.

    Returns the prompts and where they came from (for the report).
    """
    prompts: list[CheckPrompt] = []
    source = "built-in"
    valid = Path(data_dir) / "valid.jsonl" if data_dir else None
    if valid is not None and valid.is_file():
        with open(valid, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the trainer reports bad rows; a check only needs a few good ones
                found = _from_row(row, tokenizer) if isinstance(row, dict) else None
                if found is not None and len(found.ids) > 1:
                    prompts.append(found)
                if len(prompts) == MAX_PROMPTS:
                    break
        source = str(valid)
    if not prompts:
        source = "built-in"
        for text in BUILTIN_PROMPTS:
            messages = [{"role": "user", "content": text}]
            ids = _chat(tokenizer, messages, True) if getattr(tokenizer, "chat_template", None) else tokenizer.encode(text)
            prompts.append(CheckPrompt(ids, ids))
    for p in prompts:
        p.ids = p.ids[:MAX_TOKENS_PER_PROMPT]
        p.prompt_ids = p.prompt_ids[:MAX_TOKENS_PER_PROMPT]
    return prompts, source


def logprobs_iter(model: nn.Module, prompts: list[CheckPrompt]):
    """Per prompt, float32 log-softmax of the next-token logits at every position, (T, V)."""
    for p in prompts:
        logits = model(mx.array(p.ids)[None])[0].astype(mx.float32)
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        mx.eval(lp)
        yield lp


def logprobs(model: nn.Module, prompts: list[CheckPrompt]) -> list[mx.array]:
    return list(logprobs_iter(model, prompts))


def _position_stats(p: mx.array, q: mx.array) -> tuple[mx.array, mx.array]:
    """Per position: KL(p || q) and whether the top-1 tokens agree."""
    kl = mx.maximum(mx.sum(mx.exp(p) * (p - q), axis=-1), 0.0)  # rounding can make a match slightly negative
    same = mx.argmax(p, axis=-1) == mx.argmax(q, axis=-1)
    mx.eval(kl, same)
    return kl, same


def _summary(kls: list[mx.array], agree: list[mx.array]) -> Closeness:
    kl, same = mx.concatenate(kls), mx.concatenate(agree)
    return Closeness(max_kl=kl.max().item(), mean_kl=kl.mean().item(),
                     top1_agreement=same.astype(mx.float32).mean().item(), positions=int(kl.size))


def compare(reference: list[mx.array], other: list[mx.array]) -> Closeness:
    """KL(reference || other) statistics and top-1 agreement over every position."""
    stats = [_position_stats(p, q) for p, q in zip(reference, other)]
    return _summary([k for k, _ in stats], [a for _, a in stats])


def compare_model(model: nn.Module, prompts: list[CheckPrompt], references: dict[str, list[mx.array]]) -> dict[str, Closeness]:
    """``model`` against each reference's stored log-probabilities, one prompt at a time.

    Only one prompt's (T, V) log-probabilities of ``model`` exist at once, so the check
    holds the references plus one prompt, not a third full set.
    """
    stats: dict[str, tuple[list, list]] = {name: ([], []) for name in references}
    for i, q in enumerate(logprobs_iter(model, prompts)):
        for name, ref in references.items():
            kl, same = _position_stats(ref[i], q)
            stats[name][0].append(kl)
            stats[name][1].append(same)
        del q
    return {name: _summary(*lists) for name, lists in stats.items()}


def greedy(model: nn.Module, prompts: list[CheckPrompt], max_tokens: int = GREEDY_TOKENS,
           eos_ids: set[int] | frozenset = frozenset()) -> list[list[int]]:
    """The first ``max_tokens`` greedy tokens after each of the first ``GREEDY_PROMPTS`` prompts."""
    from mlx_lm.generate import generate_step

    answers = []
    for p in prompts[:GREEDY_PROMPTS]:
        tokens = []
        for token, _ in generate_step(mx.array(p.prompt_ids), model, max_tokens=max_tokens):
            token = int(token)
            if token in eos_ids:
                break
            tokens.append(token)
        answers.append(tokens)
    return answers
