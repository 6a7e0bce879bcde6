"""Check that an exported PEFT folder gives the same logits in Hugging Face PEFT as in mlx_tune.

Builds the tiny llama model (tied embeddings) in mlx_tune, trains nothing but gives a
LoRA adapter (and a DoRA adapter) random non-zero weights, saves it, exports it with
``export_peft``, builds ``transformers.LlamaForCausalLM`` from the same config and
weights, loads the folder with ``peft.PeftModel.from_pretrained`` and compares logits
(max abs difference <= 1e-3). Needs torch + peft + transformers next to mlx; prints
"skipped: torch/peft not installed" and exits 0 otherwise.

    python bench/check_peft_interop.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlx_tune.runtime.blas import ensure_fast_blas  # noqa: E402

ensure_fast_blas()

TOLERANCE = 1e-3


def main() -> int:
    try:
        import peft  # noqa: F401
        import torch
        import transformers  # noqa: F401
    except ImportError:
        print("skipped: torch/peft not installed")
        return 0

    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    from mlx_tune import adapters
    from mlx_tune.adapters.peft import export_peft
    from mlx_tune.config import LoraConfig
    from mlx_tune.testing.tiny import tiny_config, tiny_model

    cfg = tiny_config("llama", num_hidden_layers=3)
    tokens = [[5, 17, 99, 3, 250, 42, 7, 8, 120, 33, 1, 2]]
    cases = [
        ("lora q,v", LoraConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj"])),
        ("lora all-linear top 2, rslora", LoraConfig(rank=8, alpha=16, target_modules="all-linear", layers=2, use_rslora=True)),
        ("lora regex", LoraConfig(rank=4, alpha=4, target_modules=r"re:model\.layers\.(0\.self_attn\.k_proj|2\.mlp\.up_proj)")),
        ("dora all-linear", LoraConfig(rank=4, alpha=8, target_modules="all-linear", use_dora=True)),
    ]
    worst = 0.0
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, lcfg) in enumerate(cases):
            model = tiny_model("llama", seed=0, num_hidden_layers=3)
            base_state = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
            adapters.inject(model, lcfg)
            mx.random.seed(100 + i)
            for _, w in adapters.wrappers(model):
                a = w.adapters["default"]
                a.lora_a = mx.random.normal(a.lora_a.shape) * 0.1
                a.lora_b = mx.random.normal(a.lora_b.shape) * 0.1
                if a.kind == "dora":
                    a.m = a.m * (1 + 0.2 * mx.random.normal(a.m.shape))
            model.eval()
            ours = np.array(model(mx.array(tokens)))
            adir, pdir = Path(tmp) / f"a{i}", Path(tmp) / f"p{i}"
            adapters.save_adapter(model, adir, lcfg, None)
            export_peft(adir, pdir)

            hf_cfg = LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"})
            hf = LlamaForCausalLM(hf_cfg).eval()
            state = {k: torch.from_numpy(v) for k, v in base_state.items()}
            missing, unexpected = hf.load_state_dict(state, strict=False)
            missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
            if missing or unexpected:
                raise SystemExit(f"weight names differ: missing {missing}, unexpected {unexpected}")
            hf.tie_weights()
            with torch.no_grad():
                base_diff = float(np.abs(hf(torch.tensor(tokens)).logits.numpy() - np.array(
                    tiny_model("llama", seed=0, num_hidden_layers=3)(mx.array(tokens)))).max())
                pm = PeftModel.from_pretrained(hf, str(pdir)).eval()
                theirs = pm(torch.tensor(tokens)).logits.numpy()
            diff = float(np.abs(theirs - ours).max())
            moved = float(np.abs(ours - np.array(tiny_model("llama", seed=0, num_hidden_layers=3)(mx.array(tokens)))).max())
            worst = max(worst, diff)
            ok = diff <= TOLERANCE
            if not ok:
                failed.append(label)
            print(f"{label:32s} max|logits diff| = {diff:.2e} (base models differ by {base_diff:.1e}; "
                  f"the adapter moves logits by {moved:.2f}) {'ok' if ok else 'FAIL'}")
    print(f"PEFT interop: worst {worst:.2e} vs tolerance {TOLERANCE:g}: {'pass' if not failed else 'FAIL ' + ', '.join(failed)}")
    return 0 if not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
