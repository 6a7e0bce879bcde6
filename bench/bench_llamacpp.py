"""Real llama.cpp as the judge of our GGUF files: greedy answers and perplexity.

llama.cpp is built once from the source on PyPI (``bench/build_llamacpp.sh``: the
llama-cpp-python sdist vendors it; CPU only, cached in ~/.cache/mlx_tune/llama.cpp).
Without cmake, a compiler or the sdist every target is reported as skipped.

SmolLM2-135M (the Q4_1 demo GGUF) with an adapter trained on the demo task (12 steps of
``configs/demo.yaml``, or ``--adapter DIR``):

* greedy answers to the demo prompts (rendered with the chat template here, fed to
  ``llama-completion`` as raw text, so only the model differs; ``--temp 0 --top-k 1``) of
  the fused GGUF in f16, q8_0 and q4_0 (``mlx-tune fuse ... fuse.format=gguf``) and of the
  base GGUF with the LoRA GGUF (``mlx-tune adapter export --format gguf``, ``--lora``)
  against mlx_tune's base + adapter: the share of answers that are the same text
  (target >= 95% for f16, q8_0 and the LoRA; q4_0 is reported);
* ``llama-perplexity -c CTX`` of the f16 and q8_0 files against mlx_tune's perplexity of
  the same file on the same tokens, chunked as llama-perplexity does (``ppl_chunks``):
  within 2%.

Other families: tiny Qwen3, Gemma 2, Gemma 3, Phi-3, Granite and OLMo 2 models built from
mlx-lm's classes (deterministic random weights, the family tests' overrides, SmolLM2's
tokenizer), saved as Hugging Face folders and written as GGUF f16 by our exporter: greedy
continuations of sentences of the text and perplexity, against the folder as mlx_tune
loads it.

Writes bench/results/llamacpp.json (+ .log) and prints the target objects last.

    python bench/bench_llamacpp.py [--quick] [--adapter DIR] [--fresh]
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mlx_tune.runtime.blas import ensure_fast_blas  # noqa: E402

ensure_fast_blas()

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import mlx.core as mx  # noqa: E402
from benchlib import MODEL, emit_targets  # noqa: E402

from mlx_tune.atomic import write_text_atomic  # noqa: E402

WORK = ROOT / "outputs" / "bench_llamacpp"
RESULTS = ROOT / "bench" / "results"
PY = [str(ROOT / "scripts" / "python")]
FUSED_TYPES = ("f16", "q8_0", "q4_0")
LOG: list[str] = []


def say(line: str) -> None:
    print(line, flush=True)
    LOG.append(line)


def sh(cmd: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    """Run ``cmd`` in the repo root; a failure raises with the tail of its output."""
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {proc.returncode}:\n{tail}")
    return proc


def build_llamacpp() -> tuple[Path | None, str]:
    """(folder of the llama.cpp binaries, "") or (None, why it is skipped)."""
    proc = subprocess.run(["bash", str(ROOT / "bench" / "build_llamacpp.sh")], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        lines = (proc.stderr.strip() or proc.stdout.strip() or f"exit {proc.returncode}").splitlines()
        return None, lines[-1]
    return Path(proc.stdout.strip().splitlines()[-1]), ""


# ---- llama.cpp side ---------------------------------------------------------------------------


def llama_generate(bin_dir: Path, model: Path, text: str, n: int, lora: Path | None = None) -> str:
    """llama.cpp's greedy continuation of the raw ``text`` (special tokens parsed), at most ``n`` tokens.

    One thread: ggml's OpenMP workers spin while they wait, and on a busy 2-core machine two of
    them made a 135M-model answer take 30 s instead of 2 (correctness, not speed, is judged here).
    """
    cmd = [str(bin_dir / "llama-completion"), "-m", str(model), "-p", text, "-n", str(n), "--temp", "0",
           "--top-k", "1", "-s", "0", "-c", "512", "-t", "1", "-no-cnv", "--no-display-prompt", "--no-escape",
           "--no-warmup", "--simple-io"]
    if lora is not None:
        cmd += ["--lora", str(lora)]
    out = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=300,
                         stdin=subprocess.DEVNULL)
    if out.returncode:
        raise RuntimeError(f"llama-completion failed on {model.name}: {out.stderr.strip().splitlines()[-3:]}")
    return re.sub(r"\s*\[end of text\]\s*$", "", out.stdout)


def llama_tokenize(bin_dir: Path, model: Path, text: str, parse_special: bool = True) -> list[int]:
    cmd = [str(bin_dir / "llama-tokenize"), "-m", str(model), "-p", text, "--ids", "--log-disable"]
    if not parse_special:
        cmd.append("--no-parse-special")
    out = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=120)
    if out.returncode:
        raise RuntimeError(f"llama-tokenize failed: {out.stderr.strip().splitlines()[-3:]}")
    return [int(x) for x in re.findall(r"-?\d+", out.stdout.strip().splitlines()[-1])]


def llama_perplexity(bin_dir: Path, model: Path, text_file: Path, ctx: int) -> float:
    cmd = [str(bin_dir / "llama-perplexity"), "-m", str(model), "-f", str(text_file), "-c", str(ctx),
           "-b", str(ctx), "-t", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=600)
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", out.stdout + out.stderr)
    if out.returncode or not found:
        raise RuntimeError(f"llama-perplexity failed on {model.name}: {(out.stdout + out.stderr)[-600:]}")
    return float(found.group(1))


# ---- mlx_tune side ----------------------------------------------------------------------------


def ppl_chunks(model, ids: list[int], ctx: int, bos_id: int | None) -> float:
    """Perplexity as llama-perplexity computes it (its ``perplexity()``, no ``--ppl-stride``).

    The tokens are cut into ``len // ctx`` windows of ``ctx``; the first token of each window
    is replaced by BOS when the vocabulary adds one; only the second half is scored:
    ``nll = -sum_{j = ctx/2}^{ctx-2} log p(w_{j+1} | w_{<=j})``, ``ppl = exp(nll / count)``.
    """
    nll, count = 0.0, 0
    first = ctx // 2
    for c in range(len(ids) // ctx):
        window = ids[c * ctx:(c + 1) * ctx]
        if bos_id is not None:
            window = [bos_id] + window[1:]
        logits = model(mx.array(window)[None])[0].astype(mx.float32)
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        targets = mx.array(window[first + 1:])
        picked = mx.take_along_axis(lp[first:ctx - 1], targets[:, None], axis=-1)
        nll -= picked.sum().item()
        count += ctx - 1 - first
    return math.exp(nll / count)


def greedy_text(model, tokenizer, prompt_ids: list[int], n: int) -> str:
    """mlx_tune's greedy answer: at most ``n`` tokens, stopping at an end-of-sequence token."""
    from mlx_lm.generate import generate_step

    eos = set(tokenizer.eos_token_ids)
    tokens: list[int] = []
    for token, _ in generate_step(mx.array(prompt_ids), model, max_tokens=n):
        if int(token) in eos:
            break
        tokens.append(int(token))
    return tokenizer.decode(tokens)


def render(tokenizer, messages: list[dict]) -> tuple[str, list[int]]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return text, list(ids["input_ids"] if isinstance(ids, dict) else ids)


def agreement(ours: list[str], theirs: list[str]) -> float:
    return sum(a.strip() == b.strip() for a, b in zip(ours, theirs)) / max(1, len(ours))


def target(name: str, measured, goal, passed, rival: str = "", unit: str = "", note: str | None = None) -> dict:
    t = {"name": name, "measured": measured, "target": goal, "unit": unit, "rival": rival, "pass": passed}
    if note:
        t["note"] = note
    return t


def ratio_target(name: str, theirs: float, ours: float, extra: str = "") -> dict:
    r = theirs / ours
    return target(name, round(r, 4), "1 ± 0.02", abs(r - 1) <= 0.02,
                  f"llama.cpp {theirs:.3f} vs mlx_tune {ours:.3f}{extra}")


# ---- the two checks ---------------------------------------------------------------------------


def prepare_smollm(adapter: Path | None, fresh: bool, types=FUSED_TYPES) -> tuple[Path, dict[str, Path], Path]:
    """The adapter, the fused GGUF files and the LoRA GGUF (made once, reused while the adapter is unchanged)."""
    if adapter is None:
        adapter = WORK / "adapter"
        if fresh or not (adapter / "adapters.safetensors").is_file():
            if not (ROOT / "data" / "demo" / "train.jsonl").is_file():
                sh(PY + ["data_transform.py", *map(str, sorted((ROOT / "data" / "demo_raw").iterdir())),
                         "--out", "data/demo", "--seed", "0", "--force"])
            say("training the demo adapter (12 steps of configs/demo.yaml) ...")
            t0 = time.perf_counter()
            sh(PY + ["-m", "mlx_tune", "train", "configs/demo.yaml", f"output_dir={adapter}", "train.iters=12",
                     "train.steps_per_eval=12", "train.save_every=12", "eval.prompts=null", "train.keep_best=false"],
               timeout=1800)
            say(f"  trained in {time.perf_counter() - t0:.0f}s")
    stamp = (adapter / "adapters.safetensors").stat().st_mtime
    fused = {}
    for t in types:
        out = WORK / f"fused-{t}.gguf"
        if fresh or not out.is_file() or out.stat().st_mtime < stamp:
            t0 = time.perf_counter()
            sh(PY + ["-m", "mlx_tune", "fuse", "configs/demo.yaml", f"output_dir={adapter}", f"fused_dir={out}",
                     "fuse.format=gguf", f"fuse.gguf_type={t}", "fuse.force=true"], timeout=2400)
            say(f"fused {out.name} in {time.perf_counter() - t0:.0f}s")
        fused[t] = out
    lora = WORK / "lora.gguf"
    if fresh or not lora.is_file() or lora.stat().st_mtime < stamp:
        sh(PY + ["-m", "mlx_tune", "adapter", "export", "--format", "gguf", "--base", str(MODEL), str(adapter),
                 str(lora)])
    return adapter, fused, lora


def smollm_check(bin_dir: Path, args) -> list[dict]:
    from mlx_tune.adapters.files import read_adapter_template
    from mlx_tune.adapters.manager import load_adapter
    from mlx_tune.model.chat_templates import set_chat_template
    from mlx_tune.model.loading import load_model

    adapter, fused, lora = prepare_smollm(args.adapter, args.fresh, args.types)
    rows = [json.loads(line) for line in args.prompts.read_text().splitlines() if line.strip()]
    rows = rows[: 16 if args.quick else len(rows)]
    model, tokenizer, _ = load_model(MODEL)
    SMOL["tokenizer"] = tokenizer
    template = read_adapter_template(adapter)
    if template is not None:
        set_chat_template(tokenizer, template)
    prompts = [render(tokenizer, r["messages"]) for r in rows]
    base_answers = [greedy_text(model, tokenizer, ids, args.max_tokens) for _, ids in prompts]
    load_adapter(model, adapter)
    ours = [greedy_text(model, tokenizer, ids, args.max_tokens) for _, ids in prompts]
    same_ids = sum(llama_tokenize(bin_dir, MODEL, text) == ids for text, ids in prompts) / len(prompts)
    changed = 1 - agreement(base_answers, ours)
    say(f"SmolLM2 + adapter ({adapter}), {len(prompts)} demo prompts, {args.max_tokens} tokens: the adapter "
        f"changes {changed:.0%} of mlx_tune's answers; prompts tokenized alike by llama.cpp: {same_ids:.0%}")
    targets = [
        target("llama.cpp tokenizes the rendered demo prompts as mlx_tune (SmolLM2)", round(same_ids, 3), 1.0,
               same_ids == 1.0, unit="x"),
        target("the adapter changes mlx_tune's greedy answers (so agreement below means something)",
               round(changed, 3), "> 0", changed > 0, unit="x",
               rival=f"e.g. base {base_answers[0].strip()!r} -> tuned {ours[0].strip()!r}"),
    ]
    runs = [(f"fused {t}", path, None) for t, path in fused.items()] + [("base Q4_1 + LoRA GGUF", MODEL, lora)]
    for label, path, lo in runs:
        t0 = time.perf_counter()
        theirs = [llama_generate(bin_dir, path, text, args.max_tokens, lo) for text, _ in prompts]
        agree = agreement(ours, theirs)
        bad = next((f"{a.strip()!r} vs llama.cpp {b.strip()!r}" for a, b in zip(ours, theirs) if a.strip() != b.strip()),
                   "")
        say(f"  {label:24s} same greedy answers {agree:6.1%} ({time.perf_counter() - t0:.0f}s)"
            + (f"; first difference: {bad}" if bad else ""))
        goal, passed = (0.95, agree >= 0.95) if "q4_0" not in label else ("report", None)
        targets.append(target(f"llama.cpp {label}: greedy answers equal to mlx_tune base + adapter (SmolLM2)",
                              round(agree, 3), goal, passed, unit="x",
                              rival=f"{len(prompts)} demo prompts, {args.max_tokens} tokens",
                              note="reported, no target" if passed is None else None))
    # Perplexity: the same file in both, on llama.cpp's tokens of the text, chunked alike.
    text_file = WORK / "ppl.txt"
    from perplexity_modes import TEXT

    write_text_atomic(text_file, TEXT)
    their_ids = llama_tokenize(bin_dir, MODEL, TEXT, parse_special=False)
    same_text_ids = their_ids == tokenizer.encode(TEXT)
    bos = tokenizer.bos_token_id if tokenizer.encode("a")[:1] == [tokenizer.bos_token_id] else None
    ref_ppl = ppl_chunks(model, their_ids, args.ctx, bos)
    del model
    for t in [t for t in ("f16", "q8_0") if t in fused]:
        theirs_ppl = llama_perplexity(bin_dir, fused[t], text_file, args.ctx)
        fmodel, _, _ = load_model(fused[t])
        ours_ppl = ppl_chunks(fmodel, their_ids, args.ctx, bos)
        del fmodel
        say(f"  perplexity fused {t}: llama.cpp {theirs_ppl:.3f}, mlx_tune {ours_ppl:.3f} "
            f"(base + adapter {ref_ppl:.3f}; ctx {args.ctx}, {len(their_ids)} tokens, tokenized alike: {same_text_ids})")
        targets.append(ratio_target(f"llama.cpp / mlx_tune perplexity, SmolLM2 fused {t} (ctx {args.ctx})",
                                    theirs_ppl, ours_ppl, f"; base + adapter {ref_ppl:.3f}"))
    return targets


FAMILY_TYPES = ("qwen3", "gemma2", "gemma3_text", "phi3", "granite", "olmo2")
SMOL: dict = {}  # SmolLM2's tokenizer, loaded once (the tiny models borrow it: a real BPE with merges)


def tiny_family(path: Path, model_type: str, tokenizer) -> Path:
    """A tiny model of mlx-lm's class for ``model_type`` (seeded random weights, the family
    test's overrides, SmolLM2's tokenizer), saved as a Hugging Face folder."""
    from mlx.utils import tree_flatten

    from mlx_tune.testing.families import FAMILIES
    from mlx_tune.testing.tiny import tiny_config, tiny_model

    over = {**FAMILIES[model_type].overrides, "vocab_size": len(tokenizer._tokenizer.get_vocab()),
            "eos_token_id": tokenizer.eos_token_id, "bos_token_id": None}
    if "query_pre_attn_scalar" in over:  # transformers' Gemma2Config (read with the tokenizer) wants an int
        over["query_pre_attn_scalar"] = int(over["query_pre_attn_scalar"])
    model = tiny_model(model_type, seed=0, **over)
    weights = dict(tree_flatten(model.parameters()))
    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    (path / "config.json").write_text(json.dumps(tiny_config(model_type, **over), indent=2))
    tokenizer._tokenizer.save_pretrained(str(path))
    return path


def family_check(bin_dir: Path, args, model_type: str) -> list[dict]:
    from perplexity_modes import TEXT

    from mlx_tune.export.writers import write_gguf_file
    from mlx_tune.model.loading import load_model

    if "tokenizer" not in SMOL:
        SMOL["tokenizer"] = load_model(MODEL)[1]
    # The folder's name becomes general.name, and llama.cpp gives a vocabulary named "phi3" Phi-3's
    # own token fix-ups (which need Phi-3's "</s>"): a neutral name, as the borrowed vocabulary is SmolLM2's.
    folder = tiny_family(WORK / f"tiny-{model_type}" / "hf", model_type, SMOL["tokenizer"])
    model, tokenizer, info = load_model(folder)
    out = WORK / f"tiny-{model_type}" / "gguf"
    out.mkdir(parents=True, exist_ok=True)
    path = write_gguf_file(model, tokenizer, info, out, "f16", None)
    starts = [p.strip() for p in TEXT.split(". ")][: 6 if args.quick else 12]
    prompts = [(s, tokenizer.encode(s)) for s in starts]
    same_ids = sum(llama_tokenize(bin_dir, path, s) == ids for s, ids in prompts) / len(prompts)
    ours = [greedy_text(model, tokenizer, ids, 16) for _, ids in prompts]
    theirs = [llama_generate(bin_dir, path, s, 16) for s, _ in prompts]
    agree = agreement(ours, theirs)
    text_file = WORK / "ppl.txt"
    write_text_atomic(text_file, TEXT)
    their_ids = llama_tokenize(bin_dir, path, TEXT, parse_special=False)
    theirs_ppl = llama_perplexity(bin_dir, path, text_file, args.ctx)
    ours_ppl = ppl_chunks(model, their_ids, args.ctx, None)
    say(f"tiny {model_type} (HF folder -> our GGUF f16): same greedy continuations {agree:.0%} of {len(prompts)}, "
        f"tokenized alike {same_ids:.0%}; perplexity llama.cpp {theirs_ppl:.2f} vs mlx_tune {ours_ppl:.2f}")
    return [
        target(f"llama.cpp tiny {model_type} GGUF f16: greedy continuations equal to mlx_tune's (HF folder)",
               round(agree, 3), 0.95, agree >= 0.95, unit="x",
               rival=f"{len(prompts)} prompts, 16 tokens; tokenized alike {same_ids:.0%}"),
        ratio_target(f"llama.cpp / mlx_tune perplexity, tiny {model_type} GGUF f16 (ctx {args.ctx})",
                     theirs_ppl, ours_ppl),
    ]


SMOL_NAME = "llama.cpp SmolLM2 fused f16 / q8_0 / q4_0 and base + LoRA GGUF: greedy answers and perplexity"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="16 demo prompts instead of all 40, 6 Qwen3 prompts")
    p.add_argument("--adapter", type=Path, help="an adapter trained on the demo task (default: train one, 12 steps)")
    p.add_argument("--prompts", type=Path, default=ROOT / "data" / "demo_prompts.jsonl")
    p.add_argument("--max-tokens", type=int, default=12)
    p.add_argument("--ctx", type=int, default=128, help="llama-perplexity -c (the text must hold 2 windows)")
    p.add_argument("--fresh", action="store_true", help="train, fuse and export again")
    p.add_argument("--families", type=lambda v: v.split(","), default=list(FAMILY_TYPES),
                   help=f"tiny families written as GGUF f16 and judged too (default: {','.join(FAMILY_TYPES)})")
    p.add_argument("--skip-smollm", action="store_true", help="only the tiny families")
    p.add_argument("--types", type=lambda v: v.split(","), default=list(FUSED_TYPES),
                   help="fused SmolLM2 GGUF types to judge (default: f16,q8_0,q4_0)")
    p.add_argument("--json", type=Path, default=RESULTS / "llamacpp.json")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT / "bench"))
    start = time.perf_counter()
    WORK.mkdir(parents=True, exist_ok=True)
    bin_dir, why = build_llamacpp()
    targets: list[dict] = []
    if bin_dir is None:
        say(f"skipped: {why}")
        names = [SMOL_NAME] + [f"llama.cpp tiny {t} GGUF f16: greedy continuations and perplexity" for t in args.families]
        targets = [target(n, None, "runs", None, note=f"skipped: {why}") for n in names]
    elif not MODEL.is_file():
        say(f"skipped: {MODEL} is absent (make setup fetches it)")
        targets = [target(SMOL_NAME, None, "runs", None, note="skipped: demo model absent")]
    else:
        say(f"llama.cpp: {bin_dir}")
        checks = [] if args.skip_smollm else [(SMOL_NAME, smollm_check)]
        checks += [
            (f"llama.cpp tiny {t} GGUF f16", lambda b, a, t=t: family_check(b, a, t)) for t in args.families]
        for name, check in checks:
            try:
                targets += check(bin_dir, args)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                say(f"{name}: failed: {exc}")
                targets.append(target(name, None, "runs", False, note=str(exc).splitlines()[0][:200]))
    say(f"({time.perf_counter() - start:.0f}s)")
    write_text_atomic(args.json.with_suffix(".log"), "\n".join(LOG) + "\n")
    return emit_targets(targets, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
