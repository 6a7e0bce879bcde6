"""Perplexity of SmolLM2-135M on one English text under each storage of the base.

  fp32        the GGUF file's Q4_1 weights dequantized (the reference: the original
              bf16 weights are not available offline, so every mode starts from these)
  gguf-q4_1   the file as loaded (affine 4-bit, group 32, fp16 scales)
  affine4-g32 fp32 re-quantized with MLX affine 4-bit, group 32 (fp32 scales)
  affine4-g64 the same with group 64 (mlx_tune's default)
  nf4-b64     fp32 re-quantized to NF4, block 64
  nf4-b64+dq  the same with double quantization of the absmax values

Embeddings (and so the tied LM head) are affine 4-bit g64 in both nf4 modes, as
``quantize_model`` stores them. Perplexity = exp(mean next-token cross-entropy) over
the whole text in one sequence.

    python bench/perplexity_modes.py [--text FILE] [--json out.json]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mlx_tune.atomic import write_text_atomic  # noqa: E402
from mlx_tune.runtime.blas import ensure_fast_blas  # noqa: E402

ensure_fast_blas()

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

from mlx_tune.config import QuantizeConfig  # noqa: E402
from mlx_tune.model.quantize import model_bits_per_parameter, quantize_model  # noqa: E402

GGUF = Path(__file__).resolve().parents[1] / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"

TEXT = """\
The history of the bicycle is a story of many small improvements made by many people over \
more than a century. The first machines, built in the early nineteenth century, had no pedals \
at all: riders sat on a wooden frame between two wheels and pushed themselves along the road \
with their feet. Later designs added pedals to the front wheel, and makers discovered that a \
larger wheel carried the rider farther with each turn of the pedals. This led to the high \
wheeler, a tall and fast machine that was also dangerous, because a small stone in the road \
could throw the rider over the handlebars.

The safety bicycle, which appeared in the 1880s, solved this problem with two wheels of the \
same size and a chain that drove the rear wheel. Pneumatic tyres, filled with air, made the \
ride far more comfortable on rough streets. Within a few years millions of people were riding \
bicycles to work, to school and into the countryside. Women in particular gained a new kind of \
freedom, and the fashion of the time changed to allow them to ride more easily.

Today the bicycle remains one of the most efficient ways to travel. A person on a bicycle uses \
less energy to move a given distance than a person walking, and far less than any car. Many \
cities have built separate lanes so that cyclists can travel safely beside traffic, and some \
have found that these lanes reduce congestion and improve the health of the people who use \
them. The basic design has changed little in a hundred years, which suggests that the early \
engineers found something close to the best possible answer to a simple question: how can one \
person move quickly and cheaply with nothing but the strength of their own legs?
"""


def perplexity(model, ids: mx.array) -> float:
    logits = model(ids[None, :-1])
    nll = nn.losses.cross_entropy(logits.astype(mx.float32), ids[None, 1:]).mean()
    return math.exp(nll.item())


MODES = {
    "fp32": dict(dequantize=True, qcfg=None),
    "gguf-q4_1": dict(dequantize=False, qcfg=None),
    "affine4-g32": dict(dequantize=True, qcfg=QuantizeConfig(mode="affine", bits=4, group_size=32)),
    "affine4-g64": dict(dequantize=True, qcfg=QuantizeConfig(mode="affine", bits=4, group_size=64)),
    "nf4-b64": dict(dequantize=True, qcfg=QuantizeConfig(mode="nf4", group_size=64)),
    "nf4-b64+dq": dict(dequantize=True, qcfg=QuantizeConfig(mode="nf4", group_size=64, double_quant=True)),
}


def main(argv=None) -> int:
    from mlx_tune.model.loading import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", type=Path, help="a UTF-8 text file instead of the built-in passage")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    if not GGUF.is_file():
        print(f"skip: {GGUF} is absent (make setup fetches it)")
        return 0
    text = args.text.read_text(encoding="utf-8") if args.text else TEXT
    results = []
    for name, mode in MODES.items():
        model, tokenizer, _ = load_model(str(GGUF), dequantize=mode["dequantize"])
        if mode["qcfg"] is not None:
            quantize_model(model, mode["qcfg"])
        ids = mx.array(tokenizer.encode(text))
        ppl = perplexity(model, ids)
        bits = model_bits_per_parameter(model)
        results.append({"mode": name, "perplexity": round(ppl, 3), "bits_per_parameter": round(bits, 3),
                        "tokens": ids.size})
        print(f"{name:12s} perplexity {ppl:8.3f}   ({bits:.2f} bits/parameter over the whole model, "
              f"{ids.size} tokens)", flush=True)
        del model
        gc.collect()
    text_out = json.dumps(results, indent=2)
    print(text_out)
    if args.json:
        write_text_atomic(args.json, text_out + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
