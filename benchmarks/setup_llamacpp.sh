#!/usr/bin/env bash
# llama.cpp, the CPU serving yardstick of serve_bench.py, built from source in benchmarks/.llamacpp.
# The source is the llama.cpp tree vendored in llama-cpp-python's sdist on PyPI (the only way
# llama.cpp reaches this machine); we build its own binaries, not the Python binding, because
# `llama-server` batches concurrent requests (the Python binding's server serves them one at a
# time) and speaks the same OpenAI completions API that serve_bench.py's client uses.
# Built: llama-server, llama-quantize (for the 3- and 2-bit k-quants), llama-bench and
# llama-batched-bench (decode speed without the HTTP front end).
# GGML_NATIVE=ON compiles for the ISA of the building host, as a user building it would.
# Never part of the package's deps.  JOBS (default 1) sets the compile parallelism.
set -euo pipefail
cd "$(dirname "$0")"
DEST=.llamacpp
LLAMA_CPP_PYTHON_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
JOBS="${JOBS:-1}"
mkdir -p "$DEST"
if [ ! -d "$DEST/src" ]; then
  python3 -m pip download -q --no-deps --no-binary :all: \
    "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$DEST/sdist"
  tar -xzf "$DEST/sdist/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz" -C "$DEST/sdist"
  mv "$DEST/sdist/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp" "$DEST/src"
  rm -r "$DEST/sdist"
fi
cmake -S "$DEST/src" -B "$DEST/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DBUILD_SHARED_LIBS=OFF > "$DEST/cmake.log"
cmake --build "$DEST/build" -j "$JOBS" --target llama-server llama-quantize llama-bench llama-batched-bench
mkdir -p "$DEST/bin"
for t in llama-server llama-quantize llama-bench llama-batched-bench; do cp "$DEST/build/bin/$t" "$DEST/bin/"; done
echo "llama.cpp from llama-cpp-python $LLAMA_CPP_PYTHON_VERSION: $("$DEST/bin/llama-server" --version 2>&1 | head -1)"
