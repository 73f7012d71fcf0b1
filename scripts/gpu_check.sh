#!/usr/bin/env bash
# One device session in one command, for a machine with a CUDA GPU (lent to this project by chance,
# for minutes): build, the CUDA tests, the GPU benchmarks. Run in the repository root with the
# machine's python3 (torch with CUDA, nvcc, ninja, pytest, pytest-benchmark):
#
#     OUT=/some/dir bash scripts/gpu_check.sh
#
# Stages, each bounded by its own timeout (the defaults add up to 555 s: run under a 600 s limit):
#   1. the device and the toolchain (nvidia-smi, torch, nvcc);
#   2. `pip install --no-build-isolation --no-deps -e .` for this GPU's architecture only (quicker
#      than the default sm_80 + sm_90 + PTX), with IMI_STRICT_BUILD=1: a kernel that does not
#      compile fails the build instead of leaving a CPU-only library;
#   3. tests/test_cuda.py, then every device-parametrized test of the suite on its CUDA case;
#   4. bench/test_bench_ops.py on CUDA (pytest-benchmark, JSON), and bench/sweep.py on CUDA at the
#      acceptance point (N = 1M, d = 128, B = 512, M = 256): IMISoftmax dense and sparse against the
#      full softmax, time per step.
# A stage that fails or times out is reported and the next one runs. Everything is written to $OUT
# (default bench/results/gpu): 8 files at most, flat, as the device tool returns them (summary.txt,
# device.txt, build.log, test_cuda.log, suite_cuda.log, bench.log, bench_ops.json, sweep.csv).
# summary.txt has each stage's last lines and a line with its exit status (124: timed out) and
# seconds. SKIP_BUILD=1 runs the other stages against the library already built (a dry run here).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
export PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
summary="$OUT/summary.txt"
: >"$summary"

stage() {  # stage NAME TIMEOUT_S LOG COMMAND...: runs COMMAND with a timeout, its output appended to LOG
  local name=$1 limit=$2 log=$3 start=$SECONDS rc before
  shift 3
  before=$( (cat "$log" 2>/dev/null || true) | wc -l)
  echo "== $name (limit ${limit} s)" | tee -a "$summary"
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  tail -n "+$((before + 1))" "$log" | tail -n 15 | tee -a "$summary"
  echo "stage $name: exit $rc, $((SECONDS - start)) s" | tee -a "$summary"
  return $rc
}

info() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  nvcc --version | tail -n 2
  "$PY" - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0),
      "capability %d.%d" % torch.cuda.get_device_capability(0))
EOF
  git log -1 --format='commit %h %s' 2>/dev/null || true
}
export -f info
stage device "${INFO_TIMEOUT:-20}" "$OUT/device.txt" bash -c info

export arch=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0))' 2>/dev/null || echo "9.0")
build() {
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch} MAX_JOBS=${MAX_JOBS:-$(nproc)} IMI_STRICT_BUILD=1 \
    "$PY" -m pip install --no-build-isolation --no-deps -v -e . &&
    "$PY" -c 'import torch, imi_softmax; from imi_softmax import _loader
assert not _loader.USING_FALLBACK, "the compiled library did not load"
assert torch._C._dispatch_has_kernel_for_dispatch_key("imi_softmax::sampled_softmax_forward", "CUDA"), \
    "the library has no CUDA kernels"
print("imi_softmax with its CUDA kernels loaded from", imi_softmax.__file__)'
}
if [ -n "${SKIP_BUILD:-}" ]; then  # a dry run of the other stages against an existing build
  echo "== build skipped (SKIP_BUILD)" | tee -a "$summary"
elif ! (export -f build; stage build "${BUILD_TIMEOUT:-240}" "$OUT/build.log" bash -c build); then
  echo "the build failed: no test or benchmark can run (build.log)" | tee -a "$summary"
  exit 1
fi

stage test_cuda "${TEST_TIMEOUT:-100}" "$OUT/test_cuda.log" \
  "$PY" -m pytest tests/test_cuda.py -q -rfEs -p no:cacheprovider
stage suite_cuda "${SUITE_TIMEOUT:-70}" "$OUT/suite_cuda.log" \
  "$PY" -m pytest tests -q -rfE -p no:cacheprovider -k cuda --ignore=tests/test_cuda.py
stage bench_ops "${BENCH_TIMEOUT:-45}" "$OUT/bench.log" \
  "$PY" -m pytest bench/test_bench_ops.py -q -p no:cacheprovider -k cuda --benchmark-json="$OUT/bench_ops.json"
sweep_dir=$(mktemp -d)
stage sweep "${SWEEP_TIMEOUT:-80}" "$OUT/bench.log" \
  "$PY" bench/sweep.py --device cuda --no-memory --N 1000000 --M 256 --d 128 --methods imi_dense imi_sparse full \
  --repeats 5 --max-seconds 10 --out "$sweep_dir"
cp "$sweep_dir"/sweep_*.csv "$OUT/sweep.csv" 2>/dev/null || true
echo "done; files in $OUT: $(ls "$OUT" | tr '\n' ' ')" | tee -a "$summary"
