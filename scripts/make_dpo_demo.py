"""Write data/dpo_demo_raw/pairs.jsonl: preference pairs for the DPO demo, from the SFT demo's reviews.

Each review's chosen answer is the labelled JSON (``{"sentiment": ...}``); the rejected one
is, in turn, the chatty prose a base model gives, or the JSON with the wrong label. So
the pairs teach both the format and the label. Deterministic (seed 0):

    scripts/python scripts/make_dpo_demo.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
N_PAIRS = 200
PROSE = [
    "The sentiment of this review is {label}.",
    "This review is {label}. The customer {verb} the product.",
    "Sentiment: {label}",
    "I would classify this review as {label}, because the reviewer {verb} it.",
]


def main() -> None:
    rnd = random.Random(0)
    out = []
    # The first 200 reviews: enough for the preference, small enough that the reference
    # pass and 30 steps fit in a few minutes on a laptop CPU.
    for line in (ROOT / "data/demo_raw/reviews.jsonl").read_text(encoding="utf-8").splitlines()[:N_PAIRS]:
        row = json.loads(line)
        label = json.loads(row["output"])["sentiment"]
        other = "negative" if label == "positive" else "positive"
        if rnd.random() < 0.7:
            verb = "liked" if label == "positive" else "disliked"
            rejected = rnd.choice(PROSE).format(label=label, verb=verb)
        else:
            rejected = json.dumps({"sentiment": other})
        out.append({"prompt": f"{row['instruction']}\n\n{row['input']}", "chosen": row["output"], "rejected": rejected})
    path = ROOT / "data/dpo_demo_raw/pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in out), encoding="utf-8")
    print(f"wrote {len(out)} pairs to {path}")


if __name__ == "__main__":
    main()
