#!/usr/bin/env python3
"""Structured output on the demo model: what a json_schema constraint costs, and whether
every answer is valid.

1. The grammar libraries on SmolLM2's 49k vocabulary: llguidance's mask per token and
   grammar build per schema, walking each suite schema's valid instance token by token;
   outlines-core's index build for the same schemas (its per-schema cost) where it is
   installed; xgrammar is not measured: it needs torch and triton, which the server
   cannot depend on.
2. Through the server (`mlx-tune serve` as a process, fast path on): aggregate tokens/s
   with every request under a json_schema vs the same requests free, at 1 and 16
   clients (goal >= 0.85x); each free twin writes as many tokens as its constrained
   answer had (max_tokens set to it, end-of-sequence suppressed), so both sides prefill
   and decode the same amounts.
3. Validity: every answer of the schema suite (nested objects, arrays, enums, numbers,
   optional and required keys) at temperature 0 and 1, parsed and checked with
   jsonschema (goal 100% of finished answers; answers cut by max_tokens are counted).

    python bench/bench_grammar.py [--quick] [--json OUT]
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchlib import MODEL, emit_targets, start_serve  # noqa: E402

from mlx_tune.runtime.blas import ensure_fast_blas  # noqa: E402

ensure_fast_blas()

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

import httpx  # noqa: E402

from mlx_tune.testing.schemas import SUITE  # noqa: E402


def library_costs(tokenizer, vocab: int) -> dict:
    import numpy as np
    from llguidance import LLMatcher

    from mlx_tune.server import constrain

    out: dict = {"llguidance": {}, "outlines_core": {}}
    t = time.perf_counter()
    llt = constrain.ll_tokenizer(tokenizer, vocab)
    out["llguidance_tokenizer_s"] = round(time.perf_counter() - t, 3)
    masks = []
    for name, (schema, instance) in SUITE.items():
        grammar = constrain.schema_grammar(schema, name)
        t = time.perf_counter()
        m = LLMatcher(llt, grammar, log_level=0)
        build = time.perf_counter() - t
        ids = tokenizer.encode(json.dumps(instance, separators=(", ", ": ")), add_special_tokens=False)
        times = []
        for i in ids:
            t = time.perf_counter()
            bits = m.compute_bitmask()
            times.append(time.perf_counter() - t)
            allowed = np.unpackbits(np.frombuffer(bits, dtype=np.uint8), bitorder="little")
            assert allowed[i], f"{name}: the valid instance's token {i} was masked"
            m.consume_token(i)
        masks += times
        out["llguidance"][name] = {"build_ms": round(build * 1000, 2), "mask_us_median": round(statistics.median(times) * 1e6, 1)}
    out["llguidance_mask_us_median"] = round(statistics.median(masks) * 1e6, 1)
    try:
        from outlines_core import Index, Vocabulary
        from outlines_core.json_schema import build_regex_from_schema

        hf = tokenizer._tokenizer
        eos = sorted(tokenizer.eos_token_ids)[0]
        words: dict[str, list[int]] = {}
        for token, i in hf.get_vocab().items():
            if i != eos:
                words.setdefault(hf.convert_tokens_to_string([token]), []).append(i)
        vocabulary = Vocabulary(eos, words)
        for name, (schema, _) in SUITE.items():
            t = time.perf_counter()
            Index(build_regex_from_schema(json.dumps(schema)), vocabulary)
            out["outlines_core"][name] = {"index_build_ms": round((time.perf_counter() - t) * 1000, 1)}
    except ImportError:
        out["outlines_core"] = "not installed"
    return out


def request(name: str, schema: dict | None, temperature: float, seed: int, max_tokens: int) -> dict:
    body = {"model": "base", "max_tokens": max_tokens, "temperature": temperature, "seed": seed,
            "messages": [{"role": "user", "content": f"Give one {name} example as JSON for this schema: "
                                                     f"{json.dumps(schema)}"}]}
    body["response_format"] = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
    return body


def throughput(url: str, clients: int, rounds: int, eos: int) -> tuple[float, float]:
    """(json_schema tok/s, free tok/s) over the same requests with the same answer lengths.

    The constrained requests run first; each free twin then gets ``max_tokens`` = the length
    its constrained answer had, with the end-of-sequence token suppressed, so both sides
    prefill the same prompts and decode the same number of tokens.
    """
    names = list(SUITE)
    bodies = [request(names[i % len(names)], SUITE[names[i % len(names)]][0], 1.0, i, 48)
              for i in range(clients * rounds)]

    def timed(batch: list[dict]) -> tuple[float, list[int]]:
        with httpx.Client(base_url=url, timeout=600) as c, ThreadPoolExecutor(clients) as pool:
            t = time.perf_counter()
            lengths = list(pool.map(lambda b: c.post("/v1/chat/completions", json=b).json()["usage"]
                                    ["completion_tokens"], batch))
            return sum(lengths) / (time.perf_counter() - t), lengths

    fixed, lengths = timed(bodies)
    free_bodies = []
    for b, n in zip(bodies, lengths):
        free = {k: v for k, v in b.items() if k != "response_format"}
        free_bodies.append({**free, "max_tokens": n, "logit_bias": {str(eos): -100.0}})
    free, _ = timed(free_bodies)
    return fixed, free


def validity(url: str, repeats: int) -> dict:
    import jsonschema

    out = {"answers": 0, "valid": 0, "cut_by_max_tokens": 0, "invalid": []}
    with httpx.Client(base_url=url, timeout=600) as c:
        for name, (schema, _) in SUITE.items():
            for temperature in (0.0, 1.0):
                for seed in range(repeats if temperature else 1):
                    r = c.post("/v1/chat/completions", json=request(name, schema, temperature, seed, 256)).json()
                    choice = r["choices"][0]
                    out["answers"] += 1
                    if choice["finish_reason"] == "length":
                        out["cut_by_max_tokens"] += 1
                        continue
                    try:
                        jsonschema.validate(json.loads(choice["message"]["content"]), schema)
                        out["valid"] += 1
                    except Exception as exc:
                        out["invalid"].append(f"{name} t={temperature}: {exc}"[:200])
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    from mlx_tune.model.loading import load_model

    model, tokenizer, _ = load_model(MODEL)
    eos = sorted(tokenizer.eos_token_ids)[0]
    costs = library_costs(tokenizer, model.args.vocab_size)
    del model
    print(json.dumps(costs, indent=1), flush=True)
    rounds = 1 if args.quick else 3
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_serve(["--model", str(MODEL), "--log-level", "warning", "--max-batch", "16", "--no-studio"],
                                Path(tmp) / "server.log")
        try:
            speed = {}
            for clients in (1, 16):
                throughput(url, clients, 1, eos)  # warm-up: grammar compilation, kernel choice
                fixed, free = throughput(url, clients, rounds, eos)
                speed[clients] = (fixed, free)
                print(f"{clients:>2} clients: json_schema {fixed:.1f} tok/s vs free {free:.1f} tok/s", flush=True)
            valid = validity(url, 2 if args.quick else 5)
            print(json.dumps(valid), flush=True)
        finally:
            proc.terminate()
            proc.wait(20)
    finished = valid["answers"] - valid["cut_by_max_tokens"]
    targets = [{"name": f"json_schema_tok_s_{c}_clients_vs_free", "measured": round(f / u, 3), "target": 0.85,
                "unit": "x", "rival": f"same requests without response_format: {u:.1f} vs {f:.1f} tok/s",
                "pass": f / u >= 0.85} for c, (f, u) in speed.items()]
    targets.append({"name": "json_schema_validity_finished_answers", "measured": valid["valid"] / max(1, finished),
                    "target": 1.0, "unit": "fraction",
                    "rival": f"{valid['answers']} answers over {len(SUITE)} schemas at temperature 0 and 1; "
                             f"{valid['cut_by_max_tokens']} cut at max_tokens 256",
                    "pass": valid["valid"] == finished})
    targets.append({"name": "llguidance_mask_per_token_us", "measured": costs["llguidance_mask_us_median"],
                    "target": 1000.0, "unit": "us (lower is better)",
                    "rival": f"outlines-core index builds: {costs['outlines_core']}",
                    "pass": costs["llguidance_mask_us_median"] < 1000.0})
    return emit_targets(targets, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
