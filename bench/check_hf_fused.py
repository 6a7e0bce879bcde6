"""Check that a fused Hugging Face folder (``mlx-tune fuse --format hf``) gives our logits in transformers.

Fuses a tiny llama (random non-zero LoRA on every linear layer) and, with ``--smollm2``,
SmolLM2-135M (4-bit GGUF base) into float32 HF folders, computes logits with mlx_tune
(the folder loaded by our loader) and with ``transformers.AutoModelForCausalLM`` and
prints the largest absolute difference per model (pass: <= 1e-3;
measured: 2e-6 tiny, 7e-5 SmolLM2).

torch is often not installed next to mlx: the transformers side runs in-process when it
can, else in ``--torch-python`` (a Python with torch + transformers, e.g. a separate venv:
``python3 -m venv /tmp/hfenv && /tmp/hfenv/bin/pip install torch transformers safetensors``).
Prints "skipped: ..." and exits 0 when neither has torch.

    python bench/check_hf_fused.py [--smollm2] [--torch-python /tmp/hfenv/bin/python]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mlx_tune.runtime.blas import ensure_fast_blas  # noqa: E402

ensure_fast_blas()

TORCH_SIDE = r"""
import json, sys
import numpy as np, torch
from transformers import AutoModelForCausalLM
folder, ids_file, out_file = sys.argv[1:4]
ids = np.load(ids_file)
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
model.eval()
with torch.no_grad():
    logits = model(torch.tensor(ids)).logits.float().numpy()
np.save(out_file, logits)
"""


def torch_python(explicit: str | None) -> str | None:
    candidates = [explicit] if explicit else [sys.executable, "/tmp/hfenv/bin/python"]
    for python in candidates:
        if python and Path(python).exists():
            ok = subprocess.run([python, "-c", "import torch, transformers"], capture_output=True).returncode == 0
            if ok:
                return python
    return None


def fused_folder(model, tok, info, out: Path):
    from mlx_tune.export.fuse import FuseOptions, export

    return export(model, tok, info, out, FuseOptions(format="hf", dtype="float32"), log=lambda s: None)


def tiny_case(tmp: Path):
    import mlx.core as mx

    from mlx_tune.adapters import inject, wrappers
    from mlx_tune.config import LoraConfig
    from mlx_tune.model.loading import load_model
    from mlx_tune.testing.tiny import save_tiny_folder

    model, tok, info = load_model(save_tiny_folder(tmp / "tiny-src"))
    inject(model, LoraConfig(rank=4, alpha=8.0))
    mx.random.seed(1)
    for _, w in wrappers(model):
        w.adapter.lora_b = mx.random.normal(w.adapter.lora_b.shape) * 0.05
    return model, tok, info, 1e-3


def smollm2_case(tmp: Path):
    import mlx.core as mx

    from mlx_tune.adapters import inject, wrappers
    from mlx_tune.config import LoraConfig
    from mlx_tune.model.loading import load_model

    path = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        return None
    model, tok, info = load_model(path)
    inject(model, LoraConfig(rank=16, alpha=32.0))
    mx.random.seed(1)
    for _, w in wrappers(model):
        w.adapter.lora_b = mx.random.normal(w.adapter.lora_b.shape) * 0.01
    return model, tok, info, 1e-3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smollm2", action="store_true", help="also check SmolLM2-135M (models/ must hold it)")
    parser.add_argument("--torch-python", help="a Python interpreter with torch + transformers")
    args = parser.parse_args()
    python = torch_python(args.torch_python)
    if python is None:
        print("skipped: no Python with torch + transformers (see --torch-python)")
        return 0

    import mlx.core as mx
    import numpy as np

    from mlx_tune.model.loading import load_model

    results = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        cases = [("tiny llama", tiny_case)] + ([("SmolLM2-135M", smollm2_case)] if args.smollm2 else [])
        for label, build in cases:
            built = build(tmp)
            if built is None:
                print(f"{label}: skipped (model file absent)")
                continue
            model, tok, info, tolerance = built
            folder = tmp / label.replace(" ", "-")
            report = fused_folder(model, tok, info, folder).report
            text = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
            ids = np.array([tok.encode(text)], dtype=np.int64)
            ours_model, _, _ = load_model(folder)
            ours = np.array(ours_model(mx.array(ids)).astype(mx.float32))
            adapted = np.array(model(mx.array(ids)).astype(mx.float32))
            np.save(tmp / "ids.npy", ids)
            run = subprocess.run([python, "-c", TORCH_SIDE, str(folder), str(tmp / "ids.npy"), str(tmp / "hf.npy")],
                                 capture_output=True, text=True)
            if run.returncode != 0:
                print(f"{label}: transformers failed to load the folder:\n{run.stderr[-2000:]}")
                results.append({"name": label, "pass": False, "error": run.stderr[-500:]})
                continue
            theirs = np.load(tmp / "hf.npy")
            diff = float(np.abs(theirs - ours).max())
            vs_adapter = float(np.abs(theirs - adapted).max())
            same_top1 = float((theirs.argmax(-1) == adapted.argmax(-1)).mean())
            ok = diff <= tolerance
            results.append({"name": label, "max_abs_logit_diff_vs_mlx_tune": diff,
                            "max_abs_logit_diff_vs_base_plus_adapter": vs_adapter, "top1_agreement": same_top1,
                            "tolerance": tolerance, "fused_vs_adapter": report["fused_vs_adapter"], "pass": ok})
            print(f"{label}: transformers vs mlx_tune max |logit diff| {diff:.2e} (tolerance {tolerance:g}), "
                  f"vs base + adapter {vs_adapter:.2e}, top-1 agreement {same_top1:.3f}: {'PASS' if ok else 'FAIL'}")
    print(json.dumps(results, indent=2))
    return 0 if all(r["pass"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
