#!/usr/bin/env bash
# make demo: until the trainer lands, load the demo model and answer a chat prompt.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/python -m mlx_tune generate --model models/SmolLM2-135M-Instruct.Q4_1.gguf \
  --prompt "What is the capital of France?" --max-tokens 30
