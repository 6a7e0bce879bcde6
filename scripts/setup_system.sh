#!/usr/bin/env bash
# System packages mlx_tune wants on Linux, installed with apt-get when missing and allowed
# (root, or passwordless sudo); otherwise it says how:
#   libopenblas0-pthread      Debian's pthread OpenBLAS for MLX's CPU matmul (~50x faster)
#   chromium chromium-driver  headless browser for the studio's browser tests (MLX_TUNE_NO_BROWSER=1 skips)
set -u
[ "$(uname -s)" = "Linux" ] || exit 0
blas="/usr/lib/$(uname -m)-linux-gnu/openblas-pthread/libopenblas.so.0"
want=()
[ -f "$blas" ] || want+=(libopenblas0-pthread)
if [ "${MLX_TUNE_NO_BROWSER:-0}" != "1" ]; then
  command -v chromium >/dev/null 2>&1 || want+=(chromium)
  command -v chromedriver >/dev/null 2>&1 || want+=(chromium-driver)
fi
[ ${#want[@]} -eq 0 ] && exit 0
command -v apt-get >/dev/null 2>&1 || {
  echo "note: no apt-get; install ${want[*]} by hand (OpenBLAS: set MLX_TUNE_OPENBLAS=/path/libopenblas.so)"; exit 0; }
if [ "$(id -u)" = "0" ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; else
  echo "note: run 'sudo apt-get install ${want[*]}' (fast CPU matmul; the studio's browser tests); skipped: no root"
  exit 0
fi
echo "installing ${want[*]} (apt-get)..."
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get install -y -q "${want[@]}" >/dev/null 2>&1 || {
  $sudo apt-get update -q >/dev/null 2>&1
  $sudo apt-get install -y -q "${want[@]}" >/dev/null 2>&1 || echo "note: apt-get could not install ${want[*]}"
}
[ -f "$blas" ] && echo "OpenBLAS: $blas"
command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 && echo "Chromium: $(command -v chromium)"
exit 0
