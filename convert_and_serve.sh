#!/usr/bin/env bash
# Fuse the trained adapter into the base model and serve it:
#   ./convert_and_serve.sh CONFIG.yaml [KEY=VALUE ...] [--no-serve]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ $# -lt 1 ]; then echo "usage: $0 CONFIG.yaml [KEY=VALUE ...] [--no-serve]" >&2; exit 2; fi
serve=1; args=()
for a in "$@"; do
  if [ "$a" = "--no-serve" ]; then serve=0; else args+=("$a"); fi
done
"$here/scripts/python" -m mlx_tune fuse "${args[@]}"
if [ "$serve" = 1 ]; then
  exec "$here/scripts/python" -m mlx_tune serve "${args[@]}"
fi
