#!/usr/bin/env python3
"""Write the demo dataset: short product reviews -> a fixed one-line JSON verdict.

The task: "Classify the sentiment of this review." plus a review, answered with exactly
``{"sentiment": "positive"}`` or ``{"sentiment": "negative"}``. An instruct model answers
in prose ("The sentiment of this review is positive."), so exact matching scores it near
zero; a LoRA adapter learns the format and the labels within a few hundred steps. Every
example is under ~80 tokens with SmolLM2's chat template.

Outputs (deterministic for a given --seed; committed to the repo):

* ``data/demo_raw/reviews.jsonl``: Alpaca records (``instruction``, ``input``, ``output``),
  the raw input of ``data_transform.py`` in ``make demo``.
* ``data/demo_prompts.jsonl``: held-out chats for ``test_mlx.py`` with ``expected`` and
  ``match: "exact"``; no review in it appears in the training data.
* ``data/demo_eval_prompts.jsonl``: another held-out set, for ``eval.prompts`` (scored during
  training, so keep-best never picks on the final test's prompts); half ``exact``, half
  ``json`` (the verdict as a JSON value, whatever its spacing).

    python scripts/make_demo_data.py [--seed 0] [--train 480] [--prompts 40] [--eval-prompts 16]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INSTRUCTION = "Classify the sentiment of this review."

SUBJECTS = [
    "The headphones", "This blender", "The hotel room", "The movie", "Our waiter", "The laptop",
    "This backpack", "The coffee maker", "The delivery service", "The phone case", "This novel",
    "The running shoes", "The restaurant", "The vacuum cleaner", "The desk chair", "This jacket",
    "The concert", "The rental car", "The toaster", "The yoga mat", "The support team", "This game",
    "The umbrella", "The mattress", "The tent", "This keyboard", "The museum tour", "The pizza",
    "The smartwatch", "The printer",
]
POSITIVE = [
    "works perfectly", "exceeded my expectations", "is absolutely wonderful", "was a delight",
    "is worth every penny", "made my week", "is excellent", "feels really well made",
    "was fantastic", "is the best I have ever had", "works great", "is simply amazing",
    "did everything I hoped for", "was a pleasant surprise", "is superb", "was lovely",
]
NEGATIVE = [
    "broke after two days", "was a complete waste of money", "is absolutely terrible",
    "was a huge disappointment", "stopped working within a week", "is awful", "feels cheap and flimsy",
    "was a nightmare", "is the worst I have ever had", "works badly", "is simply useless",
    "did nothing I hoped for", "was an unpleasant surprise", "is dreadful", "was rude and slow",
    "fell apart immediately",
]
POS_EXTRA = ["I would buy it again.", "Highly recommended.", "I love it.", "Five stars.",
             "My whole family is happy.", "I will tell my friends.", ""]
NEG_EXTRA = ["I want a refund.", "Do not buy it.", "I regret it.", "One star.",
             "Never again.", "I am returning it.", ""]
NEUTRAL_EXTRA = ["I bought it last month.", "It arrived on Tuesday.", "I used it twice.", ""]


def review(rng: random.Random, label: str) -> str:
    phrase = rng.choice(POSITIVE if label == "positive" else NEGATIVE)
    extra = rng.choice(POS_EXTRA if label == "positive" else NEG_EXTRA)
    neutral = rng.choice(NEUTRAL_EXTRA)
    parts = [f"{rng.choice(SUBJECTS)} {phrase}.", neutral, extra]
    if rng.random() < 0.3:
        parts[0], parts[1] = parts[1], parts[0]  # the verdict is not always first
    return " ".join(p for p in parts if p)


def answer(label: str) -> str:
    return json.dumps({"sentiment": label})


def build(seed: int, n_train: int, n_prompts: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    seen: set[str] = set()
    held_out: list[dict] = []
    # Held-out reviews first (balanced), so training never contains them.
    while len(held_out) < n_prompts:
        label = ("positive", "negative")[len(held_out) % 2]
        text = review(rng, label)
        if text not in seen:
            seen.add(text)
            held_out.append({"messages": [{"role": "user", "content": f"{INSTRUCTION}\n\n{text}"}],
                             "expected": answer(label), "match": "exact"})
    train: list[dict] = []
    attempts = 0
    while len(train) < n_train and attempts < 100 * n_train:
        attempts += 1
        label = ("positive", "negative")[len(train) % 2]
        text = review(rng, label)
        if text in seen:
            continue
        seen.add(text)
        train.append({"instruction": INSTRUCTION, "input": text, "output": answer(label)})
    rng.shuffle(train)
    return train, held_out


def build_eval(seed: int, n: int, exclude: set[str]) -> list[dict]:
    """``n`` more held-out prompts (balanced), none in ``exclude`` (the other reviews)."""
    rng = random.Random(seed + 1)
    rows: list[dict] = []
    while len(rows) < n:
        label = ("positive", "negative")[len(rows) % 2]
        text = review(rng, label)
        if text not in exclude:
            exclude.add(text)
            rows.append({"messages": [{"role": "user", "content": f"{INSTRUCTION}\n\n{text}"}],
                         "expected": answer(label), "match": ("exact", "json")[(len(rows) // 2) % 2]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=int, default=480, help="training records (before data_transform's split)")
    p.add_argument("--prompts", type=int, default=40, help="held-out prompts for test_mlx.py")
    p.add_argument("--out", type=Path, default=ROOT / "data", help="folder receiving demo_raw/ and demo_prompts.jsonl")
    p.add_argument("--eval-prompts", type=int, default=16, help="held-out prompts for eval.prompts (training)")
    args = p.parse_args(argv)
    train, held_out = build(args.seed, args.train, args.prompts)
    seen = {r["input"] for r in train} | {r["messages"][0]["content"].split("\n\n", 1)[1] for r in held_out}
    write_jsonl(args.out / "demo_raw" / "reviews.jsonl", train)
    write_jsonl(args.out / "demo_prompts.jsonl", held_out)
    write_jsonl(args.out / "demo_eval_prompts.jsonl", build_eval(args.seed, args.eval_prompts, seen))
    print(f"wrote {len(train)} training records to {args.out / 'demo_raw' / 'reviews.jsonl'} and "
          f"{len(held_out)} held-out prompts to {args.out / 'demo_prompts.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
