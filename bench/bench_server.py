#!/usr/bin/env python3
"""The server against ``mlx_lm.server`` on the demo model, same weights, same run.

SmolLM2-135M-Instruct Q4_1 (GGUF) is loaded with mlx_tune's loader; mlx_lm.server gets
the very same quantized arrays, saved as an MLX folder. Both servers run as separate
processes (one measured at a time) and answer the same ``/v1/completions`` requests,
greedy, with the end-of-sequence token suppressed (``logit_bias``) so both write exactly
``max_tokens`` tokens. Measured:

* one request, streamed: time to first token and decode tokens/s after it;
* aggregate tokens/s with 1, 4 and 16 concurrent clients;
* adapter switching (mlx_tune only): mean request latency when alternating two adapters
  minus the latency when every request uses the same one.

Targets: decode no worse than mlx_lm.server at 1 client, >= 2x aggregate at 16,
switching < 50 ms per request. Prints the target objects as JSON last.

    python bench/bench_server.py [--quick] [--model PATH] [--json OUT]
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchlib import emit_targets, free_port  # noqa: E402

from mlx_tune.runtime.blas import ensure_fast_blas  # noqa: E402

ensure_fast_blas()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

import httpx  # noqa: E402

DEFAULT_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "The three primary colors are",
           "Water boils at", "My favourite book is", "In 1969, astronauts", "A good breakfast has"]


# ---------------------------------------------------------------------------
# Set-up: the rival's folder, two adapters, the two server processes
# ---------------------------------------------------------------------------


def prepare(model_path: Path, tmp: Path) -> tuple[Path, list[Path], int, float]:
    """(MLX folder with the same quantized weights, two adapter folders, eos id, ms per switch).

    The last is the cost of one adapter switch alone (``AdapterManager.activate`` on every
    adapted layer of the model), timed in this process where a busy machine blurs it least.
    """
    import mlx.core as mx
    from mlx_lm.utils import save_config, save_model

    from mlx_tune.adapters import inject, save_adapter, unload_adapter, wrappers
    from mlx_tune.config import LoraConfig
    from mlx_tune.model.loading import load_model

    model, tokenizer, info = load_model(model_path)
    folder = tmp / "mlx_model"
    save_model(folder, model)
    config = dict(info.config)
    q = info.quantization or {}
    if q:
        config["quantization"] = {"group_size": q["group_size"], "bits": q["bits"]}
        if q.get("mode", "affine") != "affine":
            config["quantization"]["mode"] = q["mode"]
    save_config(config, config_path=folder / "config.json")
    tokenizer._tokenizer.save_pretrained(str(folder))

    adapters = []
    for i, name in enumerate(("a", "b")):
        cfg = LoraConfig(rank=8, alpha=16.0, target_modules=["q_proj", "v_proj"])
        mx.random.seed(100 + i)
        inject(model, cfg, name=name)
        for _, w in wrappers(model):
            ad = w.adapters[name]
            ad.lora_b = mx.random.normal(ad.lora_b.shape) * 0.01
        adapters.append(save_adapter(model, tmp / f"adapter_{name}", cfg, info, name=name))
        unload_adapter(model, name)
    from mlx_tune.adapters import AdapterManager

    manager = AdapterManager(model)
    manager.add("a", adapters[0])
    manager.add("b", adapters[1])
    n = 200
    start = time.perf_counter()
    for i in range(n):
        manager.activate("ab"[i % 2])
    switch_ms = (time.perf_counter() - start) * 1000 / n
    eos = sorted(tokenizer.eos_token_ids)[0]
    return folder, adapters, eos, switch_ms


class Server:
    """A server process on a free port; ``model`` is the name requests use."""

    def __init__(self, label: str, cmd: list[str], port: int, model: str, log: Path):
        self.label, self.port, self.model = label, port, model
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)

    def wait(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited: {self.log.read_text()[-2000:]}")
            try:
                r = httpx.post(f"{self.url}/v1/completions", json={"model": self.model, "prompt": "hi",
                                                                    "max_tokens": 1}, timeout=60)
                if r.status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.label} did not answer within {timeout}s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# ---------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------


def body(server: Server, prompt: str, max_tokens: int, eos: int, model: str | None = None, **extra) -> dict:
    return {"model": model or server.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "logit_bias": {str(eos): -100.0}, **extra}


def single(server: Server, max_tokens: int, eos: int, reps: int) -> tuple[float, float]:
    """(median time to first token s, median decode tokens/s) of streamed single requests."""
    ttfts, rates = [], []
    with httpx.Client(timeout=600) as c:
        for i in range(reps):
            start = time.perf_counter()
            first = last = None
            chunks = 0
            with c.stream("POST", f"{server.url}/v1/completions",
                          json=body(server, PROMPTS[i % len(PROMPTS)], max_tokens, eos, stream=True)) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    data = json.loads(line[6:])
                    if data.get("choices") and data["choices"][0].get("text"):
                        now = time.perf_counter()
                        first = first or now
                        last = now
                        chunks += 1
            ttfts.append(first - start)
            # The text of max_tokens tokens arrives in about as many chunks; time the decode
            # by the tokens generated after the first.
            rates.append((max_tokens - 1) / (last - first) if last > first else float("nan"))
    return statistics.median(ttfts), statistics.median(rates)


def aggregate(server: Server, clients: int, per_client: int, max_tokens: int, eos: int) -> float:
    """Completion tokens per second over all clients, each sending ``per_client`` requests in turn."""
    def client(k: int) -> int:
        tokens = 0
        with httpx.Client(timeout=1200) as c:
            for j in range(per_client):
                r = c.post(f"{server.url}/v1/completions",
                           json=body(server, PROMPTS[(k + j) % len(PROMPTS)], max_tokens, eos))
                r.raise_for_status()
                tokens += r.json()["usage"]["completion_tokens"]
        return tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        total = sum(pool.map(client, range(clients)))
    return total / (time.perf_counter() - start)


def system_prompt(seed: int, sentences: int = 28) -> str:
    """About 1,000 tokens of instructions, different for each ``seed`` (a cold start each round)."""
    topics = ["refunds", "shipping", "privacy", "accounts", "billing", "returns", "warranty", "support"]
    return " ".join(f"Rule {seed}.{i}: when asked about {topics[i % len(topics)]}, answer politely, cite policy "
                    f"section {i + seed}, and keep it under {20 + i % 7} words." for i in range(sentences))


def first_token_s(server: Server, system: str, question: str, eos: int) -> float:
    start = time.perf_counter()
    with httpx.Client(timeout=600) as c, c.stream("POST", f"{server.url}/v1/chat/completions", json={
            "model": server.model, "max_tokens": 4, "temperature": 0.0, "stream": True,
            "logit_bias": {str(eos): -100.0},
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]}) as r:
        r.raise_for_status()
        first = float("nan")
        for line in r.iter_lines():  # read to the end, as a client does: the server keeps what it finished
            if line.startswith("data: ") and line != "data: [DONE]" and first != first:
                delta = (json.loads(line[6:]).get("choices") or [{}])[0].get("delta") or {}
                if delta.get("content"):
                    first = time.perf_counter() - start
    return first


def prefix_reuse(server: Server, eos: int, rounds: int) -> tuple[float, float]:
    """(median TTFT of a new 1,000-token system prompt, median TTFT when it repeats with a new question)."""
    cold, warm = [], []
    for k in range(rounds):
        system = system_prompt(1000 + k)
        cold.append(first_token_s(server, system, "How do refunds work?", eos))
        warm.append(first_token_s(server, system, "And shipping to Canada?", eos))
    return statistics.median(cold), statistics.median(warm)


def prefix_cache_target(o: dict, r: dict) -> dict:
    reuse = o["prefix_warm_s"] / o["prefix_cold_s"]
    return {"name": "server_prefix_cache_ttft_repeated_system_prompt", "measured": round(reuse, 3),
            "target": 0.25, "unit": "x of the first request (lower is better)",
            "rival": f"mlx_lm.server's prompt cache: {r['prefix_warm_s'] * 1000:.0f} ms repeated vs "
                     f"{r['prefix_cold_s'] * 1000:.0f} ms first; ours {o['prefix_warm_s'] * 1000:.0f} vs "
                     f"{o['prefix_cold_s'] * 1000:.0f} ms",
            "pass": reuse <= 0.25}


def emit(targets: list[dict], path: Path | None) -> int:
    return emit_targets(targets, path)


def switching(server: Server, requests: int, rounds: int, max_tokens: int, eos: int) -> tuple[float, float]:
    """(mean ms per request on one adapter, mean ms alternating two), interleaved rounds."""
    same, alternating = [], []
    with httpx.Client(timeout=600) as c:
        def timed(model: str, i: int) -> float:
            start = time.perf_counter()
            r = c.post(f"{server.url}/v1/completions", json=body(server, PROMPTS[i % len(PROMPTS)], max_tokens, eos,
                                                                  model=model))
            r.raise_for_status()
            return (time.perf_counter() - start) * 1000

        timed("a", 0), timed("b", 1)  # warm both
        for _ in range(rounds):
            same += [timed("a", i) for i in range(requests)]
            alternating += [timed("ab"[i % 2], i) for i in range(requests)]
    return statistics.mean(same), statistics.mean(alternating)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer and shorter requests (a few minutes)")
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--json", type=Path, help="also write the targets here")
    ap.add_argument("--prefix-only", action="store_true", help="only the prompt prefix cache comparison")
    args = ap.parse_args(argv)
    if not args.model.is_file():
        print(json.dumps([{"name": "server_bench", "measured": None, "target": None, "unit": "",
                           "rival": "mlx_lm.server", "pass": False,
                           "note": f"demo model not found at {args.model}"}]))
        return 1
    max_tokens = 16 if args.quick else 48  # single request
    agg_tokens = 8 if args.quick else 32  # per request under concurrency
    reps = 2 if args.quick else 4
    per_client = 1 if args.quick else 2
    results: dict[str, dict] = {"mlx_tune": {}, "mlx_lm": {}}

    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        t0 = time.perf_counter()
        folder, adapters, eos, switch_ms = prepare(args.model, tmp)
        print(f"prepared the rival's folder and two adapters in {time.perf_counter() - t0:.1f}s", flush=True)
        ours_port, rival_port = free_port(), free_port()
        # One server starts at a time: ours measures at start-up which kernel decodes a
        # single row faster, and the rival's loading on the other core would skew that.
        ours = Server("mlx_tune", [sys.executable, "-m", "mlx_tune", "serve", "--model", str(args.model),
                                   "--port", str(ours_port), "--log-level", "warning", "--adapter",
                                   f"a={adapters[0]}", "--adapter", f"b={adapters[1]}", "--max-batch", "16"],
                      ours_port, "base", tmp / "ours.log")
        rival = None
        try:
            ours.wait()
            rival = Server("mlx_lm.server", [sys.executable, "-m", "mlx_lm.server", "--model", str(folder),
                                             "--port", str(rival_port), "--log-level", "WARNING"],
                           rival_port, "default_model", tmp / "rival.log")
            rival.wait()
            print("both servers answer", flush=True)
            for key, server in (("mlx_tune", ours), ("mlx_lm", rival)):
                if args.prefix_only:
                    break
                ttft, rate = single(server, max_tokens, eos, reps)
                results[key].update(ttft_s=ttft, decode_tok_s=rate)
                print(f"{server.label}: single request TTFT {ttft * 1000:.0f} ms, decode {rate:.1f} tok/s", flush=True)
            for key, server in (("mlx_tune", ours), ("mlx_lm", rival)):
                cold, warm = prefix_reuse(server, eos, 2 if args.quick else 3)
                results[key].update(prefix_cold_s=cold, prefix_warm_s=warm)
                print(f"{server.label}: 1,000-token system prompt TTFT {cold * 1000:.0f} ms, repeated "
                      f"{warm * 1000:.0f} ms ({warm / cold:.2f}x)", flush=True)
            for clients in () if args.prefix_only else (1, 4, 16):
                for key, server in (("mlx_tune", ours), ("mlx_lm", rival)):
                    tps = aggregate(server, clients, per_client, agg_tokens, eos)
                    results[key][f"agg_{clients}"] = tps
                    print(f"{server.label}: {clients:2d} clients {tps:.1f} tok/s", flush=True)
            if not args.prefix_only:
                same_ms, alt_ms = switching(ours, 4 if args.quick else 10, 2 if args.quick else 3,
                                            4 if args.quick else 8, eos)
                print(f"mlx_tune: adapter a only {same_ms:.0f} ms/request, alternating a/b {alt_ms:.0f} ms/request",
                      flush=True)
        finally:
            ours.stop()
            if rival is not None:
                rival.stop()

    o, r = results["mlx_tune"], results["mlx_lm"]
    prefix_target = prefix_cache_target(o, r)
    if args.prefix_only:
        return emit([prefix_target], args.json)
    decode_ratio = o["decode_tok_s"] / r["decode_tok_s"]
    ttft_ratio = o["ttft_s"] / r["ttft_s"]
    agg = {c: o[f"agg_{c}"] / r[f"agg_{c}"] for c in (1, 4, 16)}
    overhead = alt_ms - same_ms
    rival_note = "mlx_lm.server, same quantized weights (saved MLX folder), same requests"
    targets = [
        {"name": "server_decode_tok_s_1_request_vs_mlx_lm", "measured": round(decode_ratio, 3), "target": 1.0,
         "unit": "x", "rival": f"{rival_note}: {r['decode_tok_s']:.1f} tok/s vs ours {o['decode_tok_s']:.1f}",
         "pass": decode_ratio >= 1.0},
        {"name": "server_time_to_first_token_vs_mlx_lm", "measured": round(ttft_ratio, 3), "target": 1.0,
         "unit": "ratio (lower is better)",
         "rival": f"{rival_note}: {r['ttft_s'] * 1000:.0f} ms vs ours {o['ttft_s'] * 1000:.0f} ms",
         "pass": ttft_ratio <= 1.0},
    ]
    for c, want in ((1, 1.0), (4, 1.0), (16, 2.0)):
        targets.append({
            "name": f"server_aggregate_tok_s_{c}_clients_vs_mlx_lm", "measured": round(agg[c], 3), "target": want,
            "unit": "x", "rival": f"{rival_note}: {r[f'agg_{c}']:.1f} tok/s vs ours {o[f'agg_{c}']:.1f}",
            "pass": agg[c] >= want})
    targets.append(prefix_target)
    targets.append({"name": "server_adapter_switch_overhead_per_request", "measured": round(overhead, 1),
                    "target": 50.0, "unit": "ms (lower is better)",
                    "rival": f"same adapter on every request: {same_ms:.0f} ms vs alternating {alt_ms:.0f} ms "
                             f"(one switch alone: {switch_ms:.3f} ms)",
                    "pass": overhead < 50.0})
    return emit(targets, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
