"""llama.cpp's conventions per architecture, as its ``convert_hf_to_gguf.py`` writes them.

* Names: the gguf package's ``TensorNameMap`` (the table llama.cpp's converter uses), so
  ``model.layers.3.post_feedforward_layernorm.weight`` is ``blk.3.post_ffw_norm.weight``
  for Gemma 2 and OLMo 2, and ``model.layers.3.post_attention_layernorm.weight`` is
  ``ffn_norm`` for Llama but ``post_attention_norm`` for Gemma.
* Layouts: llama-family Q and K rows are permuted into llama.cpp's rotary order
  (``permute_qk``, also Granite, a Llama subclass there); Gemma's RMSNorm computes
  ``x / rms(x) * (1 + w)``, and llama.cpp's plain ``x / rms(x) * w``, so Gemma norm weights
  are stored as ``w + 1`` (``norm_shift``).
* Metadata beyond the common keys (``extra_metadata``): Gemma's softcaps and sliding
  windows, Gemma 3's local RoPE base and local/global layer pattern, Granite's
  multipliers, Phi-3's original context length (its LongRoPE factors are not written:
  ``check_exportable`` refuses such a model). Values missing from config.json take
  mlx-lm's ``ModelArgs`` defaults, which is what the model being exported ran with.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache


@dataclass(frozen=True)
class Arch:
    gguf_arch: str
    permute_qk: bool = False
    norm_shift: float = 0.0  # added to every ``*norm.weight`` (Gemma stores 1 + w)
    needs_output: bool = False  # llama.cpp requires output.weight: a tied head is written out as a copy


# mlx-lm model_type -> GGUF architecture.
ARCHS: dict[str, Arch] = {
    "llama": Arch("llama", permute_qk=True),
    "mistral": Arch("llama", permute_qk=True),
    "qwen2": Arch("qwen2"),
    "qwen3": Arch("qwen3"),
    "gemma2": Arch("gemma2", norm_shift=1.0),
    "gemma3_text": Arch("gemma3", norm_shift=1.0),
    "phi3": Arch("phi3"),
    "granite": Arch("granite", permute_qk=True),
    "olmo2": Arch("olmo2", needs_output=True),
}

_BLOCK = re.compile(r"^model\.layers\.(\d+)\.")


@cache
def _name_map(gguf_arch: str):
    import gguf

    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == gguf_arch)
    return gguf.get_tensor_name_map(arch, 1)  # block 0 only: the block index is put back below


def gguf_name(hf_name: str, model_type: str = "llama") -> str | None:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight`` (None: llama.cpp has no name)."""
    arch = ARCHS.get(model_type)
    if arch is None:
        return None
    found = _BLOCK.match(hf_name)
    probe = _BLOCK.sub("model.layers.0.", hf_name) if found else hf_name
    name = _name_map(arch.gguf_arch).get_name(probe, try_suffixes=(".weight", ".bias"))
    if name is None:
        return None
    return name.replace("blk.0.", f"blk.{found.group(1)}.", 1) if found else name


def rope_dimensions(config: dict, head_dim: int) -> int:
    """Rotated dimensions per head (Phi-3's ``partial_rotary_factor`` rotates a part)."""
    return int(float(config.get("partial_rotary_factor", 1.0)) * head_dim)


def extra_metadata(writer, model_type: str, config: dict) -> None:
    """The architecture's own GGUF keys, as ``convert_hf_to_gguf.py`` adds them."""
    get = config.get
    if model_type == "gemma2":
        writer.add_attn_logit_softcapping(float(get("attn_logit_softcapping") or 50.0))
        writer.add_final_logit_softcapping(float(get("final_logit_softcapping") or 30.0))
        writer.add_sliding_window(int(get("sliding_window") or 4096))
    elif model_type == "gemma3_text":
        # mlx-lm: layer i is global when (i + 1) % pattern == 0, local (sliding, local RoPE base) otherwise.
        pattern = int(get("sliding_window_pattern") or 6)
        writer.add_sliding_window(int(get("sliding_window") or 512))
        writer.add_sliding_window_pattern([(i + 1) % pattern != 0 for i in range(int(config["num_hidden_layers"]))])
        writer.add_rope_freq_base_swa(float(get("rope_local_base_freq") or 10000.0))
        if get("final_logit_softcapping"):
            writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
    elif model_type == "granite":
        for key, add in (("attention_multiplier", writer.add_attention_scale),
                         ("embedding_multiplier", writer.add_embedding_scale),
                         ("residual_multiplier", writer.add_residual_scale),
                         ("logits_scaling", writer.add_logit_scale)):
            if get(key) is not None:
                add(float(config[key]))
    elif model_type == "phi3":
        writer.add_rope_scaling_orig_ctx_len(int(get("original_max_position_embeddings") or 4096))


def default_rope_theta(model_type: str) -> float:
    """mlx-lm's default RoPE base where config.json leaves it out."""
    return 1_000_000.0 if model_type == "gemma3_text" else 10000.0
