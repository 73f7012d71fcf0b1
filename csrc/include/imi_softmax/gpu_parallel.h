// The one piece of the proposal that the CUDA kernel computes in another form than the CPU: stage
// two when the K x K table does not fit in shared memory. It recomputes row k1 per draw with the
// SAME entries (stage2_entry: the float operations of stage2_row, in the same order) and returns
// the SAME k2 as cdf_search on the stored row, so the draws do not depend on the mode.
// Host + device (IMI_HD); no CUDA-only constructs.
#pragma once

#include "common.h"
#include "proposal.h"

namespace imi {

// Entry k2 of row k1's cumulative stage-2 weights given the previous entry acc: the fast path of
// stage2_row, or (exact) its log-space path normalized by r_k1.
IMI_HD float stage2_entry(const CellIndex& ix, int64_t k1, int64_t k2, const float* t2, const float* e2,
                          float r_k1, bool exact, float acc) {
  if (exact) return fadd_rn(acc, stage2_exact_term(ix, k1, k2, t2, r_k1));
  const float m = ix.cell_mass[k1 * ix.K + k2];
  return k2 == 0 ? fmul_rn(m, e2[0]) : stage2_step(acc, m, e2[k2]);
}

// The k2 of stage2_row(ix, k1, t2, e2, row, 1); cdf_search(row, K, u) in O(K) time and no memory.
// cdf_search returns the first index whose cumulative value exceeds u * total (the cumulative
// array is non-decreasing: its terms are >= 0) or, when none does, the first index holding the
// total (skip_zero_mass): the last index where the sum grew.
IMI_HD int64_t stage2_search_streaming(const CellIndex& ix, int64_t k1, const float* t2, const float* e2,
                                       float r_k1, float u) {
  const int64_t K = ix.K;
  float total = 0.f;
  for (int64_t k2 = 0; k2 < K; ++k2) total = stage2_entry(ix, k1, k2, t2, e2, r_k1, false, total);
  const bool exact = stage2_row_log_mass(total) == neg_inf<float>();  // stage2_row's test
  if (exact) {
    total = 0.f;
    for (int64_t k2 = 0; k2 < K; ++k2) total = stage2_entry(ix, k1, k2, t2, e2, r_k1, true, total);
  }
  const float target = u * total;
  float acc = 0.f;
  int64_t last_step = 0;
  for (int64_t k2 = 0; k2 < K; ++k2) {
    const float prev = acc;
    acc = stage2_entry(ix, k1, k2, t2, e2, r_k1, exact, acc);
    if (acc > target) return k2;
    if (k2 == 0 || acc != prev) last_step = k2;
  }
  return last_step;
}

}  // namespace imi
