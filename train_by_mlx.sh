#!/usr/bin/env bash
# Train a LoRA / QLoRA adapter: ./train_by_mlx.sh CONFIG.yaml [KEY=VALUE ...]
# Same as `mlx-tune train`; runs MLX with fast BLAS on Linux.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ $# -lt 1 ]; then echo "usage: $0 CONFIG.yaml [KEY=VALUE ...]" >&2; exit 2; fi
exec "$here/scripts/python" -m mlx_tune train "$@"
