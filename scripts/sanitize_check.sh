#!/usr/bin/env bash
# The op-level test files against an AddressSanitizer + UndefinedBehaviorSanitizer build of the CPU
# ops (setup.py with IMI_SANITIZE=1: -O1 -g, every report fatal). An out-of-bounds read or write, a
# use after free, a null or misaligned pointer, a signed overflow or a shift out of range in our C++
# fails the check even when the test's assertions would pass. The build lives in its own tree,
# build/sanitize/ (a copy of the sources; its objects are reused from run to run), so the normal
# build in imi_softmax/ is untouched. Skipped (with a line) where the compiler has no sanitizer
# runtimes. Env: PY (default .venv/bin/python), CXX (default g++), MAX_JOBS (default 2),
# SANITIZE_TESTS (test files, default the list below).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
PY=${PY:-.venv/bin/python}
[[ "$PY" = /* ]] || PY=$root/$PY  # absolute, but not resolved: a venv's python must keep its path
CXX_BIN=${CXX:-g++}
asan=$("$CXX_BIN" -print-file-name=libasan.so)
ubsan=$("$CXX_BIN" -print-file-name=libubsan.so)
if [ ! -f "$asan" ] || [ ! -f "$ubsan" ]; then
  echo "no libasan/libubsan with $CXX_BIN: sanitizer check skipped"
  exit 0
fi
tests=${SANITIZE_TESTS:-"test_op_checks.py test_opcheck.py test_proposal.py test_draw_exactness.py
  test_sampled_loss.py test_multilabel.py test_search.py test_incremental_refresh.py test_inplace_refresh.py
  test_assign_rows.py test_int32_index.py test_optim.py test_kmeans.py test_thread_independence.py
  test_validation.py test_edge_cases.py test_half_index.py test_chunked_eval.py test_corrupt_op_inputs.py"}
tree=$root/build/sanitize
mkdir -p "$tree"
# Tracked and untracked (not ignored) files, with their times kept: ninja recompiles only what changed.
git ls-files -co --exclude-standard -z | xargs -0 cp -p --parents -t "$tree"
start=$SECONDS
(cd "$tree" && env -u IMI_FORCE_FALLBACK IMI_SANITIZE=1 IMI_FORCE_CPU=1 IMI_STRICT_BUILD=1 \
   MAX_JOBS="${MAX_JOBS:-2}" "$PY" setup.py build_ext --inplace > build.log 2>&1) \
  || { tail -n 40 "$tree/build.log"; echo "sanitizer build failed: full log in $tree/build.log"; exit 1; }
echo "sanitizer build (ASan + UBSan, CPU ops) ready in $((SECONDS - start)) s"
reports=$tree/reports
rm -rf "$reports" && mkdir -p "$reports"
export LD_PRELOAD="$asan:$ubsan" PYTHONPATH="$tree"
# allocator_may_return_null: a size no machine has (test_corrupt_op_inputs) gets torch's out-of-memory
# error, as without the sanitizer, instead of ASan's abort
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:allocator_may_return_null=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
unset IMI_FORCE_FALLBACK
cd "$tree"
"$PY" -c 'import sys, imi_softmax, imi_softmax._loader as l
assert imi_softmax.__file__.startswith(sys.argv[1]) and not l.USING_FALLBACK, (imi_softmax.__file__, l.USING_FALLBACK)' "$tree"
status=0
for t in $tests; do
  # -s: a report is written to stderr by a process that then exits, which pytest's capture would drop
  if ! "$PY" -m pytest -q -x -s -p no:cacheprovider "tests/$t" > "$reports/$t.log" 2>&1; then
    grep -m 3 -A 30 "runtime error:\|ERROR: AddressSanitizer" "$reports/$t.log" || tail -n 30 "$reports/$t.log"
    echo "FAILED under the sanitizers: tests/$t (log: $reports/$t.log)"
    status=1
  fi
done
[ "$status" -eq 0 ] && echo "sanitizers: $(echo $tests | wc -w) test files clean under ASan + UBSan ($((SECONDS - start)) s)"
exit "$status"
