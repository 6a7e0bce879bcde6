"""Write the DPO demo's data: data/dpo_demo_raw/pairs.jsonl and data/dpo_demo_eval_prompts.jsonl.

From the SFT demo's reviews: the chosen answer is the label alone ("Positive." /
"Negative."); the rejected one is, in turn, the wordy sentence a chat model tends to write
(with the right label) or the label alone but wrong. So the pairs prefer answers that are
short and right, both things the base model can already say: DPO moves probability
between answers the model finds plausible. The held-out prompts (the SFT demo's 16
evaluation reviews, none among the pairs) count an answer as right when it opens with the
right label (the base model opens with "The sentiment of this review is ..."). Deterministic (seed 0):

    scripts/python scripts/make_dpo_demo.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
N_PAIRS = 200
WORDY = [
    "The sentiment of this review is {label}.",
    "This review is {label}. The customer {verb} the product.",
    "I would classify this review as {label}, because the reviewer {verb} it.",
    "Based on the text, the overall sentiment expressed here is {label}.",
]


def answer(label: str) -> str:
    return label.capitalize() + "."


def main() -> None:
    rnd = random.Random(0)
    pairs = []
    # The first 200 reviews: enough for the preference, small enough that the reference
    # pass and 30 steps fit in a few minutes on a laptop CPU.
    for line in (ROOT / "data/demo_raw/reviews.jsonl").read_text(encoding="utf-8").splitlines()[:N_PAIRS]:
        row = json.loads(line)
        label = json.loads(row["output"])["sentiment"]
        other = "negative" if label == "positive" else "positive"
        if rnd.random() < 0.5:
            verb = "liked" if label == "positive" else "disliked"
            rejected = rnd.choice(WORDY).format(label=label, verb=verb)
        else:
            rejected = answer(other)
        pairs.append({"prompt": f"{row['instruction']}\n\n{row['input']}", "chosen": answer(label), "rejected": rejected})
    path = ROOT / "data/dpo_demo_raw/pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in pairs), encoding="utf-8")
    evals = []
    for line in (ROOT / "data/demo_eval_prompts.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        label = json.loads(row["expected"])["sentiment"]
        evals.append({"messages": row["messages"], "expected": f"(?i)^\\W*{label}\\b", "match": "regex"})
    out = ROOT / "data/dpo_demo_eval_prompts.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in evals), encoding="utf-8")
    print(f"wrote {len(pairs)} pairs to {path} and {len(evals)} held-out prompts to {out}")


if __name__ == "__main__":
    main()
