#!/usr/bin/env bash
# System packages mlx_tune wants: on Linux, Debian's pthread OpenBLAS for MLX's CPU matmul.
# Installs it with apt-get when missing and allowed (root, or passwordless sudo); else says how.
set -u
[ "$(uname -s)" = "Linux" ] || exit 0
lib="/usr/lib/$(uname -m)-linux-gnu/openblas-pthread/libopenblas.so.0"
[ -f "$lib" ] && exit 0
command -v apt-get >/dev/null 2>&1 || { echo "note: OpenBLAS not found and no apt-get; MLX's CPU matmul will be slow (install OpenBLAS and set MLX_TUNE_OPENBLAS=/path/libopenblas.so)"; exit 0; }
if [ "$(id -u)" = "0" ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; else
  echo "note: run 'sudo apt-get install libopenblas0-pthread' for ~50x faster CPU matmul (skipped: no root)"; exit 0
fi
echo "installing libopenblas0-pthread (fast fp32 matmul for MLX's CPU backend)..."
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get install -y -q libopenblas0-pthread >/dev/null 2>&1 || {
  $sudo apt-get update -q >/dev/null 2>&1
  $sudo apt-get install -y -q libopenblas0-pthread >/dev/null 2>&1 || echo "note: apt-get could not install libopenblas0-pthread; continuing with the slow reference BLAS"
}
[ -f "$lib" ] && echo "OpenBLAS installed: $lib"
exit 0
