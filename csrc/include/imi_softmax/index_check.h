// Index checks at use, shared by the CPU loops and the CUDA kernels. A loop that meets an index it
// may not read with skips it and records the entry's flat position; the launch code raises after
// the loop (tensor_views.h, check_no_bad_position). No device asserts, no out-of-bounds reads, and
// no O(N) pre-scan of tensors that the loop reads anyway.
#pragma once

#include "common.h"

namespace imi {

// Value of a position flag that nothing was recorded in.
#define IMI_NO_BAD_POSITION INT64_MAX

// v in [0, n) (one unsigned compare: negative v wraps above any n >= 0).
IMI_HD bool in_range(int64_t v, int64_t n) {
  return static_cast<uint64_t>(v) < static_cast<uint64_t>(n);
}

// *first_bad = min(*first_bad, pos) from any number of threads. The smallest position wins, so the
// error names the same entry whatever the schedule.
IMI_HD void record_bad_position(int64_t* first_bad, int64_t pos) {
#if defined(__CUDA_ARCH__)
  atomicMin(reinterpret_cast<long long*>(first_bad), static_cast<long long>(pos));
#else
  int64_t cur = __atomic_load_n(first_bad, __ATOMIC_RELAXED);
  while (pos < cur &&
         !__atomic_compare_exchange_n(first_bad, &cur, pos, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
#endif
}

// A position read from a table (alias_pos[p]) before it indexes an array of n entries: returned
// when in [0, n); otherwise table entry `entry` is recorded and `fallback` (a position already known
// to be valid, e.g. p itself) is returned, so the loop finishes without an out-of-bounds read.
IMI_HD int64_t checked_position(int64_t pos, int64_t n, int64_t fallback, int64_t* first_bad, int64_t entry) {
  if (in_range(pos, n)) return pos;
  record_bad_position(first_bad, entry);
  return fallback;
}

}  // namespace imi
