"""A full fine-tune's model folder, and its export (``mlx-tune fuse`` with nothing to merge).

Training writes ``OUTPUT_DIR/model``: dense safetensors under the Hugging Face parameter
names in the source dtype, config.json (no quantization entries), the tokenizer files with
the chat template training used, and ``mlx_tune_training.json`` (finetune mode, trained
modules, step). ``mlx-tune serve CONFIG`` serves that folder as the base; ``mlx-tune fuse``
converts it: ``mlx`` / ``hf`` (dense in ``fuse.dtype``) or ``gguf``. The written output is
loaded back and compared with the trained folder (next-token KL and top-1 agreement), as a
LoRA fuse is compared with base + adapter.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import mlx.nn as nn

from mlx_tune.atomic import commit_dir, write_json_atomic, write_text_atomic
from mlx_tune.errors import UserError
from mlx_tune.export import fidelity
from mlx_tune.export.gguf import check_exportable
from mlx_tune.export.modelfile import modelfile
from mlx_tune.export.units import units
from mlx_tune.export.writers import write_gguf_file, write_safetensors_folder
from mlx_tune.model.chat_templates import set_chat_template

TRAINING_FILE = "mlx_tune_training.json"
MODEL_DIR = "model"  # OUTPUT_DIR/model: a full fine-tune's model folder


def model_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / MODEL_DIR


def full_output(output_dir: str | Path) -> Path | None:
    """``OUTPUT_DIR/model`` when it holds a full fine-tune's model, else None."""
    folder = model_dir(output_dir)
    return folder if (folder / "config.json").is_file() else None


def write_model_folder(model: nn.Module, tokenizer, info, out: Path, dtype: str, *, template: str | None = None,
                       meta: dict | None = None) -> Path:
    """Write ``model`` (dense) as a Hugging Face folder at ``out``, atomically (a folder commit)."""
    from mlx_tune.atomic import temp_dir_beside

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(out)
    try:
        if template is not None:
            set_chat_template(tokenizer, template)
        write_safetensors_folder(model, tokenizer, info.config, tmp, "hf", True, dtype, None)
        write_text_atomic(tmp / TRAINING_FILE, json.dumps(meta or {}, indent=2, sort_keys=True) + "\n")
        commit_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def export_full(folder: Path, target: Path, opts, *, data_dir=None, log: Callable[[str], None] = print) -> dict:
    """Convert the model folder ``folder`` into ``target`` as ``opts`` says; returns the report."""
    from mlx_tune.export.fuse import REPORT_FILE, check_target, single_file
    from mlx_tune.model import quant
    from mlx_tune.model.loading import load_model

    start = time.perf_counter()
    check_target(target, opts.force, folder)
    if single_file(target):
        raise UserError(f"{target}: a full fine-tune exports into a folder; set fused_dir to a folder name")
    model, tokenizer, info = load_model(folder)
    if opts.format == "gguf":
        check_exportable(info.config, [(u.name(k), u.shape(k)) for u in units(model) for k in u.keys()],
                         opts.gguf_type)
    log(f"fuse: {folder} is a full fine-tune (nothing to merge) -> {target} ({opts.format}"
        f"{', ' + opts.gguf_type if opts.format == 'gguf' else ', dense ' + opts.dtype})")
    quant.prepare_for_backend(model)
    prompts, prompt_source = fidelity.check_prompts(tokenizer, data_dir)
    ref = fidelity.logprobs(model, prompts)
    from mlx_tune.atomic import temp_dir_beside

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(target)
    try:
        if opts.format == "gguf":
            path = write_gguf_file(model, tokenizer, info, tmp, opts.gguf_type, None)
            write_text_atomic(tmp / "Modelfile", modelfile(path.name, getattr(tokenizer, "chat_template", None)))
        else:
            write_safetensors_folder(model, tokenizer, info.config, tmp, opts.format, True, opts.dtype, None)
            path = tmp
        if (folder / TRAINING_FILE).is_file():
            shutil.copyfile(folder / TRAINING_FILE, tmp / TRAINING_FILE)
        written, _, _ = load_model(path)
        quant.prepare_for_backend(written)
        close = fidelity.compare_model(written, prompts, {"trained": ref})["trained"]
        report = {
            "format": opts.format, "model": str(folder), "adapter": None, "finetune": "full",
            "output": str(target / path.name) if opts.format == "gguf" else str(target),
            "prompts": {"source": prompt_source, "count": len(prompts)},
            "output_vs_trained": close.to_dict(),
            "ok": close.top1_agreement >= opts.min_top1_agreement,
            "fuse_seconds": round(time.perf_counter() - start, 3),
            "options": {k: getattr(opts, k) for k in type(opts).__dataclass_fields__},
        }
        write_json_atomic(tmp / REPORT_FILE, report)
        commit_dir(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"output vs trained model on {len(prompts)} prompts: mean KL {close.mean_kl:.4g}, "
        f"top-1 agreement {close.top1_agreement:.3f} -> {report['output']}")
    if not report["ok"]:
        log(f"WARNING: top-1 agreement {close.top1_agreement:.3f} < fuse.min_top1_agreement {opts.min_top1_agreement}")
    return report
