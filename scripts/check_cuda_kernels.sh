#!/usr/bin/env bash
# Compiles every CUDA kernel file with nvcc -Werror for sm_80 and sm_90 (no GPU needed).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null 2>&1; then echo "nvcc not found, skipping CUDA kernel compile check"; exit 0; fi
shopt -s nullglob
files=(csrc/cuda/*.cu)
if [ ${#files[@]} -eq 0 ]; then echo "no CUDA kernel files"; exit 0; fi
out=$(mktemp -d); trap 'rm -rf "$out"' EXIT
for f in "${files[@]}"; do
  nvcc -c -Werror all-warnings -std=c++17 -I csrc/include -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 "$f" -o "$out/$(basename "$f").o"
done
echo "nvcc: ${#files[@]} CUDA kernel files compiled for sm_80 and sm_90 with -Werror"
