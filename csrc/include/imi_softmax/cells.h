// Index build bodies: cell id of a class, and per-cell masses from the bias snapshot.
#pragma once

#include "common.h"

namespace imi {

IMI_HD int64_t cell_of(const int32_t* code1, const int32_t* code2, int64_t i, int64_t K) {
  return static_cast<int64_t>(code1[i]) * K + code2[i];
}

// For one cell's classes (CSR slice [begin, end)): returns log n = logsumexp(beta) and, when
// there is a bias, fills beta_csr (beta by position) and the cell's alias table (Vose's method)
// over exp(beta): slot p is kept with probability prob[p], else position alias[p] is taken.
// class_ids, alias and scratch hold CSR positions / class ids < N < 2^31 (the ops check N): int32.
// scratch: a work area indexed by CSR position (same size as the CSR arrays).
// exps: optional room for end - begin doubles, so each exp is computed once (same values).
// beta_csr_filled: the caller already wrote beta_csr[begin, end) (sequentially, from an old index),
// so the random reads beta[class_ids[p]] are skipped (same values).
// scratch_local: scratch is a work area of end - begin entries for this cell alone (indexed from
// 0), not one of the CSR arrays' size (the in-place update keeps no [N] scratch).
IMI_HD float cell_log_mass_and_alias(const int32_t* class_ids, int64_t begin, int64_t end,
                                     const float* beta, float* beta_csr, float* prob,
                                     int32_t* alias, int32_t* scratch, double* exps = nullptr,
                                     bool beta_csr_filled = false, bool scratch_local = false) {
  if (end == begin) return neg_inf<float>();
  const int64_t n = end - begin;
  if (beta == nullptr) return log_(static_cast<float>(n));
  float m = neg_inf<float>();
  for (int64_t p = begin; p < end; ++p) {
    if (!beta_csr_filled) beta_csr[p] = beta[class_ids[p]];
    m = max_(m, beta_csr[p]);
  }
  double total = 0.0;
  for (int64_t p = begin; p < end; ++p) {
    const double e = exp(static_cast<double>(beta_csr[p] - m));
    if (exps != nullptr) exps[p - begin] = e;
    total += e;
  }
  // Scaled weights n * w_p / sum(w) in prob[]; small ones stacked from the front of scratch,
  // large ones from the back.
  int32_t* work = scratch_local ? scratch : scratch + begin;
  int64_t small = 0, large = n;
  for (int64_t p = begin; p < end; ++p) {
    const double e = exps != nullptr ? exps[p - begin] : exp(static_cast<double>(beta_csr[p] - m));
    prob[p] = static_cast<float>(e * n / total);
    alias[p] = static_cast<int32_t>(p);
    if (prob[p] < 1.f) work[small++] = static_cast<int32_t>(p); else work[--large] = static_cast<int32_t>(p);
  }
  while (small > 0 && large < n) {
    const int32_t s = work[--small];
    const int32_t l = work[large];
    alias[s] = l;
    prob[l] = (prob[l] + prob[s]) - 1.f;
    if (prob[l] < 1.f) { ++large; work[small++] = l; }
  }
  // Leftovers (rounding) keep their own slot with certainty.
  while (small > 0) prob[work[--small]] = 1.f;
  while (large < n) prob[work[large++]] = 1.f;
  return m + static_cast<float>(log(total));
}

// The scaled cell mass n[cell] / exp(log_n_max) = sum_{i in cell} exp(beta_i - log_n_max), summed in
// float64 and rounded once (beta_csr by CSR position; nullptr: no bias, every term exp(-log_n_max)).
// The differences of two floats are exact in float64, so the mass stays accurate to float
// precision for biases of any size; exp(log_n - log_n_max) in float32 loses ulp(log_n), which at
// |beta| ~ 1e4 skews log Q by ~1e-3.
IMI_HD float cell_scaled_mass(const float* beta_csr, int64_t begin, int64_t end, float log_n_max) {
  const double shift = static_cast<double>(log_n_max);
  if (beta_csr == nullptr) return static_cast<float>(static_cast<double>(end - begin) * exp(-shift));
  double total = 0.0;
  for (int64_t p = begin; p < end; ++p) total += exp(static_cast<double>(beta_csr[p]) - shift);
  return static_cast<float>(total);
}

}  // namespace imi
