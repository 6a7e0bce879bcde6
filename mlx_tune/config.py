"""Typed configuration: the single source of truth for YAML keys, defaults and overrides.

Each concern has one dataclass. ``load_config(path, overrides)`` reads YAML, applies
dotted ``KEY=VALUE`` overrides, checks every key and value against the dataclasses'
type hints and ``check()`` methods, and raises one ``ConfigError`` listing every
problem (unknown keys get the nearest valid key as a hint) before any model loads.
The README's config reference is generated from these classes (``config_reference``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mlx_tune.errors import ConfigError
from mlx_tune.typed_config import apply_overrides, build, parse_override, reference_table

__all__ = ["apply_overrides", "parse_override"]  # re-exported: the override syntax belongs to the config

# ---------------------------------------------------------------------------
# Concerns
# ---------------------------------------------------------------------------


@dataclass
class QuantizeConfig:
    """How the frozen base is stored: 4-bit (or 2..8-bit) affine, or NF4."""

    bits: int = field(default=4, metadata={"doc": "bits per weight (affine: 2, 3, 4, 5, 6, 8; nf4: 4)"})
    group_size: int = field(default=64, metadata={"doc": "weights per scale (affine: 32, 64, 128; nf4 block: 64)"})
    mode: Literal["affine", "nf4"] = field(default="affine", metadata={"doc": "affine (MLX) or nf4 (QLoRA NormalFloat)"})
    double_quant: bool = field(default=False, metadata={"doc": "nf4 only: quantize the absmax values to 8 bits"})

    def check(self) -> list[str]:
        errs = []
        if self.mode == "affine":
            if self.bits not in (2, 3, 4, 5, 6, 8):
                errs.append(f"quantize.bits: {self.bits} is not supported; use 2, 3, 4, 5, 6 or 8")
            if self.group_size not in (32, 64, 128):
                errs.append(f"quantize.group_size: {self.group_size} is not supported by MLX; use 32, 64 or 128")
        else:
            if self.bits != 4:
                errs.append(f"quantize.bits: nf4 is 4-bit only, got {self.bits}")
            if self.group_size not in (32, 64, 128, 256):
                errs.append(f"quantize.group_size: nf4 block size {self.group_size} is not supported; use 64")
        if self.double_quant and self.mode != "nf4":
            errs.append("quantize.double_quant: only applies to mode: nf4")
        return errs


def lora_hyperparameter_problems(rank: Any, alpha: Any, dropout: Any, *,
                                 names: tuple[str, str, str] = ("rank", "alpha", "dropout"), sep: str = " ") -> list[str]:
    """What is wrong with a LoRA rank / alpha / dropout (empty: nothing), one message each.

    The one rule for every place that takes these values (this config, the layers, adapter
    files, PEFT folders): rank a positive integer, alpha a finite number > 0, dropout in
    [0, 1). ``names`` are the three keys as the caller's source spells them (``lora.rank``,
    PEFT's ``r``, ...), ``sep`` goes between a key and its value: ``rank 0 must be ...``.
    """
    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    rank_name, alpha_name, dropout_name = names
    problems = []
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        problems.append(f"{rank_name}{sep}{rank!r} must be a positive integer (8, 16, 32 are common)")
    if not number(alpha) or not alpha > 0 or math.isinf(alpha):
        problems.append(f"{alpha_name}{sep}{alpha!r} must be a finite number > 0 (often 2 x rank)")
    if not number(dropout) or not 0.0 <= dropout < 1.0:
        problems.append(f"{dropout_name}{sep}{dropout!r} must be in [0, 1)")
    return problems


@dataclass
class LoraConfig:
    """The trainable low-rank adapter: y = W0 x + s * B A x, s = alpha / rank."""

    rank: int = field(default=16, metadata={"doc": "rank r of A (r x in) and B (out x r)"})
    alpha: float = field(default=32.0, metadata={"doc": "scale numerator: s = alpha / r (alpha / sqrt(r) with use_rslora)"})
    dropout: float = field(default=0.0, metadata={"doc": "dropout on the adapter's input, in [0, 1)"})
    target_modules: str | list[str] = field(
        default="all-linear",
        metadata={"doc": "module names (q_proj, v_proj, ...), 'all-linear', or a regex string starting with 're:'"},
    )
    layers: int | Literal["all"] = field(default="all", metadata={"doc": "'all' or the number of top blocks to adapt"})
    use_rslora: bool = field(default=False, metadata={"doc": "rank-stabilised scale alpha / sqrt(r)"})
    use_dora: bool = field(default=False, metadata={"doc": "DoRA: learn a magnitude vector over the weight-normalised direction"})
    include_lm_head: bool = field(default=False, metadata={"doc": "with all-linear, also adapt the LM head"})
    include_experts: bool = field(
        default=True, metadata={"doc": "with all-linear, also adapt MoE expert layers (one LoRA per expert); routers stay frozen"}
    )

    def check(self) -> list[str]:
        errs = lora_hyperparameter_problems(self.rank, self.alpha, self.dropout,
                                            names=("lora.rank", "lora.alpha", "lora.dropout"), sep=": ")
        if isinstance(self.layers, int) and self.layers <= 0:
            errs.append(f"lora.layers: {self.layers} must be 'all' or a positive count of top blocks")
        if isinstance(self.target_modules, list) and not self.target_modules:
            errs.append("lora.target_modules: the list is empty; name modules or use 'all-linear'")
        return errs


@dataclass
class MaskConfig:
    """Which chat tokens are trained beyond ``mask_prompt`` (``data.masks`` applies it)."""

    reasoning: Literal["keep", "drop_previous", "mask"] | None = field(default=None, metadata={"doc": (
        "think blocks: keep (trained), drop_previous (removed from earlier assistant turns, as Qwen3's template "
        "does), mask (kept, not trained); null: as the model's template does")})
    tool_results: Literal["mask"] = field(default="mask", metadata={"doc": "tool messages are never trained"})
    tool_calls: Literal["train", "mask"] = field(default="train", metadata={"doc": "the assistant's tool-call JSON"})


@dataclass
class TrainConfig:
    """The training loop, its data handling, checkpoints and memory limits."""

    iters: int | None = field(default=None, metadata={"doc": "optimizer steps (or give epochs)"})
    epochs: float | None = field(default=None, metadata={"doc": "passes over the training set (or give iters)"})
    batch_size: int = field(default=4, metadata={"doc": "rows per step"})
    max_seq_length: int = field(default=512, metadata={"doc": "tokens per row; longer examples are truncated (or dropped)"})
    learning_rate: float = field(default=1e-4, metadata={"doc": "peak learning rate"})
    seed: int = field(default=0, metadata={"doc": "seed for data order, dropout and adapter init"})
    resume: bool = field(default=False, metadata={"doc": "continue from the newest complete checkpoint"})
    optimizer: Literal["adamw", "adam", "sgd", "adafactor"] = field(default="adamw", metadata={"doc": "optimizer"})
    weight_decay: float = field(default=0.0, metadata={"doc": "AdamW weight decay"})
    lr_schedule: Literal["constant", "linear", "cosine"] = field(default="cosine", metadata={"doc": "decay after warmup"})
    warmup_steps: int = field(default=0, metadata={"doc": "linear warmup steps"})
    grad_accumulation: int = field(default=1, metadata={"doc": "micro-batches per optimizer step"})
    grad_clip: float | None = field(default=1.0, metadata={"doc": "clip gradients to this global norm (null: off)"})
    grad_checkpoint: bool = field(default=False, metadata={"doc": "recompute each block's activations in the backward pass"})
    packing: bool = field(default=True, metadata={"doc": "pack examples into full rows with a block-diagonal mask"})
    mask_prompt: bool = field(default=True, metadata={"doc": "train on completions / assistant turns only"})
    truncation: Literal["truncate", "drop"] = field(default="truncate", metadata={"doc": "what to do with over-long examples"})
    steps_per_report: int = field(default=10, metadata={"doc": "steps between metrics rows"})
    steps_per_eval: int = field(default=50, metadata={"doc": "steps between validation losses"})
    val_batches: int = field(default=25, metadata={"doc": "validation batches per evaluation (0: whole set)"})
    save_every: int = field(default=100, metadata={"doc": "steps between checkpoints"})
    keep_checkpoints: int = field(default=3, metadata={"doc": "checkpoints kept (oldest deleted)"})
    max_bad_steps: int = field(default=5, metadata={"doc": "stop after this many non-finite steps in a row"})
    memory_limit_gb: float | None = field(default=None, metadata={"doc": "MLX memory limit; fail clearly instead of swapping"})
    test: bool = field(default=False, metadata={"doc": "report test-set loss and perplexity at the end"})
    best_metric: Literal["val_loss", "eval_accuracy"] | None = field(
        default=None, metadata={"doc": "what 'best' means; null: eval_accuracy with eval.prompts, else val_loss"})
    keep_best: bool = field(default=True, metadata={"doc": "output_dir's adapter is the best evaluated one"})
    early_stopping_patience: int | None = field(
        default=None, metadata={"doc": "stop after this many evaluations without improvement (null: off)"})
    early_stopping_min_delta: float = field(default=0.0, metadata={"doc": "smallest change that counts as improvement"})
    mask: MaskConfig = field(default_factory=MaskConfig, metadata={"doc": "chat mask policies"})
    method: Literal["sft", "dpo", "orpo", "simpo", "cpo", "kto", "grpo"] = field(
        default="sft", metadata={"doc": "objective: sft, preference pairs (dpo, orpo, simpo, cpo), kto, or grpo"})
    finetune: Literal["lora", "full"] = field(
        default="lora", metadata={"doc": "lora (an adapter) or full (every weight of a dense base)"})
    trainable: list[str] = field(default_factory=list, metadata={
        "doc": "regexes of module paths to train besides (lora) or instead of all (full) weights"})
    dequantize: bool = field(default=False, metadata={
        "doc": "load a quantized source as dense weights (full fine-tuning of a quantized model; with quantize: null)"})

    def check(self) -> list[str]:
        errs = []
        for pattern in self.trainable:
            try:
                re.compile(pattern)
            except re.error as exc:
                errs.append(f"train.trainable: {pattern!r} is not a regular expression ({exc})")
        if self.early_stopping_patience is not None and self.early_stopping_patience <= 0:
            errs.append(f"train.early_stopping_patience: {self.early_stopping_patience} must be > 0 or null")
        if self.early_stopping_min_delta < 0:
            errs.append(f"train.early_stopping_min_delta: {self.early_stopping_min_delta} must be >= 0")
        if self.iters is None and self.epochs is None:
            errs.append("train.iters / train.epochs: give one of them (for example train.iters: 200)")
        if self.iters is not None and self.iters <= 0:
            errs.append(f"train.iters: {self.iters} must be > 0")
        if self.epochs is not None and self.epochs <= 0:
            errs.append(f"train.epochs: {self.epochs} must be > 0")
        for name in ("batch_size", "max_seq_length", "grad_accumulation", "steps_per_report",
                     "steps_per_eval", "save_every", "keep_checkpoints", "max_bad_steps"):
            if getattr(self, name) <= 0:
                errs.append(f"train.{name}: {getattr(self, name)} must be > 0")
        for name in ("warmup_steps", "val_batches", "weight_decay"):
            if getattr(self, name) < 0:
                errs.append(f"train.{name}: {getattr(self, name)} must be >= 0")
        if self.learning_rate <= 0:
            errs.append(f"train.learning_rate: {self.learning_rate} must be > 0 (1e-4 is a common start)")
        if self.grad_clip is not None and self.grad_clip <= 0:
            errs.append(f"train.grad_clip: {self.grad_clip} must be > 0 or null")
        if self.memory_limit_gb is not None and self.memory_limit_gb <= 0:
            errs.append(f"train.memory_limit_gb: {self.memory_limit_gb} must be > 0 or null")
        return errs


@dataclass
class ServeConfig:
    """The OpenAI-compatible server."""

    host: str = field(default="127.0.0.1", metadata={"doc": "bind address (non-local needs an api_key, or warns)"})
    port: int = field(default=8080, metadata={"doc": "TCP port"})
    api_key: str | None = field(default=None, metadata={"doc": "require 'Authorization: Bearer KEY'"})
    adapters: dict[str, str] = field(default_factory=dict, metadata={"doc": "NAME: PATH adapters served beside the base"})
    adapters_root: str | None = field(default=None, metadata={"doc": "folder POST /v1/adapters may load from"})
    adapter_name: str = field(default="adapter", metadata={"doc": "model name of output_dir's adapter when served"})
    max_loras: int = field(default=8, metadata={"doc": "adapters resident at once (LRU eviction)"})
    max_lora_rank: int = field(default=256, metadata={"doc": "refuse adapters of a larger rank"})
    max_queue: int = field(default=64, metadata={"doc": "queued requests before 429"})
    max_batch: int = field(default=16, metadata={"doc": "requests decoded together"})
    max_body_bytes: int = field(default=4_000_000, metadata={"doc": "request body limit (413 above)"})
    prompt_cache_bytes: int = field(default=512 * 2**20, metadata={
        "doc": "prompt prefix cache across requests, per adapter (0: off)"})
    cors_origins: list[str] = field(default_factory=list, metadata={"doc": "allowed CORS origins (off when empty)"})
    runs_dir: str | None = field(default=None, metadata={
        "doc": "training runs the studio lists at /studio#runs (default: output_dir's parent)"})

    def check(self) -> list[str]:
        errs = []
        if not 0 <= self.port <= 65535:
            errs.append(f"serve.port: {self.port} must be in 0..65535")
        if self.prompt_cache_bytes < 0:
            errs.append(f"serve.prompt_cache_bytes: {self.prompt_cache_bytes} must be >= 0 (0 turns the cache off)")
        for name in ("max_loras", "max_lora_rank", "max_queue", "max_batch", "max_body_bytes"):
            if getattr(self, name) <= 0:
                errs.append(f"serve.{name}: {getattr(self, name)} must be > 0")
        return errs


@dataclass
class FuseConfig:
    """How `mlx-tune fuse` writes the merged model."""

    format: Literal["mlx", "hf", "gguf"] = field(default="mlx", metadata={"doc": "output format"})
    dequantize: bool = field(default=False, metadata={"doc": "write dense weights instead of re-quantizing"})
    dtype: Literal["float16", "bfloat16", "float32"] = field(default="float16", metadata={"doc": "dense dtype"})
    gguf_type: Literal["f16", "q8_0", "q4_0"] = field(default="q8_0", metadata={"doc": "GGUF tensor type"})
    min_top1_agreement: float = field(default=0.9, metadata={"doc": "fidelity threshold vs base + adapter"})
    keep_adapted: Literal["auto", "8bit", "dense", "off"] = field(
        default="auto", metadata={"doc": "when re-quantizing erases the adapter: keep adapted layers at 8 bits or dense"}
    )
    force: bool = field(default=False, metadata={"doc": "overwrite an existing fused_dir"})

    def check(self) -> list[str]:
        if not 0.0 <= self.min_top1_agreement <= 1.0:
            return [f"fuse.min_top1_agreement: {self.min_top1_agreement} must be in [0, 1]"]
        return []


DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
PREFERENCE_METHODS = ("dpo", "orpo", "simpo", "cpo", "kto")  # the train.method values that read pairs / KTO rows


@dataclass
class PreferenceConfig:
    """Preference tuning (train.method dpo, orpo, simpo, cpo, kto), with TRL's names and defaults."""

    beta: float = field(default=0.1, metadata={"doc": "temperature of the implicit reward (ORPO: the odds-ratio weight)"})
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = field(
        default="sigmoid", metadata={"doc": "dpo: sigmoid (DPO), ipo, hinge or robust"})
    label_smoothing: float = field(default=0.0, metadata={"doc": "dpo / cpo: assumed fraction of flipped labels"})
    gamma: float = field(default=0.5, metadata={"doc": "simpo: target reward margin (TRL's simpo_gamma)"})
    simpo_gamma: float | None = field(default=None, metadata={"doc": "TRL's name for gamma (overrides it when set)"})
    cpo_alpha: float | None = field(default=None, metadata={
        "doc": "weight of the chosen NLL term (null: 1.0 for cpo, 0.0 for simpo)"})
    desirable_weight: float = field(default=1.0, metadata={"doc": "kto: weight of desirable rows"})
    undesirable_weight: float = field(default=1.0, metadata={"doc": "kto: weight of undesirable rows"})
    reference: str | None = field(default=None, metadata={
        "doc": "reference model: null = the base (adapter disabled), or an ADAPTER_DIR that stays frozen"})
    precompute_reference: bool = field(default=False, metadata={
        "doc": "compute reference log-probs once per dataset (cached beside the token cache)"})

    @property
    def simpo_margin(self) -> float:
        return self.gamma if self.simpo_gamma is None else self.simpo_gamma

    def check(self) -> list[str]:
        errs = []
        if self.beta <= 0:
            errs.append(f"preference.beta: {self.beta} must be > 0 (TRL's default is 0.1)")
        if not 0.0 <= self.label_smoothing < 0.5:
            errs.append(f"preference.label_smoothing: {self.label_smoothing} must be in [0, 0.5)")
        for name in ("desirable_weight", "undesirable_weight"):
            if getattr(self, name) <= 0:
                errs.append(f"preference.{name}: {getattr(self, name)} must be > 0")
        if self.cpo_alpha is not None and self.cpo_alpha < 0:
            errs.append(f"preference.cpo_alpha: {self.cpo_alpha} must be >= 0")
        if self.reference is not None and not (Path(self.reference).expanduser() / "adapters.safetensors").is_file():
            errs.append(f"preference.reference: {self.reference} has no adapters.safetensors (an adapter folder)")
        return errs


@dataclass
class GrpoConfig:
    """Online RL from rewards (train.method grpo), with TRL's names and defaults."""

    reward_functions: list[str] = field(default_factory=list, metadata={
        "doc": "FILE.py:FUNC or builtin:NAME, each f(prompts, completions, **columns) -> list[float]"})
    reward_weights: list[float] | None = field(default=None, metadata={"doc": "one weight per function (null: all 1)"})
    num_generations: int = field(default=8, metadata={
        "doc": "completions sampled per prompt (the group); a generation batch is train.batch_size prompts x this"})
    max_completion_length: int = field(default=512, metadata={"doc": "tokens per completion (at most)"})
    temperature: float = field(default=1.0, metadata={"doc": "sampling temperature"})
    top_p: float = field(default=1.0, metadata={"doc": "nucleus sampling"})
    beta: float = field(default=0.0, metadata={"doc": "KL weight to the reference (adapter disabled); 0: no KL"})
    epsilon: float = field(default=0.2, metadata={"doc": "lower clip of the policy ratio"})
    epsilon_high: float | None = field(default=None, metadata={"doc": "upper clip (null: epsilon)"})
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = field(default="dapo", metadata={"doc": "loss normalisation"})
    scale_rewards: Literal["group", "batch", "none"] = field(default="group", metadata={
        "doc": "divide advantages by the reward std of the group, the batch, or not at all"})
    mask_truncated_completions: bool = field(default=False, metadata={"doc": "no loss on completions cut at max length"})
    steps_per_generation: int | None = field(default=None, metadata={
        "doc": "micro-batches one generation batch is split into (TRL's meaning); more than "
               "train.grad_accumulation reuses it for several optimizer steps (null: train.grad_accumulation)"})

    def check(self) -> list[str]:
        errs = []
        if self.num_generations < 2:
            errs.append(f"grpo.num_generations: {self.num_generations} must be >= 2 (advantages compare a group)")
        for name in ("max_completion_length", "temperature", "epsilon"):
            if getattr(self, name) <= 0:
                errs.append(f"grpo.{name}: {getattr(self, name)} must be > 0")
        if not 0 < self.top_p <= 1:
            errs.append(f"grpo.top_p: {self.top_p} must be in (0, 1]")
        if self.beta < 0:
            errs.append(f"grpo.beta: {self.beta} must be >= 0")
        if self.steps_per_generation is not None and self.steps_per_generation <= 0:
            errs.append(f"grpo.steps_per_generation: {self.steps_per_generation} must be > 0 or null")
        for spec in self.reward_functions:
            if not spec.startswith("builtin:") and (":" not in spec or not spec.rsplit(":", 1)[0].endswith(".py")):
                errs.append(f"grpo.reward_functions: {spec!r} must be FILE.py:FUNCTION or builtin:NAME")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_functions):
            errs.append(f"grpo.reward_weights: {len(self.reward_weights)} weights for "
                        f"{len(self.reward_functions)} reward functions; give one per function")
        return errs


CHAT_TEMPLATE_NAMES = ("chatml", "llama3", "gemma", "mistral")  # mlx_tune.model.chat_templates.NAMED


@dataclass
class EvalConfig:
    """Prompts the live adapter answers during training (greedy, batched, in-process)."""

    prompts: str | None = field(default=None, metadata={
        "doc": "test_mlx.py prompts file (null: no prompt evaluation; grpo: refused, it scores valid/test.jsonl)"})
    max_prompts: int | None = field(default=None, metadata={
        "doc": "use the first N rows (null: all; grpo: of valid.jsonl, else test.jsonl)"})
    max_tokens: int = field(default=64, metadata={"doc": "tokens per answer (grpo: grpo.max_completion_length)"})
    every: int | None = field(default=None, metadata={
        "doc": "steps between evaluations (null: train.steps_per_eval); grpo: the held-out reward val_reward_mean"})
    batch_size: int = field(default=16, metadata={"doc": "answers decoded together"})

    def check(self) -> list[str]:
        return [f"eval.{n}: {getattr(self, n)} must be > 0" for n in ("max_prompts", "max_tokens", "every", "batch_size")
                if getattr(self, n) is not None and getattr(self, n) <= 0]


@dataclass
class Config:
    """A whole run: model, quantization, adapter, data, training, outputs, serving."""

    model: str = field(metadata={"doc": "hub repo id, local HF/MLX folder, or .gguf file"})
    quantize: QuantizeConfig | None = field(
        default_factory=QuantizeConfig, metadata={"doc": "base storage; null keeps the source as it is"}
    )
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"doc": "adapter shape"})
    data: str | None = field(default=None, metadata={"doc": "folder with train.jsonl / valid.jsonl / test.jsonl"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"doc": "training loop"})
    output_dir: str = field(default="outputs/run", metadata={"doc": "adapter, metrics, checkpoints, loss.png"})
    fused_dir: str | None = field(default=None, metadata={"doc": "fused model folder (default: OUTPUT_DIR/fused)"})
    serve: ServeConfig = field(default_factory=ServeConfig, metadata={"doc": "server"})
    fuse: FuseConfig = field(default_factory=FuseConfig, metadata={"doc": "fusing and export"})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"doc": "prompt evaluation during training"})
    preference: PreferenceConfig = field(default_factory=PreferenceConfig, metadata={
        "doc": "preference tuning (train.method dpo, orpo, simpo, cpo, kto)"})
    grpo: GrpoConfig = field(default_factory=GrpoConfig, metadata={"doc": "GRPO (train.method grpo)"})
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = field(
        default_factory=list, metadata={"doc": "run trackers (optional extras: pip install 'mlx-tune[tracking]')"})
    trust_remote_code: bool = field(default=False, metadata={"doc": "allow a hub model's own tokenizer code"})
    chat_template: str | None = field(
        default=None, metadata={"doc": "for models without one: chatml, llama3, gemma, mistral or PATH.jinja"}
    )
    source_path: str | None = field(default=None, metadata={"doc": "(set by the loader) the YAML file read"})

    def check(self) -> list[str]:
        errs = []
        if not str(self.model).strip():
            errs.append("model: is empty; give a hub repo id, a model folder or a .gguf file")
        tpl = self.chat_template
        if tpl is not None and tpl not in CHAT_TEMPLATE_NAMES:
            if not tpl.endswith(".jinja"):
                errs.append(f"chat_template: {tpl!r} is not a known template; use {', '.join(CHAT_TEMPLATE_NAMES)} "
                            "or a path to a .jinja file")
            elif not Path(tpl).expanduser().is_file():
                errs.append(f"chat_template: {tpl} not found (a .jinja file path, relative to the current folder)")
        if self.train is not None and self.eval is not None and self.train.best_metric == "eval_accuracy" \
                and not self.eval.prompts:
            errs.append("train.best_metric: eval_accuracy needs eval.prompts (a test_mlx.py prompts file)")
        if self.train is not None and self.grpo is not None and self.train.method == "grpo" \
                and not self.grpo.reward_functions:
            errs.append("grpo.reward_functions: train.method grpo needs at least one (FILE.py:FUNC or builtin:NAME)")
        if len(set(self.report_to)) != len(self.report_to):
            errs.append(f"report_to: {self.report_to} names a tracker twice")
        return errs

    @property
    def best_metric(self) -> str:
        """``train.best_metric``, or its default: eval_accuracy with eval.prompts, else val_loss."""
        return self.train.best_metric or ("eval_accuracy" if self.eval.prompts else "val_loss")

    @property
    def fused_path(self) -> Path:
        return Path(self.fused_dir) if self.fused_dir else Path(self.output_dir) / "fused"


def config_from_dict(raw: dict, source: str = "config") -> Config:
    """Validate a raw mapping; raise ConfigError listing every problem at once."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys (model:, lora:, train:, ...)")
    errs: list[str] = []
    cfg = build(Config, raw, "", errs)
    if errs:
        lines = "\n  ".join(errs)
        raise ConfigError(f"{source}: {len(errs)} problem(s):\n  {lines}")
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply ``KEY=VALUE`` overrides and validate everything.

    Relative paths in the file (model, data, output_dir, fused_dir, adapters) stay as
    written: they are resolved against the current directory, like mlx-lm's configs.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys (model:, lora:, train:, ...)")
    raw = apply_overrides(raw, overrides or [])
    cfg = config_from_dict(raw, str(path))
    cfg.source_path = str(path)
    return cfg


def config_to_dict(cfg: Any) -> Any:
    """Plain data (for YAML/JSON dumps, checkpoints and adapter_config.json)."""
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type) else cfg


def config_reference() -> str:
    """A markdown table of every key, its type, default and meaning (for the README)."""
    return reference_table(Config)
