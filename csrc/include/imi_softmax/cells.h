// Index build bodies: cell id of a class, and per-cell masses from the bias snapshot.
#pragma once

#include "common.h"

namespace imi {

IMI_HD int64_t cell_of(const int64_t* code1, const int64_t* code2, int64_t i, int64_t K) {
  return code1[i] * K + code2[i];
}

// For one cell's classes (CSR slice), log n = logsumexp(beta) and the within-cell cumulative
// weights normalized to end at exactly 1 (cdf may be nullptr when there is no bias).
IMI_HD float cell_log_mass_and_cdf(const int64_t* class_ids, int64_t begin, int64_t end,
                                   const float* beta, float* cdf) {
  if (end == begin) return neg_inf<float>();
  if (beta == nullptr) return log_(static_cast<float>(end - begin));
  float m = neg_inf<float>();
  for (int64_t p = begin; p < end; ++p) m = max_(m, beta[class_ids[p]]);
  float acc = 0.f;
  for (int64_t p = begin; p < end; ++p) {
    acc += exp_(beta[class_ids[p]] - m);
    cdf[p] = acc;
  }
  for (int64_t p = begin; p < end; ++p) cdf[p] /= acc;
  cdf[end - 1] = 1.f;
  return m + log_(acc);
}

}  // namespace imi
