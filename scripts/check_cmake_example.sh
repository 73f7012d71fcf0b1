#!/usr/bin/env bash
# Builds the library with CMake (CMakeLists.txt at the root, CPU) against the torch of $PYTHON, then
# the C++ consumer in examples/cpp/, and runs it: one imi_softmax op called through the dispatcher.
# Takes a few minutes (one compile of every CPU source). Env: PYTHON (default .venv/bin/python or
# python3), BUILD (default build/cmake), JOBS (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
BUILD=${BUILD:-build/cmake}
mkdir -p "$BUILD"
prefix=$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')
cmake -S . -B "$BUILD/lib" -DCMAKE_PREFIX_PATH="$prefix" > "$BUILD/configure.log" 2>&1 \
  || { cat "$BUILD/configure.log"; exit 1; }
cmake --build "$BUILD/lib" -j "${JOBS:-2}"
cmake -S examples/cpp -B "$BUILD/example" -DCMAKE_PREFIX_PATH="$prefix" \
  -DIMI_SOFTMAX_LIB="$(realpath "$BUILD")/lib/libimi_softmax.so" > "$BUILD/example-configure.log" 2>&1 \
  || { cat "$BUILD/example-configure.log"; exit 1; }
cmake --build "$BUILD/example" -j "${JOBS:-2}"
"$BUILD/example/imi_softmax_example"
