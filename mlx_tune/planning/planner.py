"""The memory planner behind ``mlx-tune plan``: peak training memory from a config alone.

Nothing here loads weights or imports MLX: the model's ``config.json`` values
(``planning.arch``: from a local folder, a GGUF header, the Hugging Face cache or hub,
or ``known_configs``) give every shape, and the peak of one LoRA training step is the sum of

* **base weights** at their storage: affine ``bits`` per weight plus a ``scale`` and a
  ``bias`` per group of ``g`` (``bits + 2 * 16 / g`` bits per weight with 16-bit scales:
  4.5 for 4-bit g64), embeddings and an untied LM head quantized like mlx-lm does
  (every ``Linear`` / ``Embedding`` whose width divides by ``g``); norms, biases dense;
* **adapter state**: LoRA ``A (in x r)`` and ``B (r x out)`` per targeted linear, kept
  fp32 as parameters, gradients and AdamW's two moments, plus the update's new copies;
* **activations** for ``N = batch x seq`` tokens. Per llama-style block the backward
  needs (``a`` bytes per activation element, ``D`` hidden, ``F`` MLP width, ``Hq`` /
  ``Hkv`` query / key-value widths, ``r`` LoRA rank, ``H`` heads)::

      saved(block) = N * [a * (4 D + 2 Hq + 2 Hkv + 4 F) + 4 r * n_lora]   (+ fp32 copies
                     of each LoRA input when a < 4)   +   a * B * H * T^2   (softmax probs)

  (block input, two norm outputs, post-rope q and k, v, attention output, mid residual,
  gate, up, silu(gate), their product, each LoRA ``x A``). Without checkpointing all
  ``L`` blocks' sets live at the start of the backward; with checkpointing only each
  block's input ``N * D * a`` is kept and one block's set is rebuilt at a time. The
  backward of one block adds a working set: the attention scores' gradient chain
  (``2 * a * B * H * T^2``) and the flowing gradients (``N * a * (2 D + 2 F)``). From
  ``attention_shapes.FLASH_MIN_LENGTH`` rows (and with CUDA's cuDNN backward) attention
  keeps no probabilities: ``4 B H T`` log-sum-exps saved, and a working set of a few
  fp32 ``B * H * block * T`` arrays (none with cuDNN);
* **the loss**, as ``mlx_tune.training.losses`` computes it: chunks of ``2**23 / vocab`` tokens
  whose fp32 logits, their ``exp`` and the gradient's matmul input live (about three
  chunks at a time) instead of ``B x T x vocab``. On the CPU backend quantized matmuls run
  as dequantize + fp32 sgemm: a head whose fp32 copy fits 1 GB (``vocab x D``) is
  dequantized once and alive while the loss runs; a bigger one (Llama-3's 128k x 4096)
  is dequantized one vocabulary tile at a time (``loss_shapes``), so only a tile, its
  logits and the running softmax sums (``tokens x D``) live. A block's dense weights live
  in its backward; Metal/CUDA use fused kernels. The loss and the block-by-block backward
  are not alive together: the peak is what lives throughout (weights, adapter state, kept
  activations) plus the larger phase;
* a fixed **runtime** overhead (Python, MLX, tokenizer, data) for the process total.

**Full and partial fine-tuning** (``train.finetune: full``, ``train.trainable``): no adapter;
each trained weight is an fp32 master (in the base weights) with an fp32 gradient, the
optimizer's fp32 states (AdamW: 2) and the update's new copies of both, about 26 bytes per
weight with AdamW (``planning.full``, which also matches the regexes to module paths); a full
fine-tune computes in fp32 (its activations are 4 bytes an element).

**MoE blocks** (qwen3_moe, mixtral, gpt-oss): the MLP is ``E`` experts of width ``Fm`` stored
as (E, out, in) stacks plus a ``D x E`` router, so the weights count all ``E`` experts; with
experts targeted each expert stack holds ``E`` LoRAs (``E * r * (in + out)``); each token runs
through ``k`` experts, so the MLP part of a block's activations is ``k`` expert MLPs
(``4 k Fm`` plus ``2 k D`` for the gathered inputs and the outputs before their weighted
sum) instead of ``4 F``, and the expert matmuls run as ``gather_qmm`` on the packed weights
(no dense copy of the experts on the CPU path).

**Sliding-window layers** (Gemma 2/3, gpt-oss): the attention computes the full causal
``T x T`` scores under a window mask (mlx-lm's masks and ours), so a local layer costs what
a global one does; once ``T`` exceeds the window a note says so.

Constants marked *calibrated* were fitted to measured steps of the real training step
(``trainer.Step`` over ``losses.loss_fn``, measured by ``mlx_tune.planning.probe`` in
``bench/bench_memory.py``).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from mlx_tune.config import PREFERENCE_METHODS
from mlx_tune.model import attention_shapes
from mlx_tune.planning import grpo
from mlx_tune.planning.arch import (
    ALL_LINEAR,
    EXPERT_LINEAR,
    Arch,
    SourceConfig,
    arch_from_config,
    read_source_config,
)
from mlx_tune.planning.full import OPTIMIZER_STATES, head_trained, trained_params
from mlx_tune.training import loss_shapes

GB = 1e9

# Calibrated against measured steps (see bench/bench_memory.py; CPU backend, MLX 0.32).
RUNTIME_OVERHEAD_BYTES = 0.45e9  # Python + MLX + numpy/tokenizer: process RSS not counted by MLX
MLX_FIXED_BYTES = 3e6  # MLX's own small buffers (RoPE tables, masks, scalars)
ACTIVATION_FACTOR = 1.2  # measured / derived per-token elements a block saves
PROBS_SAVED = 1.3  # softmax probabilities saved per block (plus part of the scores)
LOGITS_COPIES = 1.3  # calibrated: chunk-sized fp32 buffers alive per chunk in flight (logits, exp, gradient input)
LOGITS_CHUNKS_ALIVE = 3  # chunks chained with mx.depends: about three in flight
HEAD_DENSE_COPIES = 1.3  # dense fp32 head in the loss (plus part of its unpacking buffers)
TILE_COPIES = 2.5  # vocabulary-tiled loss: the tile's fp32 weight and logits, exp, next tile
ACC_COPIES = 3.0  # vocabulary-tiled loss: the running exp-weighted sum of head rows (tokens x hidden)
BLOCK_DENSE_COPIES = 1.0  # calibrated: a block's dense fp32 weights in its backward (one layer's at a time, in turn)
LORA_STATE_COPIES = 4.0  # params, grads, AdamW m and v (fp32)
LORA_UPDATE_COPIES = 1.0  # the update writes new params and moments, mostly into donated buffers
WORKING_PROBS = 2.0  # gradient of the softmax probabilities and of the scores
FLASH_WORKING_COPIES = 8.0  # measured: fp32 block x T arrays alive in flash's backward (B=1 H=4 T=2048: 36-40 MiB)
WORKING_FLOWS = 4.0  # calibrated: gradients flowing through a block (and their fp32 LoRA copies)
# calibrated: share of a full fine-tune's new weights and moments alive with the old ones (full
# AdamW steps measured / planned: tests/test_memory.py's MEDIUM llama 1.07 (0.97 without
# checkpointing), its embeddings + norms 1.13, its top block 1.03; SmolLM2-135M at 2 x 128 0.90)
TRAINED_UPDATE_COPIES = 0.85


@dataclass
class Settings:
    """What the memory depends on besides the architecture."""

    batch_size: int = 1
    seq_len: int = 512
    grad_checkpoint: bool = True
    bits: int | None = 4  # None: dense base
    group_size: int = 64
    nf4: bool = False
    lora_rank: int = 16
    lora_targets: tuple[str, ...] = ALL_LINEAR
    lora_layers: int | None = None  # None: all blocks
    dora: bool = False
    lora_experts: bool = True  # MoE: the expert stacks are adapted (one LoRA per expert)
    backend: str = "cpu"  # "cpu" dequantizes for matmuls; "metal"/"cuda" use fused kernels
    activation_bytes: int | None = None  # None: the source dtype (fp32 4, fp16/bf16 2)
    finetune: str = "lora"  # "full": no adapter, the base weights train (all, or the trainable ones)
    trainable: tuple[str, ...] = ()  # train.trainable regexes (planning.full)
    optimizer_states: int = 2  # fp32 states per trained weight (AdamW: m and v)


@dataclass
class Plan:
    arch: Arch
    settings: Settings
    parts: dict[str, float]  # component -> bytes
    notes: list[str] = field(default_factory=list)
    origin: str = ""

    @property
    def mlx_peak(self) -> float:
        """What ``mx.get_peak_memory()`` reports for a training step."""
        return sum(v for k, v in self.parts.items() if k != "runtime")

    @property
    def total(self) -> float:
        """Process peak: MLX's buffers plus the runtime overhead."""
        return sum(self.parts.values())

    def as_dict(self) -> dict:
        return {
            "model_type": self.arch.model_type, "params": self.arch.params(), "origin": self.origin,
            "settings": asdict(self.settings) | {"lora_targets": list(self.settings.lora_targets)},
            "parts_gb": {k: round(v / GB, 4) for k, v in self.parts.items()},
            "mlx_peak_gb": round(self.mlx_peak / GB, 4), "total_gb": round(self.total / GB, 4), "notes": self.notes,
        }


def _quantized_bytes(n_out: int, n_in: int, s: Settings, scale_bytes: int, dense_bytes: int) -> float:
    """Storage of an (out, in) weight; widths that do not divide by the group stay dense."""
    if s.bits is None:
        return n_out * n_in * dense_bytes
    if s.nf4:  # 4-bit codes + one fp32 absmax per block
        return n_out * n_in * (0.5 + 4 / s.group_size) if n_in % s.group_size == 0 else n_out * n_in * dense_bytes
    if n_in % s.group_size:
        return n_out * n_in * dense_bytes
    return n_out * n_in * (s.bits / 8 + 2 * scale_bytes / s.group_size)


def _lora_layers(arch: Arch, s: Settings) -> int:
    return arch.layers if s.lora_layers is None else min(s.lora_layers, arch.layers)


def causal_block_fraction(seq_len: int) -> float:
    """(n + 1) / 2n: the share of the T x T scores that ``attention.block_causal_attention``
    (the CPU path) computes and keeps, with its default n = T / block query blocks."""
    block = max(64, -(-seq_len // 8))
    n = -(-seq_len // block)
    return (n + 1) / (2 * n)


def plan(arch: Arch, s: Settings, origin: str = "") -> Plan:
    """Predicted peak memory of one training step (see the module docstring)."""
    from dataclasses import replace

    notes: list[str] = []
    full = s.finetune == "full"
    if full and s.bits is not None:
        notes.append("train.finetune full trains a dense base: planned dense (set quantize: null; a quantized "
                     "source needs train.dequantize: true)")
        s = replace(s, bits=None, nf4=False)
    a = s.activation_bytes or (4 if full and not s.trainable else arch.dtype_bytes)
    dense = arch.dtype_bytes
    n_tok = s.batch_size * s.seq_len
    d, f, hq, hkv = arch.hidden, arch.intermediate, arch.q_width, arch.kv_width
    linears = arch.linears()

    # Base weights: dense blocks, MoE blocks (attention, E experts, router), embeddings.
    def stored(widths) -> float:
        return sum(_quantized_bytes(o, i, s, dense, dense) for i, o in widths)

    norms = 2 * d * dense + (hq + 2 * hkv) * dense * arch.attention_bias + 2 * arch.head_dim * dense * arch.qk_norm
    block = stored(linears.values()) + norms
    experts = arch.expert_linears() if arch.moe_layers else {}
    moe_block = (stored(arch.attention_linears().values()) + norms
                 + arch.num_experts * stored(experts.values()) + stored([(d, arch.num_experts)])) if experts else 0
    embed = _quantized_bytes(arch.vocab, d, s, dense, dense)
    head = 0 if arch.tied else _quantized_bytes(arch.vocab, d, s, dense, dense)
    weights = arch.dense_layers * block + arch.moe_layers * moe_block + embed + head + d * dense

    # LoRA state: A (in x r) + B (r x out) per targeted linear, fp32; an expert stack holds E of them.
    targets = [n for n in linears if n in s.lora_targets]
    known = set(linears) | {"experts", "switch_mlp"}
    unknown = sorted(set(s.lora_targets) - known)
    if unknown:
        notes.append(f"lora targets {', '.join(unknown)} are not linear layers of this architecture; ignored")
    moe_targets = [n for n in targets if n in arch.attention_linears()]
    expert_targets = [n for n in EXPERT_LINEAR if s.lora_experts and experts and (
        n in s.lora_targets or {"experts", "switch_mlp"} & set(s.lora_targets))]

    if full:  # no adapter: the trained base weights are counted below
        targets, moe_targets, expert_targets = [], [], []

    def lora_size(widths: dict, names) -> int:
        return sum(s.lora_rank * (widths[n][0] + widths[n][1]) + (widths[n][1] if s.dora else 0) for n in names)

    per_block_lora = lora_size(linears, targets)
    per_moe_lora = lora_size(linears, moe_targets) + arch.num_experts * lora_size(experts, expert_targets)
    adapted = _lora_layers(arch, s)
    moe_adapted = min(adapted, arch.moe_layers)  # MoE blocks are spread through the stack: count them first
    lora_params = (adapted - moe_adapted) * per_block_lora + moe_adapted * per_moe_lora
    lora_state = lora_params * 4 * LORA_STATE_COPIES
    lora_update = lora_params * 4 * LORA_UPDATE_COPIES
    n_trained = trained_params(arch, s.finetune, s.trainable) if full or s.trainable else 0
    weights += n_trained * max(0, 4 - dense)  # fp32 masters in place of the stored copies
    trained_state = n_trained * 4 * (1 + s.optimizer_states)
    # The update writes new weights and moments while the old ones are alive (most of them).
    lora_update += n_trained * 4 * (1 + s.optimizer_states) * TRAINED_UPDATE_COPIES
    if n_trained:
        notes.append(f"{n_trained / 1e6:,.1f} M base weights trained ({100 * n_trained / max(arch.params(), 1):.1f}%): "
                     f"fp32 masters, gradients and {s.optimizer_states} optimizer state(s) each")
    expert_state = moe_adapted * arch.num_experts * lora_size(experts, expert_targets) * 4 * LORA_STATE_COPIES
    if expert_state > 0.5 * lora_state > 0:
        notes.append(f"per-expert LoRA holds {expert_state / GB:.2f} GB of the adapter state; "
                     "lora.include_experts: false (or a smaller rank) leaves the experts frozen")
    if experts:
        notes.append(f"MoE: {arch.moe_layers} blocks of {arch.num_experts} experts (width {arch.moe_intermediate}), "
                     f"{arch.experts_per_tok} per token; experts "
                     + (f"adapted, one LoRA per expert ({', '.join(expert_targets)})" if expert_targets else "not adapted"))

    # Activations of one block for n_tok tokens (see the docstring).
    def block_tokens(mlp_elems: float, lora_names, lora_inputs: int) -> float:
        per_token = a * (4 * d + 2 * hq + 2 * hkv + mlp_elems) + 4 * s.lora_rank * lora_names
        if a < 4 and lora_names:  # LoRA's fp32 A promotes its input: one fp32 copy per adapted linear
            per_token += 4 * lora_inputs
        return ACTIVATION_FACTOR * n_tok * per_token

    k = arch.experts_per_tok
    dense_saved = block_tokens(4 * f, len(targets), sum(linears[n][0] for n in targets))
    moe_saved = block_tokens(4 * k * arch.moe_intermediate + 2 * k * d + 2 * arch.num_experts,
                             len(moe_targets) + k * len(expert_targets),
                             sum(linears[n][0] for n in moe_targets) + k * sum(experts[n][0] for n in expert_targets)
                             ) if experts else 0.0
    probs = a * s.batch_size * arch.heads * s.seq_len**2
    if s.backend == "cpu":  # block-causal attention computes only the blocks on or below the diagonal
        probs *= causal_block_fraction(s.seq_len)
    attn_working = WORKING_PROBS * probs
    cudnn = s.backend == "cuda" and attention_shapes.cudnn_backward(a, arch.head_dim, arch.head_dim, s.seq_len)
    if cudnn or attention_shapes.flash_applies(s.seq_len, arch.model_type in attention_shapes.SCORE_BIAS_MODELS):
        # flash / cuDNN attention: the row log-sum-exps saved; flash's backward scores a block at a time
        probs = 4.0 * s.batch_size * arch.heads * s.seq_len
        rows = 0 if cudnn else min(attention_shapes.FLASH_BLOCK, s.seq_len)
        attn_working = FLASH_WORKING_COPIES * 4 * s.batch_size * arch.heads * rows * s.seq_len
        notes.append("attention " + ("by cuDNN" if cudnn else f"recomputed {rows} query rows at a time")
                     + " in the backward: no T x T probabilities kept")
    if arch.sliding_layers and s.seq_len > (arch.sliding_window or 0):
        notes.append(f"{arch.sliding_layers} of {arch.layers} layers attend within a {arch.sliding_window}-token "
                     "window; their scores are still computed over the whole causal row (masked), so they cost "
                     "what global layers do")
    mlp_width = max(f if arch.dense_layers else 0, k * arch.moe_intermediate if experts else 0)
    saved_block = max(dense_saved if arch.dense_layers else 0.0, moe_saved) + PROBS_SAVED * probs
    # The backward stops at the lowest adapted block (LoRA on the top k: MLX keeps nothing for
    # the frozen blocks below); a full or partial fine-tune reaches them all.
    reach = arch.layers if (full or s.trainable) else adapted
    saved_all = ((reach - min(reach, arch.moe_layers)) * dense_saved + min(reach, arch.moe_layers) * moe_saved
                 + reach * PROBS_SAVED * probs)
    working = attn_working + WORKING_FLOWS * n_tok * a * (2 * d + 2 * mlp_width)
    if s.grad_checkpoint:
        kept, kept_label = reach * n_tok * d * a, f"kept block inputs ({reach} x tokens x hidden)"
        block_phase = saved_block + working
    else:
        kept, kept_label = saved_all, f"saved activations ({reach} blocks)"
        block_phase = working

    # Loss phase, as ``losses`` runs it: on the CPU path a quantized head whose fp32 copy
    # fits DENSE_HEAD_BYTES is dequantized once and the logits go chunk by chunk; a bigger
    # one is dequantized a vocabulary tile at a time (online softmax over the tiles).
    on_cpu_path = (s.backend == "cpu" or s.nf4) and s.bits is not None
    head_w = arch.vocab * d * 4
    # Each block's dense weights are rebuilt by its recomputed forward and again by its
    # backward (both live for a while).
    # (MoE blocks: the experts run as gather_qmm on packed weights, only attention is dense.)
    widest = arch.block_params() if arch.dense_layers else sum(i * o for i, o in arch.attention_linears().values())
    block_dense = BLOCK_DENSE_COPIES * widest * 4 if on_cpu_path else 0
    block_phase += block_dense
    hidden_copies = 2 * n_tok * d * 4  # fp32 hidden states in and their gradient out
    if on_cpu_path and loss_shapes.head_is_tiled(arch.vocab, d):
        tokens = min(n_tok, loss_shapes.TILED_TOKENS)
        tile = loss_shapes.tile_rows_for(arch.vocab, d, n_tok)
        loss_parts = {
            f"loss phase: head tiles ({tile} of {arch.vocab} rows dequantized at a time) and their logits":
                TILE_COPIES * tile * (d + tokens) * 4,
            "loss phase: hidden states, running softmax sums and gradient": hidden_copies + ACC_COPIES * tokens * d * 4,
        }
        notes.append(f"CPU backend: the {arch.vocab} x {d} head is too big to keep as fp32 "
                     f"({head_w / GB:.2f} GB); the loss dequantizes {tile} rows at a time")
    else:
        chunk = min(loss_shapes.chunk_size_for(arch.vocab), n_tok)
        alive = min(-(-n_tok // chunk), LOGITS_CHUNKS_ALIVE)
        loss_parts = {f"loss phase: logits ({alive} chunks of {chunk} tokens x vocab {arch.vocab}, fp32)":
                      LOGITS_COPIES * alive * chunk * arch.vocab * 4 + hidden_copies}
        if on_cpu_path:
            loss_parts["loss phase: dense dequantized head (CPU path)"] = HEAD_DENSE_COPIES * head_w
            notes.append("CPU backend: quantized matmuls run as dequantize + fp32 sgemm (the head's dense "
                         f"weight, {arch.vocab} x {d} fp32, is alive while the loss runs)")
    if (full or s.trainable) and head_trained(arch, s.finetune, s.trainable):  # calibrated: chunk sums in flight
        loss_parts["loss phase: trained head's fp32 gradient (chunk sums)"] = 2 * head_w
    loss_phase = sum(loss_parts.values())

    parts = {"base weights": weights}
    if not full:
        parts["LoRA params + grads + AdamW"] = lora_state
    if n_trained:
        parts[f"trained weights: fp32 grads + {s.optimizer_states} optimizer state(s)"] = trained_state
    parts[kept_label] = kept
    # The loss (first in the backward) and the block-by-block backward are not alive together;
    # the peak is whichever phase is larger, on top of what lives throughout.
    if loss_phase >= block_phase:
        parts.update(loss_parts)
        notes.append(f"peak in the loss; the block backward needs {block_phase / GB:.3f} GB at its peak")
    else:
        if s.grad_checkpoint:
            parts["block backward: 1 recomputed block"] = saved_block
        parts["block backward: working set"] = working
        if block_dense:
            parts["block backward: dense dequantized block (CPU path)"] = block_dense
        notes.append(f"peak in the block backward; the loss needs {loss_phase / GB:.3f} GB at its peak")
    parts["AdamW update (new params and moments)"] = lora_update
    parts["MLX fixed buffers"] = MLX_FIXED_BYTES
    parts["runtime"] = RUNTIME_OVERHEAD_BYTES
    if probs > 4 * GB:
        notes.append("attention probabilities dominate at this length (batch x heads x T^2)")
    return Plan(arch, s, parts, notes, origin)


def fits(arch: Arch, s: Settings, budget_bytes: float) -> dict:
    """The largest batch size at ``s.seq_len`` and the largest sequence length at ``s.batch_size``."""
    from dataclasses import replace

    def total(**kw) -> float:
        return plan(arch, replace(s, **kw)).total

    best_batch = 0
    b = 1
    while b <= 4096 and total(batch_size=b) <= budget_bytes:
        best_batch, b = b, b * 2
    lo, hi = best_batch, min(b, 4097)
    while hi - lo > 1:  # largest b in (lo, hi) that fits
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if total(batch_size=mid) <= budget_bytes else (lo, mid)
    best_batch = lo
    best_seq = 0
    lo, hi = 0, 1 << 20
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if total(seq_len=mid) <= budget_bytes else (lo, mid)
    best_seq = lo - lo % 64 if lo >= 64 else lo
    return {"max_batch_size": best_batch, "max_seq_len": best_seq}


def system_memory_bytes() -> float | None:
    """Physical (unified) memory of this machine."""
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def default_budget_bytes() -> float:
    total = system_memory_bytes()
    return 0.75 * total if total else 16 * GB


def settings_from_config(cfg, source: SourceConfig, backend: str | None = None) -> Settings:
    """``Settings`` from a validated ``mlx_tune.config.Config``."""
    q = cfg.quantize
    if cfg.train.dequantize and q is None:
        bits, group, nf4 = None, 64, False
    elif q is not None:
        bits, group, nf4 = q.bits, q.group_size, q.mode == "nf4"
    elif source.quantization:
        bits, group, nf4 = source.quantization["bits"], source.quantization["group_size"], False
    else:
        bits, group, nf4 = None, 64, False
    lora = cfg.lora
    targets = ALL_LINEAR if lora.target_modules == "all-linear" else (
        tuple(lora.target_modules) if isinstance(lora.target_modules, list) else (lora.target_modules,))
    # A preference unit is two sequences (chosen and rejected, or a KTO row and its
    # mismatched one) of up to max_seq_length each; the reference forward stores nothing.
    rows = cfg.train.batch_size * (2 if cfg.train.method in PREFERENCE_METHODS else 1)
    seq_len = cfg.train.max_seq_length
    if cfg.train.method == "grpo" and grpo.slices(cfg) == 1:
        # whole groups: a row per prompt, its completions after one copy of it (shared_rows)
        rows = cfg.train.batch_size
        seq_len = cfg.train.max_seq_length + cfg.grpo.num_generations * cfg.grpo.max_completion_length
    elif cfg.train.method == "grpo":  # shuffled slices: planned as a row per completion, prompt + completion
        rows = -(-cfg.train.batch_size * cfg.grpo.num_generations // grpo.slices(cfg))
        seq_len = cfg.train.max_seq_length + cfg.grpo.max_completion_length
    return Settings(
        batch_size=rows,
        seq_len=seq_len,
        grad_checkpoint=cfg.train.grad_checkpoint,
        bits=bits,
        group_size=group,
        nf4=nf4,
        lora_rank=lora.rank,
        lora_targets=targets,
        lora_layers=None if lora.layers == "all" else int(lora.layers),
        dora=lora.use_dora,
        lora_experts=lora.include_experts or lora.target_modules != "all-linear",
        backend=backend or current_backend(),
        finetune=cfg.train.finetune,
        trainable=tuple(cfg.train.trainable),
        optimizer_states=OPTIMIZER_STATES.get(cfg.train.optimizer, 2),
    )


def current_backend() -> str:
    """The backend planned for by default: the one ``runtime.backend`` decides."""
    from mlx_tune.runtime.backend import planning_backend

    return planning_backend()


def plan_config(cfg, backend: str | None = None) -> Plan:
    """Plan a validated ``Config`` (reads only the model's config, never its weights)."""
    source = read_source_config(cfg.model)
    arch = arch_from_config(source.config, str(cfg.model))
    p = plan(arch, settings_from_config(cfg, source, backend), origin=source.origin)
    if cfg.train.method in PREFERENCE_METHODS:
        p.notes.append(f"train.method {cfg.train.method}: the batch is {cfg.train.batch_size} units of two sequences "
                       f"(planned as {p.settings.batch_size} rows); the reference pass stores no activations")
    if cfg.train.method == "grpo":
        grpo.add_rollout_parts(p, cfg, arch)
    return p


def format_plan(p: Plan, budget_bytes: float | None = None, fit: dict | None = None) -> str:
    """The breakdown table printed by ``mlx-tune plan``."""
    a, s = p.arch, p.settings
    quant = "dense" if s.bits is None else ("nf4" if s.nf4 else f"{s.bits}-bit") + f" g{s.group_size}"
    lines = [
        f"model     {a.model_type}, {a.params() / 1e9:.2f} B params"
        + (f" ({a.active_params() / 1e9:.2f} B active)" if a.moe_layers else "")
        + f", {a.layers} layers, hidden {a.hidden}, "
        f"vocab {a.vocab}{' (tied)' if a.tied else ''}  [config: {p.origin}]",
        f"settings  batch {s.batch_size} x {s.seq_len} tokens, base {quant}, "
        + (("full fine-tune" + (f" of {', '.join(s.trainable)}" if s.trainable else " (every weight)"))
           if s.finetune == "full" else f"LoRA r={s.lora_rank} on {len([t for t in s.lora_targets if t in a.linears()])}"
           f" linears/block" + (f" + {', '.join(s.trainable)}" if s.trainable else ""))
        + ", grad checkpoint "
        f"{'on' if s.grad_checkpoint else 'off'}, backend {s.backend}",
        "",
    ]
    width = max(len(k) for k in p.parts) + 2
    for name, value in p.parts.items():
        lines.append(f"  {name:<{width}} {value / GB:9.3f} GB")
    lines.append(f"  {'-' * width} {'-' * 12}")
    lines.append(f"  {'MLX peak (mx.get_peak_memory)':<{width}} {p.mlx_peak / GB:9.3f} GB")
    lines.append(f"  {'total (process peak)':<{width}} {p.total / GB:9.3f} GB")
    if budget_bytes:
        verdict = "fits" if p.total <= budget_bytes else "DOES NOT FIT"
        lines += ["", f"budget    {budget_bytes / GB:.1f} GB: {verdict}"]
        if fit:
            lines.append(f"largest   batch {fit['max_batch_size']} at {s.seq_len} tokens; "
                         f"sequence {fit['max_seq_len']} tokens at batch {s.batch_size}")
    lines += [f"note      {n}" for n in p.notes]
    return "\n".join(lines)
