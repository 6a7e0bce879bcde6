"""A model's shapes from its config alone, for the planner: ``Arch`` and where configs come from.

``read_source_config`` finds a model's ``config.json`` values without reading any
weights: from a local folder, a GGUF header (metadata and tensor types, memory-mapped),
the Hugging Face cache or hub, or the published values in ``model.known_configs``.
``arch_from_config`` turns them into an ``Arch``: the widths of a llama-style decoder
block and of the embedding / LM head, the MoE blocks (``E`` routed experts of MLP width
``Fm``, ``k`` per token, a router ``D x E``) and the sliding-window layers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_tune.errors import UserError
from mlx_tune.model import hub

SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo2", "granite", "phi3", "gemma", "gemma2",
                   "gemma3_text", "gemma3", "qwen3_moe", "mixtral", "gpt_oss")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EXPERT_LINEAR = ("gate_proj", "up_proj", "down_proj")  # one expert's MLP (mlx-lm's SwitchGLU)
QK_NORM_TYPES = ("qwen3", "qwen3_moe", "gemma3_text", "olmo2")

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class Arch:
    """The shapes of a llama-style decoder, read from an HF config dict."""

    model_type: str
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    attention_bias: bool
    qk_norm: bool
    dtype_bytes: int  # the dense dtype of the source weights (activations follow it)
    num_experts: int = 0  # routed experts per MoE block (0: dense MLPs only)
    experts_per_tok: int = 0
    moe_intermediate: int = 0  # one expert's MLP width
    moe_layers: int = 0  # blocks whose MLP is the MoE (the rest are dense)
    sliding_window: int | None = None
    sliding_layers: int = 0  # blocks attending within the window (the rest are global)

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """name -> (in, out) of one dense block's linear layers."""
        d, f = self.hidden, self.intermediate
        return {
            "q_proj": (d, self.q_width), "k_proj": (d, self.kv_width), "v_proj": (d, self.kv_width),
            "o_proj": (self.q_width, d), "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d),
        }

    def attention_linears(self) -> dict[str, tuple[int, int]]:
        return {k: v for k, v in self.linears().items() if k.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))}

    def expert_linears(self) -> dict[str, tuple[int, int]]:
        """name -> (in, out) of one expert's linears (each stored E times, (E, out, in))."""
        d, fm = self.hidden, self.moe_intermediate
        return {"gate_proj": (d, fm), "up_proj": (d, fm), "down_proj": (fm, d)}

    @property
    def dense_layers(self) -> int:
        return self.layers - self.moe_layers

    def block_params(self) -> int:
        """Linear weights of one dense block (an MoE block's attention part: ``moe_block_params``)."""
        return sum(i * o for i, o in self.linears().values())

    def moe_block_params(self) -> int:
        """Attention, all experts and the router of one MoE block."""
        attention = sum(i * o for i, o in self.attention_linears().values())
        experts = self.num_experts * sum(i * o for i, o in self.expert_linears().values())
        return attention + experts + self.hidden * self.num_experts

    def params(self) -> int:
        head = 0 if self.tied else self.vocab * self.hidden
        blocks = self.dense_layers * self.block_params() + self.moe_layers * self.moe_block_params()
        return blocks + self.vocab * self.hidden + head

    def active_params(self) -> int:
        """Parameters one token uses (MoE: only its ``k`` experts)."""
        if not self.moe_layers:
            return self.params()
        unused = (self.num_experts - self.experts_per_tok) * sum(i * o for i, o in self.expert_linears().values())
        return self.params() - self.moe_layers * unused


def _get(cfg: dict, *names: str, default: Any = None) -> Any:
    for name in names:
        if cfg.get(name) is not None:
            return cfg[name]
    return default


def arch_from_config(cfg: dict, where: str = "config") -> Arch:
    """``Arch`` from an HF ``config.json`` dict; UserError naming the missing key."""
    if not isinstance(cfg, dict):
        raise UserError(f"{where}: a model config must be a JSON object")
    text_cfg = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else None
    if text_cfg and "hidden_size" not in cfg:  # multimodal wrappers keep the LM in text_config
        cfg = {**text_cfg, "model_type": text_cfg.get("model_type", cfg.get("model_type"))}
    model_type = str(cfg.get("model_type", ""))
    if model_type not in SUPPORTED_TYPES:
        raise UserError(
            f"{where}: model_type {model_type!r} is not one the planner knows; "
            f"supported: {', '.join(SUPPORTED_TYPES)}"
        )
    missing = [k for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                           "vocab_size") if cfg.get(k) is None]
    if missing:
        raise UserError(f"{where}: config.json lacks {', '.join(missing)}; cannot plan memory")
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    dtype = str(_get(cfg, "torch_dtype", "dtype", default="float32")).replace("torch.", "")
    layers = int(cfg["num_hidden_layers"])
    experts = int(_get(cfg, "num_experts", "num_local_experts", default=0) or 0)
    moe_layers = 0
    if experts:
        step = int(cfg.get("decoder_sparse_step") or 1)
        dense_only = set(cfg.get("mlp_only_layers") or [])
        moe_layers = sum(1 for i in range(layers) if i not in dense_only and (i + 1) % step == 0)
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) is not False else None
    types = cfg.get("layer_types")
    if window and isinstance(types, list):
        sliding = sum(t == "sliding_attention" for t in types)
    elif window and model_type in ("gemma3_text", "gemma2"):  # older configs: a pattern instead of a list
        pattern = int(cfg.get("sliding_window_pattern") or 2)
        sliding = sum(1 for i in range(layers) if (i + 1) % pattern)
    else:
        sliding = layers if window and window < int(cfg.get("max_position_embeddings") or 0) else 0
    return Arch(
        model_type=model_type,
        hidden=hidden,
        layers=layers,
        intermediate=int(cfg["intermediate_size"]),
        heads=heads,
        kv_heads=int(_get(cfg, "num_key_value_heads", default=heads)),
        head_dim=int(_get(cfg, "head_dim", default=hidden // heads)),
        vocab=int(cfg["vocab_size"]),
        tied=bool(cfg.get("tie_word_embeddings", model_type in ("gemma", "gemma2"))),
        attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
        qk_norm=model_type in QK_NORM_TYPES,
        dtype_bytes=_DTYPE_BYTES.get(dtype, 4),
        num_experts=experts,
        experts_per_tok=int(_get(cfg, "num_experts_per_tok", "experts_per_token", default=0) or 0),
        # gpt-oss and Mixtral give each expert the full intermediate_size
        moe_intermediate=int(_get(cfg, "moe_intermediate_size", "intermediate_size", default=0)) if experts else 0,
        moe_layers=moe_layers,
        sliding_window=int(window) if sliding else None,
        sliding_layers=sliding,
    )



@dataclass
class SourceConfig:
    """A model's config.json dict, where it came from, and its own storage (if quantized)."""

    config: dict
    origin: str  # "folder" | "gguf" | "hub cache" | "hub" | "built-in published values"
    quantization: dict | None = None  # {"bits", "group_size"} of the source's own storage


def read_source_config(source: str) -> SourceConfig:
    """config.json of ``source`` (folder, .gguf, hub id) without reading any weights."""
    path = Path(str(source)).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise UserError(f"{path}: GGUF file not found")
        return _gguf_config(path)
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise UserError(f"{path}: no config.json in this model folder")
        try:
            cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{cfg_file}: not valid JSON ({exc})") from None
        q = cfg.get("quantization") or cfg.get("quantization_config")
        quant = {"bits": int(q["bits"]), "group_size": int(q["group_size"])} if isinstance(q, dict) and "bits" in q else None
        return SourceConfig(cfg, "folder", quant)
    if path.exists() or str(source).startswith((".", "/", "~")) or str(source).count("/") != 1:
        raise UserError(f"{source}: no such model folder or .gguf file (and not a hub repo id owner/name)")
    return _hub_config(str(source))


def _gguf_config(path: Path) -> SourceConfig:
    """The header only: metadata and tensor types (``gguf.read_gguf_header``, no tensor data)."""
    from gguf import GGMLQuantizationType

    from mlx_tune.model.gguf import gguf_config, read_gguf_header, rope_tensors

    try:
        header = read_gguf_header(path)
        cfg, _ = gguf_config(header.metadata, {t.name for t in header.tensors}, path, rope_tensors(path, header))
    except UserError:
        raise
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{path}: not a readable GGUF file ({first})") from None
    types = {t.name: GGMLQuantizationType(t.type).name for t in header.tensors}
    block_type = next((v for k, v in types.items() if ".ffn_down." in k or ".attn_q." in k), None)
    bits = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}.get(block_type or "")
    cfg.setdefault("torch_dtype", "float16")  # GGUF scales and dense tensors are 16-bit
    return SourceConfig(cfg, "gguf", {"bits": bits, "group_size": 32} if bits else None)


def _hub_config(repo_id: str) -> SourceConfig:
    from mlx_tune.model.known_configs import KNOWN_CONFIGS

    try:
        from huggingface_hub import hf_hub_download
    except ImportError:  # pragma: no cover - huggingface-hub is a dependency
        hf_hub_download = None
    if hf_hub_download is not None:
        try:
            return SourceConfig(json.loads(Path(hf_hub_download(repo_id, "config.json", local_files_only=True)).read_text()),
                                "hub cache")
        except Exception:
            pass
    if repo_id in KNOWN_CONFIGS:
        return SourceConfig(dict(KNOWN_CONFIGS[repo_id]), "built-in published values")
    if hf_hub_download is not None and not hub.offline():
        reason = hub.unreachable_reason() or ""  # one quick request instead of huggingface-hub's retries
        if not reason:
            try:
                return SourceConfig(json.loads(Path(hf_hub_download(repo_id, "config.json", etag_timeout=5)).read_text()),
                                    "hub")
            except Exception as exc:
                reason = type(exc).__name__
    else:
        reason = "offline"
    known = ", ".join(sorted(KNOWN_CONFIGS))
    raise UserError(
        f"{repo_id}: cannot read its config.json ({reason}): the hub is not reachable and it is not cached; "
        f"download it once, point model: at a local folder, or use one of the built-in ids: {known}"
    )
