#!/usr/bin/env bash
# Rivals for the benchmarks, in their own environment (.venv-rivals) so the project's
# .venv stays lean: PyTorch (CPU), transformers, PEFT, TRL and mlx-lm-lora. Benchmarks find it by path
# (MLX_TUNE_RIVALS_PYTHON overrides) and report "skipped" where it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
[ -x .venv-rivals/bin/python ] || "$py" -m venv .venv-rivals
.venv-rivals/bin/python -m pip install --quiet --upgrade pip
# A pinned CPU build where a wheel of it is at hand (a local one in /opt/wheels first); plain "torch" elsewhere.
wheel=$(ls /opt/wheels/torch-*.whl 2>/dev/null | head -n 1 || true)
if [ -n "$wheel" ]; then
    .venv-rivals/bin/python -m pip install --quiet "$wheel"
else
    .venv-rivals/bin/python -m pip install --quiet "torch==2.13.0" 2>/dev/null || .venv-rivals/bin/python -m pip install --quiet torch
fi
# trl: the reference semantics of the preference losses (bench/check_trl_preference.py).
.venv-rivals/bin/python -m pip install --quiet transformers peft trl safetensors numpy gguf
# mlx_tune itself too, so interop checks (bench/check_*.py) can compare both sides in one process.
.venv-rivals/bin/python -m pip install --quiet -e .
# mlx-lm-lora: the MLX rival for preference tuning (bench/bench_preference.py); after mlx_tune so
# it finds mlx and mlx-lm there (its other needs come with transformers and trl above).
.venv-rivals/bin/python -m pip install --quiet mlx-lm-lora
echo "rivals ready: $(.venv-rivals/bin/python -c 'import torch, peft, transformers, trl; print("torch", torch.__version__, "peft", peft.__version__, "transformers", transformers.__version__, "trl", trl.__version__)')"
