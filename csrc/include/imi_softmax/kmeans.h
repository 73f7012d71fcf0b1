// Nearest-codeword assignment. The backends compute dots = x @ C^T with a GEMM; this body turns a
// row of dots into the argmin of ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2.
#pragma once

#include "common.h"

namespace imi {

template <typename T>
IMI_HD void nearest_codeword_row(const T* dots, const T* centroid_sqnorm, T x_sqnorm, int64_t K,
                                 int64_t* code, T* sqdist) {
  int64_t best = 0;
  T best_d = centroid_sqnorm[0] - T(2) * dots[0];
  for (int64_t k = 1; k < K; ++k) {
    const T d = centroid_sqnorm[k] - T(2) * dots[k];
    if (d < best_d) { best_d = d; best = k; }
  }
  *code = best;
  const T dist = best_d + x_sqnorm;
  *sqdist = dist > T(0) ? dist : T(0);  // rounding can make it slightly negative
}

}  // namespace imi
