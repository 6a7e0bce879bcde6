#!/usr/bin/env bash
# Builds llama.cpp once, CPU only, from the source that PyPI carries (the llama-cpp-python sdist
# vendors the whole tree under vendor/llama.cpp, tools/perplexity included), into a cache outside
# the repo: $MLX_TUNE_LLAMACPP_CACHE or ~/.cache/mlx_tune/llama.cpp/<version>/. A second run finds
# the binaries and does nothing. bench/bench_llamacpp.py calls this and reports "skipped" when it
# exits non-zero (no cmake, no C++ compiler, no PyPI).
#
# Only the three tools the judge needs are built: llama-completion (greedy text over a raw prompt,
# --lora for an adapter), llama-perplexity and llama-tokenize.
set -euo pipefail
cd "$(dirname "$0")/.."
version="${LLAMACPP_PY_VERSION:-0.3.36}"
cache="${MLX_TUNE_LLAMACPP_CACHE:-$HOME/.cache/mlx_tune/llama.cpp}/$version"
bin="$cache/build/bin"
tools=(llama-completion llama-perplexity llama-tokenize)
done_all=1
for t in "${tools[@]}"; do [ -x "$bin/$t" ] || done_all=0; done
if [ "$done_all" = 1 ]; then echo "$bin"; exit 0; fi

for need in cmake c++; do
    command -v "$need" >/dev/null || { echo "skipped: $need not found" >&2; exit 3; }
done
pip=(.venv/bin/python -m pip)
[ -x .venv/bin/python ] || pip=(python3 -m pip)
mkdir -p "$cache"
sdist="$cache/llama_cpp_python-$version.tar.gz"
if [ ! -f "$sdist" ]; then
    "${pip[@]}" download --quiet --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$cache" \
        || { echo "skipped: could not download the llama-cpp-python $version sdist" >&2; exit 3; }
fi
if [ ! -f "$cache/src/CMakeLists.txt" ]; then
    rm -rf "$cache/src" "$cache/unpack"
    mkdir -p "$cache/unpack"
    tar xzf "$sdist" -C "$cache/unpack" "llama_cpp_python-$version/vendor/llama.cpp"
    mv "$cache/unpack/llama_cpp_python-$version/vendor/llama.cpp" "$cache/src"
    rm -rf "$cache/unpack"
fi
# Static binaries, no network code (LLAMA_OPENSSL), no server/UI/tests: the fewest objects to compile.
cmake -S "$cache/src" -B "$cache/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=ON -DGGML_OPENMP=ON -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF >"$cache/cmake.log" 2>&1 \
    || { echo "skipped: cmake configure failed (see $cache/cmake.log)" >&2; exit 3; }
cmake --build "$cache/build" --config Release -j "${LLAMACPP_JOBS:-2}" --target "${tools[@]}" >"$cache/build.log" 2>&1 \
    || { echo "skipped: llama.cpp build failed (see $cache/build.log)" >&2; exit 3; }
echo "$bin"
