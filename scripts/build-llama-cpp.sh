#!/usr/bin/env bash
# Builds llama.cpp's llama-server and llama-bench (CPU, static) for the
# `pipeinfer bench --baselines llama.cpp,llama.cpp-ngram` baselines.
#
#   scripts/build-llama-cpp.sh [DEST]
#
# DEST defaults to ${PIPEINFER_CACHE:-$HOME/.cache/pipeinfer}/llama.cpp; the
# binaries land in DEST/bin, where bench looks for them when no
# --llama-server is given and none is on PATH. The source is the llama.cpp
# vendored in the PyPI sdist of llama-cpp-python (pinned below), built under
# DEST/src (removed after a successful build unless KEEP_BUILD=1; a build cut
# short resumes there). Idempotent: nothing is done when DEST/bin/llama-server
# exists and runs. Optional, never in CI's path. Takes ~12 min on 2 cores;
# JOBS (default: nproc) sets the build's parallelism.
# Needs: cmake, a C++ compiler, pip (ninja is used when found).
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION=0.3.36
repo=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:-${PIPEINFER_CACHE:-$HOME/.cache/pipeinfer}/llama.cpp}
mkdir -p "$dest"
dest=$(cd "$dest" && pwd)
bin=$dest/bin
jobs=${JOBS:-$(nproc 2>/dev/null || echo 2)}

if [ -x "$bin/llama-server" ] && [ -x "$bin/llama-bench" ] && "$bin/llama-server" --version >/dev/null 2>&1; then
    echo "llama.cpp already built: $bin/llama-server"
    "$bin/llama-server" --version 2>&1 | sed 's/^/  /'
    exit 0
fi

command -v cmake >/dev/null || { echo "error: cmake not found (apt-get install cmake, or pip install cmake)" >&2; exit 1; }
if [ -x "$repo/.venv/bin/python" ]; then python=$repo/.venv/bin/python; else python=${PYTHON:-python3}; fi

generator=()
if command -v ninja >/dev/null; then
    generator=(-G Ninja)
elif [ -x "$repo/.venv/bin/ninja" ]; then
    generator=(-G Ninja -DCMAKE_MAKE_PROGRAM="$repo/.venv/bin/ninja")
fi  # else cmake's default (make)

src=$dest/src
mkdir -p "$src"
sdist=$(ls "$src"/llama_cpp_python-"$LLAMA_CPP_PYTHON_VERSION".tar.gz 2>/dev/null || true)
if [ -z "$sdist" ]; then
    echo "downloading the llama-cpp-python $LLAMA_CPP_PYTHON_VERSION sdist"
    "$python" -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
        "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$src"
    sdist=$(ls "$src"/llama_cpp_python-"$LLAMA_CPP_PYTHON_VERSION".tar.gz)
fi
top=$src/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION
[ -d "$top/vendor/llama.cpp" ] || tar -xzf "$sdist" -C "$src"
cd "$top/vendor/llama.cpp"

echo "configuring llama.cpp in $PWD/build"
cmake -B build "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF >/dev/null
echo "building llama-server and llama-bench (-j$jobs)"
cmake --build build -j"$jobs" --target llama-server llama-bench

mkdir -p "$bin"
for tool in llama-server llama-bench; do
    install -m 755 "build/bin/$tool" "$bin/$tool.tmp"
    mv -f "$bin/$tool.tmp" "$bin/$tool"
done
# Static build: no libllama/libggml to copy. Should any be dynamic, say so.
if ldd "$bin/llama-server" 2>/dev/null | grep -E 'libllama|libggml|not found'; then
    echo "error: $bin/llama-server needs shared libraries that are not installed (above)" >&2
    exit 1
fi
echo "llama-cpp-python $LLAMA_CPP_PYTHON_VERSION" > "$dest/SOURCE"
"$bin/llama-server" --version >/dev/null 2>&1 || { echo "error: $bin/llama-server --version fails" >&2; exit 1; }

cd "$dest"
[ "${KEEP_BUILD:-0}" = 1 ] || rm -rf "$src"
echo "built: $bin/llama-server, $bin/llama-bench"
"$bin/llama-server" --version 2>&1 | sed 's/^/  /'
