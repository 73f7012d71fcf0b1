#!/usr/bin/env bash
# Compiles every CUDA kernel file (csrc/cuda/*.cu) with nvcc -Werror for sm_80 and sm_90. No GPU
# and no torch needed: the .cu files include only our headers and the CUDA toolkit's.
# The flags mirror what torch's CUDAExtension passes (the __CUDA_NO_HALF* macros remove the
# implicit half/bf16 conversions, so code that relies on them fails here as it would in setup.py).
# Env: NVCC (default nvcc), IMI_NVCC_STD (default c++17), JOBS (parallel files, default 2).
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
flags=(-c -std="${IMI_NVCC_STD:-c++17}" -O3 -Werror all-warnings -Xcompiler -Wall,-Werror
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
