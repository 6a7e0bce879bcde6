"""Adapters: LoRA / DoRA layers and the files that hold them.

Owns the layers (``lora``: ``from_base``, ``__call__``, ``fuse``), injection into a
loaded model (``inject``), the adapter folder format (``files``: save / read,
fingerprint), Hugging Face PEFT interop and reading either kind of folder (``peft``),
loading, removing, merging and switching adapters on one model (``manager``), and base
modules trained by name beside an adapter (``trainable``).
The rule for rank / alpha / dropout is ``mlx_tune.config.lora_hyperparameter_problems``.
May import ``model``, ``runtime``, ``config``, ``atomic`` and ``errors``.

The library API is re-exported here: ``from mlx_tune import adapters; adapters.inject(...)``.
"""

from mlx_tune.adapters.files import (
    ADAPTER_CONFIG,
    ADAPTER_FORMAT,
    ADAPTER_WEIGHTS,
    fingerprint,
    read_safetensors,
    save_adapter,
    write_adapter_files,
)
from mlx_tune.adapters.inject import (
    TrainableSummary,
    active_name,
    base_entries,
    block_paths,
    inject,
    linear_modules,
    select_modules,
    trainable_summary,
    wrappers,
)
from mlx_tune.adapters.lora import DoRALinear, LoRALinear, lora_scale, set_active
from mlx_tune.adapters.manager import AdapterManager, load_adapter, merge_adapters, unload_adapter
from mlx_tune.adapters.peft import PEFT_WEIGHTS, export_peft, import_peft, read_adapter

__all__ = [
    "ADAPTER_CONFIG", "ADAPTER_FORMAT", "ADAPTER_WEIGHTS", "PEFT_WEIGHTS",
    "AdapterManager", "DoRALinear", "LoRALinear", "TrainableSummary",
    "active_name", "base_entries", "block_paths", "export_peft", "fingerprint", "import_peft", "inject",
    "linear_modules", "load_adapter", "lora_scale", "merge_adapters", "read_adapter", "read_safetensors",
    "save_adapter", "select_modules", "set_active", "trainable_summary", "unload_adapter", "wrappers",
    "write_adapter_files",
]
