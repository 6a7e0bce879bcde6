"""Merge an adapter into its base and export the result, then prove the adapter survived.

A LoRA layer computes ``y = W0 x + s B A x``; fusing stores ``W = W0 + s B A`` (DoRA:
``m * (W0 + s B A) / ||W0 + s B A||_row``) in one plain layer. With a quantized base the
fused weight is quantized again, which can round a small ``s B A`` back to ``W0``: the
fidelity check below measures that, and by default keeps the adapted layers at 8 bits
(or dense) when it happens.

Outputs (each written into a temporary folder next to the target, committed at the end
with ``mlx_tune.atomic``; the writers are in ``export.writers``, the per-layer arrays in
``export.units``):

* ``mlx``: safetensors + config.json (+ ``quantization``) + tokenizer files: adapted
  layers re-quantized with the base's bits / group size (``--dequantize``: all dense).
* ``hf``: dense safetensors under the Hugging Face parameter names, config.json with no
  quantization entries, tokenizer files and chat template (``transformers`` loads it).
* ``gguf``: ``model-<type>.gguf`` (f16, q8_0, q4_0) with llama.cpp names and tokenizer.

Memory: the model stays as loaded (quantized base + adapter); tensors are computed one
layer at a time (fuse, quantize, evaluate), streamed into shards of at most
``writers.SHARD_BYTES`` and dropped, so a quantized output never needs the dense model in memory.

The check: next-token distributions of the written output, loaded back with
``load_model``, against base + adapter and against the base alone (``fidelity``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from mlx_tune.adapters.files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, fingerprint, read_adapter_template
from mlx_tune.adapters.lora import LoRALinear
from mlx_tune.adapters.manager import load_adapter
from mlx_tune.adapters.peft import PEFT_WEIGHTS
from mlx_tune.atomic import commit_dir, temp_dir_beside, write_json_atomic, write_text_atomic
from mlx_tune.config import Config
from mlx_tune.errors import UserError
from mlx_tune.export import fidelity
from mlx_tune.export.gguf import check_exportable
from mlx_tune.export.modelfile import modelfile
from mlx_tune.export.units import affine_params, units
from mlx_tune.export.writers import DTYPES, write_gguf_file, write_safetensors_folder
from mlx_tune.model import quant
from mlx_tune.model.chat_templates import set_chat_template, use_chat_template

REPORT_FILE = "fuse_report.json"
NOISE_KL = 1e-5  # below this mean KL an adapter makes no measurable difference
# What each keep-adapted policy tries after the first output erased the adapter.
KEEP_LADDER = {"auto": ("8bit", "dense"), "8bit": ("8bit",), "dense": ("dense",), "off": ()}


@dataclass
class FuseOptions:
    """What to write (from FuseConfig and the command line)."""

    format: str = "mlx"
    dequantize: bool = False
    dtype: str = "float16"
    gguf_type: str = "q8_0"
    min_top1_agreement: float = 0.9
    keep_adapted: str = "auto"
    force: bool = False

    @classmethod
    def from_config(cls, fcfg) -> FuseOptions:
        return cls(**{k: getattr(fcfg, k) for k in cls.__dataclass_fields__})


def write_output(model, tokenizer, info, out: Path, opts: FuseOptions, keep: str | None) -> Path:
    """Write one output into folder ``out``; returns the path our loader reads it from."""
    out.mkdir(parents=True, exist_ok=True)
    if opts.format == "gguf":
        return write_gguf_file(model, tokenizer, info, out, opts.gguf_type, keep)
    dense = opts.format == "hf" or opts.dequantize
    write_safetensors_folder(model, tokenizer, info.config, out, opts.format, dense, opts.dtype, keep)
    return out


def quantized_output(model: nn.Module, opts: FuseOptions) -> bool:
    """Whether the output re-quantizes adapted layers (so re-quantization can erase the adapter)."""
    if opts.format == "gguf":
        return opts.gguf_type != "f16"
    if opts.format == "hf" or opts.dequantize:
        return False
    return any(u.adapted and u.packed for u in units(model))


def check_before_writing(model: nn.Module, info, opts: FuseOptions) -> None:
    """Problems found from shapes alone (GGUF architecture and block widths), before any work."""
    if not any(u.adapted for u in units(model)):
        raise UserError("the model holds no active adapter to fuse")
    if opts.format == "gguf":
        check_exportable(info.config, [(u.name(k), u.shape(k)) for u in units(model) for k in u.keys()], opts.gguf_type)
    elif opts.dtype not in DTYPES:
        raise UserError(f"fuse.dtype: {opts.dtype!r} is not supported; use {', '.join(DTYPES)}")


# ---------------------------------------------------------------------------
# The output folder
# ---------------------------------------------------------------------------


def check_target(target: Path, force: bool, adapter_dir: Path | None = None) -> None:
    """Refuse an existing output (without force) and one that would delete the adapter."""
    target = Path(target)
    if adapter_dir is not None:
        t, a = target.resolve(), Path(adapter_dir).resolve()
        if t == a or a.is_relative_to(t):
            raise UserError(f"{target}: the fused output would replace the adapter folder {adapter_dir}; "
                            "set fused_dir (or --out) to another folder")
    if target.exists() and not force:
        raise UserError(f"{target}: already exists; pass --force (or fuse.force=true) to replace it, or choose --out")
    single = target.suffix.lower() == ".gguf"
    if target.exists() and single and target.is_dir():
        raise UserError(f"{target}: is a folder; a name ending in .gguf is the output file itself")
    if target.exists() and not single and not target.is_dir():
        raise UserError(f"{target}: exists and is not a folder; choose another --out")


def single_file(target: Path) -> bool:
    """``fused_dir: out/model.gguf``: the output is that one file, not a folder."""
    return Path(target).suffix.lower() == ".gguf"


def report_path_of(target: Path) -> Path:
    """Where the fuse report of an output lives: inside its folder, or beside a single file."""
    target = Path(target)
    return target.with_name(target.stem + ".fuse_report.json") if single_file(target) else target / REPORT_FILE


def _template_of(tokenizer) -> str | None:
    template = getattr(getattr(tokenizer, "_tokenizer", tokenizer), "chat_template", None)
    return template if isinstance(template, str) else None


def _temp_dir(target: Path) -> Path:
    """A fresh temporary folder beside ``target`` (``mlx_tune.atomic.temp_dir_beside``)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{target.parent}: cannot create the output's parent folder ({exc.strerror})") from None
    return temp_dir_beside(target)


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ---------------------------------------------------------------------------
# The whole fuse: write, load back, compare, maybe keep adapted layers wider
# ---------------------------------------------------------------------------


def _with_adapter(model: nn.Module, on: bool) -> None:
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            m.enabled = on


def erased_reasons(fused_vs_adapter, fused_vs_base, base_vs_adapter, min_top1: float) -> list[str]:
    """Why the fused model does not keep the adapter (empty: it does)."""
    reasons = []
    if fused_vs_adapter.top1_agreement < min_top1:
        reasons.append(f"top-1 agreement with base + adapter {fused_vs_adapter.top1_agreement:.3f} "
                       f"< fuse.min_top1_agreement {min_top1}")
    if base_vs_adapter.mean_kl > NOISE_KL and fused_vs_base.mean_kl < fused_vs_adapter.mean_kl:
        reasons.append(f"closer to the base (mean KL {fused_vs_base.mean_kl:.3g}) than to base + adapter "
                       f"(mean KL {fused_vs_adapter.mean_kl:.3g})")
    return reasons


def _storage_name(opts: FuseOptions, keep: str | None, model) -> str:
    if opts.format == "gguf":
        return {"8bit": "q8_0", "dense": "f16"}.get(keep or "", opts.gguf_type)
    if opts.format == "hf" or opts.dequantize or keep == "dense":
        return f"dense {opts.dtype}"
    bits = sorted({p["bits"] for u in units(model) if u.adapted and (p := affine_params(u.layer))})
    if keep == "8bit":
        return "affine 8-bit"
    return f"affine {'/'.join(map(str, bits))}-bit (re-quantized like the base)" if bits else f"dense {opts.dtype}"


@dataclass
class FuseResult:
    report: dict
    output: Path
    fused: tuple | None = None  # (model, tokenizer) of the output as loaded back, when asked for


def export(model: nn.Module, tokenizer, info, target: str | Path, opts: FuseOptions, *,
           data_dir: str | Path | None = None, adapter: str | None = None, keep_loaded: bool = False,
           log: Callable[[str], None] = print) -> FuseResult:
    """Fuse ``model``'s active adapter into a new output at ``target`` and check it.

    ``model`` (base + loaded adapter) keeps its weights and adapters (on the CPU backend its
    quantized layers switch to the fast-path classes, same arrays). The output is loaded back with
    ``load_model`` and compared with base + adapter; if re-quantization erased the adapter
    the adapted layers are written again at 8 bits / dense as ``opts.keep_adapted`` says.
    """
    from mlx_tune.model.loading import load_model

    start = time.perf_counter()
    target = Path(target)
    check_target(target, opts.force, Path(adapter) if adapter else None)
    if single_file(target) and opts.format != "gguf":
        raise UserError(f"{target}: a name ending in .gguf needs fuse.format=gguf (or name a folder)")
    check_before_writing(model, info, opts)
    quant.prepare_for_backend(model)

    prompts, prompt_source = fidelity.check_prompts(tokenizer, data_dir)
    eos = set(getattr(tokenizer, "eos_token_ids", None) or [])
    _with_adapter(model, True)
    ref = fidelity.logprobs(model, prompts)
    ref_answers = fidelity.greedy(model, prompts, eos_ids=eos)
    _with_adapter(model, False)
    try:
        base = fidelity.logprobs(model, prompts)
    finally:
        _with_adapter(model, True)
    base_vs_adapter = fidelity.compare(ref, base)

    ladder = (None,) + (KEEP_LADDER[opts.keep_adapted] if quantized_output(model, opts) else ())
    already_8bit = (opts.gguf_type == "q8_0" if opts.format == "gguf"
                    else all((affine_params(u.layer) or {}).get("bits") == 8 for u in units(model) if u.adapted))
    if already_8bit:  # an 8-bit retry would write the same thing again
        ladder = tuple(k for k in ladder if k != "8bit")
    tmp = _temp_dir(target)
    peak = 0
    attempts: list[dict] = []
    fused_pair = None
    try:
        for keep in ladder:
            if tmp.exists():
                shutil.rmtree(tmp)
            # The write alone (fuse + quantize one layer at a time) gets its own peak.
            peak = max(peak, mx.get_peak_memory())
            mx.reset_peak_memory()
            t0 = time.perf_counter()
            path = write_output(model, tokenizer, info, tmp, opts, keep)
            write_s = time.perf_counter() - t0
            write_peak = mx.get_peak_memory()
            fused_model, fused_tok, _ = load_model(path)
            quant.prepare_for_backend(fused_model)
            close = fidelity.compare_model(fused_model, prompts, {"adapter": ref, "base": base})
            answers = fidelity.greedy(fused_model, prompts, eos_ids=eos)
            vs_adapter, vs_base = close["adapter"], close["base"]
            reasons = erased_reasons(vs_adapter, vs_base, base_vs_adapter, opts.min_top1_agreement)
            attempt = {
                "storage": _storage_name(opts, keep, model),
                "keep_adapted": keep,
                "bytes": _folder_bytes(tmp),
                "write_seconds": round(write_s, 3),
                "write_peak_memory_gb": round(write_peak / 2**30, 4),
                "fused_vs_adapter": vs_adapter.to_dict(),
                "fused_vs_base": vs_base.to_dict(),
                "greedy_match": sum(a == b for a, b in zip(answers, ref_answers)) / max(len(ref_answers), 1),
                "erased": reasons,
            }
            attempts.append(attempt)
            fused_pair = (fused_model, fused_tok) if keep_loaded else None
            del fused_model
            if not reasons:
                break
            if keep != ladder[-1]:
                log(f"fuse: re-quantization erased too much of the adapter ({'; '.join(reasons)}); "
                    f"writing the adapted layers again ({ladder[ladder.index(keep) + 1]})")
        final = attempts[-1]
        report = {
            "format": opts.format,
            "output": str(target / Path(path).name) if opts.format == "gguf" else str(target),
            "model": getattr(info, "source", None),
            "adapter": adapter,
            "storage": final["storage"],
            "kept_adapted": final["keep_adapted"],
            "ok": not final["erased"],
            "warnings": [f"the fused model does not keep the adapter: {r}" for r in final["erased"]],
            "size_bytes": final["bytes"],
            "size_cost_bytes": final["bytes"] - attempts[0]["bytes"],
            "prompts": {"source": prompt_source, "count": len(prompts), "positions": base_vs_adapter.positions},
            "fused_vs_adapter": final["fused_vs_adapter"],
            "fused_vs_base": final["fused_vs_base"],
            "base_vs_adapter": base_vs_adapter.to_dict(),
            "greedy_match": final["greedy_match"],
            "attempts": attempts,
            "fuse_seconds": round(time.perf_counter() - start, 3),
            "peak_memory_gb": round(max(peak, mx.get_peak_memory()) / 2**30, 4),
            "options": {k: getattr(opts, k) for k in FuseOptions.__dataclass_fields__},
        }
        if single_file(target):
            # One .gguf file: it replaces the target in one rename; the report goes beside it.
            report["output"] = str(target)
            os.replace(tmp / Path(path).name, target)
            write_text_atomic(report_path_of(target), json.dumps(report, indent=2) + "\n")
        else:
            if opts.format == "gguf":
                write_text_atomic(tmp / "Modelfile", modelfile(Path(path).name, _template_of(tokenizer)))
            write_text_atomic(tmp / REPORT_FILE, json.dumps(report, indent=2) + "\n")
            commit_dir(tmp, target)  # an old target (force) is moved aside first, then removed
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    final_path = target if single_file(target) else target / Path(path).name if opts.format == "gguf" else target
    return FuseResult(report, final_path, fused_pair)


def format_report(report: dict) -> str:
    """The printed summary: a small table and one line per warning."""
    p = report["prompts"]
    lines = [
        f"fidelity on {p['count']} prompts ({p['positions']} positions, {p['source']}):",
        f"  {'':28s} {'max KL':>10s} {'mean KL':>10s} {'top-1':>8s}",
    ]
    for label, key in (("fused vs base + adapter", "fused_vs_adapter"), ("base  vs base + adapter", "base_vs_adapter"),
                       ("fused vs base", "fused_vs_base")):
        c = report[key]
        lines.append(f"  {label:28s} {c['max_kl']:10.4g} {c['mean_kl']:10.4g} {c['top1_agreement']:8.3f}")
    lines.append(f"  greedy answers equal to base + adapter: {report['greedy_match']:.0%}")
    for a in report["attempts"][:-1]:
        lines.append(f"  first try {a['storage']}: erased the adapter ({'; '.join(a['erased'])})")
    if report["kept_adapted"]:
        lines.append(f"  kept the adapted layers {report['kept_adapted']}: size cost "
                     f"{report['size_cost_bytes'] / 2**20:+.1f} MiB")
    lines.append(f"storage {report['storage']}, {report['size_bytes'] / 2**20:.1f} MiB -> {report['output']}")
    last = report["attempts"][-1]
    lines.append(f"fuse time {report['fuse_seconds']:.1f} s (write {last['write_seconds']:.1f} s), peak memory "
                 f"{report['peak_memory_gb'] * 1024:.0f} MiB (write {last['write_peak_memory_gb'] * 1024:.0f} MiB)")
    lines += [f"WARNING: {w}" for w in report["warnings"]]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# From a config: what `mlx-tune fuse` and convert_and_serve.sh run
# ---------------------------------------------------------------------------


def adapter_folder(cfg) -> Path:
    """The trained adapter of ``cfg.output_dir``; a one-line UserError when it is not there."""
    folder = Path(cfg.output_dir)
    if (folder / ADAPTER_WEIGHTS).is_file() and (folder / ADAPTER_CONFIG).is_file():
        return folder
    if (folder / PEFT_WEIGHTS).is_file():  # a PEFT folder
        return folder
    missing = folder / (ADAPTER_WEIGHTS if not (folder / ADAPTER_WEIGHTS).is_file() else ADAPTER_CONFIG)
    raise UserError(f"{missing}: adapter file not found; train first (./train_by_mlx.sh CONFIG.yaml) "
                    "or set output_dir to the adapter's folder")


def check_fingerprint(model: nn.Module, folder: Path, cfg_model: str) -> None:
    """One-line error when the adapter was made for another base than ``model``."""
    path = folder / ADAPTER_CONFIG
    try:
        want = json.loads(path.read_text(encoding="utf-8")).get("base_fingerprint")
    except (OSError, ValueError):
        return  # load_adapter reports unreadable configs
    have = fingerprint(model)["base_fingerprint"]
    if want and want != have:
        raise UserError(f"{folder}: this adapter was trained on another base model (fingerprint {want}) than "
                        f"{cfg_model} (fingerprint {have}); set `model:` to the adapter's base")


def run_fuse(cfg: Config, opts: FuseOptions, out: str | Path | None = None, log: Callable[[str], None] = print) -> FuseResult:
    """Load ``cfg.model`` + the adapter in ``cfg.output_dir``, fuse, check and write the output."""
    from mlx_tune.model.loading import load_model

    mx.reset_peak_memory()
    start = time.perf_counter()
    target = Path(out) if out else cfg.fused_path
    folder = adapter_folder(cfg)
    check_target(target, opts.force, folder)
    model, tokenizer, info = load_model(cfg.model, cfg.quantize, trust_remote_code=cfg.trust_remote_code)
    check_fingerprint(model, folder, cfg.model)
    load_adapter(model, folder)
    # The template training used goes into the fused tokenizer files / GGUF metadata.
    template = read_adapter_template(folder)
    if template is not None:
        set_chat_template(tokenizer, template)
    else:
        use_chat_template(tokenizer, cfg.chat_template)
    log(f"fuse: {cfg.model} + {folder} -> {target} ({opts.format}"
        f"{', ' + opts.gguf_type if opts.format == 'gguf' else ''}{', dense ' + opts.dtype if opts.dequantize else ''})")
    result = export(model, tokenizer, info, target, opts, data_dir=cfg.data, adapter=str(folder), log=log)
    result.report["load_seconds"] = round(info.load_seconds, 3)
    result.report["total_seconds"] = round(time.perf_counter() - start, 3)
    result.report["peak_memory_gb"] = max(result.report["peak_memory_gb"], round(mx.get_peak_memory() / 2**30, 4))
    write_json_atomic(report_path_of(target), result.report)
    log(format_report(result.report))
    if not result.report["ok"]:
        print("fuse: the fused model does not keep the adapter; see the warnings above", file=sys.stderr)
    return result
