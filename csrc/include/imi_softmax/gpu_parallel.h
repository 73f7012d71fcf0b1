// Pieces of the proposal bodies (proposal.h) split or restated for parallel execution, with the
// SAME floating-point operations in the SAME order as the sequential bodies, so that a parallel
// kernel reproduces the sequential results bit for bit (when the compiler emits the same
// instructions: see the notes on FMA contraction in csrc/cuda/proposal.cu).
// Host + device (IMI_HD); no CUDA-only constructs, so the host can unit-test them.
#pragma once

#include "common.h"
#include "proposal.h"

namespace imi {

// query_prepare, split in three parallel-friendly steps:
//   (1) m2 = max_k s2[k]                        (a max: any order gives the same value)
//   (2) e2[k] = exp(s2[k] - m2), r[k1] = row_log_mass(...)   (independent per k / k1)
//   (3) l1max = max over k1 with r != -inf of s1[k1] + r[k1]  (a max again)
//   (4) w[k1] = stage1_weight(...) independently, then ONE thread runs stage1_cumulate, whose
//       running sum adds the same terms in the same order as query_prepare (adding 0.f for an
//       empty row leaves a non-negative running sum unchanged, exactly like skipping it).
IMI_HD float stage1_weight(float s1_k1, float r_k1, float l1max) {
  return r_k1 != neg_inf<float>() ? exp_(s1_k1 + r_k1 - l1max) : 0.f;
}

IMI_HD float stage1_max_term(float s1_k1, float r_k1) {
  return r_k1 != neg_inf<float>() ? s1_k1 + r_k1 : neg_inf<float>();
}

// In place: w[K] (weights) -> cumulative cdf1[K]; returns log Z = l1max + log(total).
IMI_HD float stage1_cumulate(float* w, int64_t K, float l1max) {
  float acc = 0.f;
  for (int64_t k1 = 0; k1 < K; ++k1) {
    acc += w[k1];
    w[k1] = acc;
  }
  return l1max + log_(acc);
}

// One term of stage2_cdf_row's exact log-space path.
IMI_HD float stage2_exact_term(const CellIndex& ix, int64_t k1, int64_t k2, const float* s2,
                               float r_k1) {
  const float ln = ix.log_n[k1 * ix.K + k2];
  return ln != neg_inf<float>() ? exp_(s2[k2] + ln - r_k1) : 0.f;
}

// Stage two without storing the row: the same k2 as
//   stage2_cdf_row(ix, k1, s2, e2, r_k1, row); cdf_search(row, K, u)
// computed in O(K) memory-free passes (used when the K x K table does not fit on chip).
// cdf_search returns the first index whose cumulative value exceeds u * total (the cumulative
// array is non-decreasing: its terms are >= 0), or, if none does, the first index whose
// cumulative value equals the total (the last entry with mass).
IMI_HD int64_t stage2_search_streaming(const CellIndex& ix, int64_t k1, const float* s2,
                                       const float* e2, float r_k1, float u) {
  const int64_t K = ix.K;
  float total = 0.f;
  for (int64_t k2 = 0; k2 < K; ++k2) total += ix.cell_mass[k1 * K + k2] * e2[k2];
  const bool fast = total > IMI_ROW_MASS_FLOOR;
  if (!fast) {
    total = 0.f;
    for (int64_t k2 = 0; k2 < K; ++k2) total += stage2_exact_term(ix, k1, k2, s2, r_k1);
  }
  const float target = u * total;
  // Two copies of the scan so that each accumulates with the same expression as stage2_cdf_row
  // (a compiler that contracts `acc += a * b` into an FMA there does so here too).
  float acc = 0.f;
  int64_t last_step = 0;
  if (fast) {
    for (int64_t k2 = 0; k2 < K; ++k2) {
      const float prev = acc;
      acc += ix.cell_mass[k1 * K + k2] * e2[k2];
      if (acc > target) return k2;
      if (k2 == 0 || acc != prev) last_step = k2;
    }
  } else {
    for (int64_t k2 = 0; k2 < K; ++k2) {
      const float prev = acc;
      acc += stage2_exact_term(ix, k1, k2, s2, r_k1);
      if (acc > target) return k2;
      if (k2 == 0 || acc != prev) last_step = k2;
    }
  }
  return last_step;
}

}  // namespace imi
