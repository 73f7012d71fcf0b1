#!/usr/bin/env bash
# Compiles every CUDA kernel file (csrc/cuda/*.cu) with nvcc -Werror for sm_80 and sm_90. No GPU
# and no torch needed: the .cu files include only our headers and the CUDA toolkit's.
# Then type-checks the CUDA glue (csrc/cuda/*.cpp: generator, Philox reservation, device checks)
# with the host compiler against the venv's torch headers, the toolkit's runtime headers and
# declaration stubs of the CUDA libraries ATen's headers include (scripts/cuda_glue_stubs), with
# -DIMI_WITH_CUDA as setup.py compiles it. Skipped (with a line) when no torch is importable.
# The flags mirror what torch's CUDAExtension passes (the __CUDA_NO_HALF* macros remove the
# implicit half/bf16 conversions, so code that relies on them fails here as it would in setup.py).
# Env: NVCC (default nvcc), IMI_NVCC_STD (default c++20, as setup.py), JOBS (parallel files, default 2),
# PY (python with torch, default .venv/bin/python, then python3), CXX (default g++).
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
if ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "nvcc not found, skipping CUDA kernel compile check"
  exit 0
fi
shopt -s nullglob
files=(csrc/cuda/*.cu)
if [ ${#files[@]} -eq 0 ]; then echo "no CUDA kernel files, nothing to check"; exit 0; fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
flags=(-c -std="${IMI_NVCC_STD:-c++20}" -O3 -Werror all-warnings -Xcompiler -Wall,-Werror
       -I csrc/include
       -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
       -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr
       -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90)
start=$SECONDS
status=0
printf '%s\n' "${files[@]}" | xargs -P "${JOBS:-2}" -I{} sh -c \
  '"$0" "$@" "{}" -o "'"$out"'/$(basename "{}").o" || { echo "FAILED: {}" >&2; exit 1; }' \
  "$NVCC" "${flags[@]}" || status=$?
if [ "$status" -ne 0 ]; then
  echo "nvcc: CUDA kernel compile check FAILED (see errors above)" >&2
  exit 1
fi
echo "nvcc: ${#files[@]} CUDA kernel files compiled for sm_80 and sm_90 with -Werror ($((SECONDS - start)) s, $("$NVCC" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'))"

# The glue: host code, so a syntax and type check is what a machine without a CUDA torch can do.
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
torch_inc=$("$PY" -c 'import torch.utils.cpp_extension as c; print(" ".join(c.include_paths()))' 2>/dev/null || true)
glue=(csrc/cuda/*.cpp)
if [ -z "$torch_inc" ]; then
  echo "no torch importable with $PY: CUDA glue type-check skipped"
  exit 0
fi
# The toolkit's headers: CUDA_HOME, else beside nvcc (which may be a wrapper script), else /usr/local/cuda.
cuda_inc=""
for c in "${CUDA_HOME:-}" "$(dirname "$(dirname "$(readlink -f "$(command -v "$NVCC")")")")" /usr/local/cuda; do
  if [ -n "$c" ] && [ -f "$c/include/cuda_runtime_api.h" ]; then cuda_inc=$c/include; break; fi
done
if [ -z "$cuda_inc" ]; then
  echo "no CUDA toolkit headers found (set CUDA_HOME): CUDA glue type-check skipped"
  exit 0
fi
inc=(-I scripts/cuda_glue_stubs -I csrc/include)
for d in $torch_inc; do inc+=(-I "$d"); done
inc+=(-I "$cuda_inc")
start=$SECONDS
for f in "${glue[@]}"; do
  "${CXX:-g++}" -std=c++20 -fsyntax-only -Wall -Werror -Wno-unused-function -DIMI_WITH_CUDA -DIMI_PYTHON_MODULE \
    "${inc[@]}" "$f" || { echo "CUDA glue type-check FAILED: $f" >&2; exit 1; }
done
echo "g++: ${#glue[@]} CUDA glue file(s) type-checked against torch $("$PY" -c 'import torch; print(torch.__version__)') headers ($((SECONDS - start)) s)"
