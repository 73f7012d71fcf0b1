// The MIDX proposal over an Inverted Multi-Index (DESIGN.md, "Proposal"):
//   log Q(i|h) = s1[a1(i)] + s2[a2(i)] + beta_i - log Z(h),
//   Z(h) = sum_{k1,k2} exp(s1[k1] + s2[k2]) n[k1,k2].
// Bodies shared by the CPU loops and the CUDA kernels: partition function, the three-stage draw,
// and log-probabilities of arbitrary ids.
#pragma once

#include "common.h"
#include "philox.h"

namespace imi {

// Read-only view of an index built by build_cells. All pointers are on the executing device.
struct CellIndex {
  int64_t K;                 // codewords per codebook; K*K cells
  const float* log_n;        // [K*K] log sum_{i in cell} exp(beta_i); -inf for empty cells
  const float* cell_mass;    // [K*K] exp(log_n - *log_n_max); 0 for empty cells
  const float* log_n_max;    // [1] max finite log_n (kept on device: no host sync to launch)
  const int64_t* offsets;    // [K*K+1] CSR offsets into class_ids
  const int64_t* class_ids;  // [N] class ids grouped by cell (CSR positions)
  const float* alias_prob;   // [N] per-cell alias table (Walker/Vose) over exp(beta), by CSR
  const int64_t* alias_pos;  //     position: keep slot p with prob alias_prob[p], else take
                             //     position alias_pos[p]. nullptr: no bias, uniform in a cell
  const float* beta_csr;     // [N] bias snapshot by CSR position; nullptr: zero
  const float* beta;         // [N] bias snapshot by class id; nullptr: zero
  const int64_t* code1;      // [N] first-codebook code of each class
  const int64_t* code2;      // [N] second-codebook code of each class
};

// Row masses below this are recomputed in log space: the scaled product underflowed.
#define IMI_ROW_MASS_FLOOR 1e-30f

// The exact log-space path of a row whose scaled mass underflowed (or that is empty):
// log sum_k2 exp(s2[k2] + log_n[k1,k2]).
IMI_HD float row_log_mass_exact(const CellIndex& ix, int64_t k1, const float* s2) {
  const int64_t K = ix.K;
  OnlineLSE<float> lse;
  const float* ln = ix.log_n + k1 * K;
  for (int64_t k2 = 0; k2 < K; ++k2) lse.add(s2[k2] + ln[k2]);
  return lse.value();
}

// ... and its stage-2 CDF, normalized by r_k1 = row_log_mass_exact: out[k2 * stride].
IMI_HD void stage2_cdf_row_exact(const CellIndex& ix, int64_t k1, const float* s2, float r_k1,
                                 float* out, int64_t stride) {
  const int64_t K = ix.K;
  const float* ln = ix.log_n + k1 * K;
  float acc = 0.f;
  for (int64_t k2 = 0; k2 < K; ++k2) {
    if (ln[k2] != neg_inf<float>()) acc += exp_(s2[k2] + ln[k2] - r_k1);
    out[k2 * stride] = acc;
  }
}

// log sum_k2 exp(s2[k2] + log_n[k1,k2]) for one row k1, given e2 = exp(s2 - m2).
// Fast path: one dot product with the scaled cell masses; exact log-space path if it underflows.
IMI_HD float row_log_mass(const CellIndex& ix, int64_t k1, const float* s2, const float* e2,
                          float m2) {
  const int64_t K = ix.K;
  const float* mass = ix.cell_mass + k1 * K;
  float R = 0.f;
  IMI_SIMD_SUM(R)
  for (int64_t k2 = 0; k2 < K; ++k2) R += mass[k2] * e2[k2];
  if (R > IMI_ROW_MASS_FLOOR) return log_(R) + m2 + *ix.log_n_max;
  return row_log_mass_exact(ix, k1, s2);
}

// Cumulative stage-2 weights of row k1: exp(s2[k2]) n[k1,k2], scaled; same fast/exact split as
// row_log_mass so that the two agree on which cells have mass.
IMI_HD void stage2_cdf_row(const CellIndex& ix, int64_t k1, const float* s2, const float* e2,
                           float r_k1, float* out) {
  const int64_t K = ix.K;
  const float* mass = ix.cell_mass + k1 * K;
  float acc = 0.f;
  for (int64_t k2 = 0; k2 < K; ++k2) {
    acc += mass[k2] * e2[k2];
    out[k2] = acc;
  }
  // Same test as row_log_mass up to summation order; both paths describe the same row.
  if (acc > IMI_ROW_MASS_FLOOR) return;
  stage2_cdf_row_exact(ix, k1, s2, r_k1, out, 1);
}

// The per-query preparation on the host, shared by sampling and log_prob: e2[K] = exp(s2 - max s2),
// the row log masses r[K], the stage-1 CDF cdf1[K] and every stage-2 CDF, transposed:
// cdf_t[k2 * K + k1] (row k1 read with stride K by cdf_search_strided). The table is built first
// (vectorized over rows, each row in the sequential k2 order of stage2_cdf_row) and r is read off
// its last line, so draws and log Q describe the very same numbers. mass_t[k2 * K + k1] is
// cell_mass transposed (contiguous inner loop). Returns log Z.
IMI_HD_FLATTEN float query_prepare_table(const CellIndex& ix, const float* mass_t, const float* s1,
                                         const float* s2, float* e2, float* r, float* cdf1,
                                         float* cdf_t) {
  const int64_t K = ix.K;
  float m2 = neg_inf<float>();
  IMI_SIMD_MAX(m2)
  for (int64_t k = 0; k < K; ++k) m2 = max_(m2, s2[k]);
  for (int64_t k = 0; k < K; ++k) e2[k] = exp_poly(s2[k] - m2);
  for (int64_t k1 = 0; k1 < K; ++k1) cdf_t[k1] = mass_t[k1] * e2[0];
  for (int64_t k2 = 1; k2 < K; ++k2) {
    const float e = e2[k2];
    const float* prev = cdf_t + (k2 - 1) * K;
    const float* mt = mass_t + k2 * K;
    float* cur = cdf_t + k2 * K;
    for (int64_t k1 = 0; k1 < K; ++k1) cur[k1] = prev[k1] + mt[k1] * e;
  }
  const float* last = cdf_t + (K - 1) * K;
  const float shift = m2 + *ix.log_n_max;
  int32_t underflowed = 0;  // a count, not a bool: the reduction vectorizes
  for (int64_t k1 = 0; k1 < K; ++k1) {
    const bool ok = last[k1] > IMI_ROW_MASS_FLOOR;
    r[k1] = ok ? log_poly(last[k1]) + shift : neg_inf<float>();
    underflowed += ok ? 0 : 1;
  }
  if (underflowed > 0) {
    for (int64_t k1 = 0; k1 < K; ++k1) {
      if (last[k1] > IMI_ROW_MASS_FLOOR) continue;
      r[k1] = row_log_mass_exact(ix, k1, s2);
      stage2_cdf_row_exact(ix, k1, s2, r[k1], cdf_t + k1, K);
    }
  }
  float l1max = neg_inf<float>();
  IMI_SIMD_MAX(l1max)
  for (int64_t k1 = 0; k1 < K; ++k1) l1max = max_(l1max, s1[k1] + r[k1]);  // -inf rows drop out
  // exp_poly(-inf) is exactly 0: empty rows get no stage-1 mass.
  for (int64_t k1 = 0; k1 < K; ++k1) cdf1[k1] = exp_poly(s1[k1] + r[k1] - l1max);
  float acc = 0.f;
  for (int64_t k1 = 0; k1 < K; ++k1) {
    acc += cdf1[k1];
    cdf1[k1] = acc;
  }
  return l1max + log_(acc);
}

// Steps back from entry k over entries with no mass (equal cumulative values) of a CDF read with a
// stride. The search below only lands on one when rounding put the target at the total.
template <typename Index>
IMI_HD Index skip_zero_mass(const float* cdf, int64_t stride, Index k) {
  while (k > 0 && cdf[k * stride] == cdf[(k - 1) * stride]) --k;
  return k;
}

// Inverse-CDF search over an unnormalized cumulative array read with a stride: the first index
// whose cumulative weight exceeds u * total. Zero-mass entries are never returned. Branchless
// halving (conditional moves), since the comparisons are unpredictable by design.
IMI_HD_FLATTEN int64_t cdf_search_strided(const float* cdf, int64_t n, int64_t stride, float u) {
  const float target = u * cdf[(n - 1) * stride];
  int64_t base = 0, len = n;
  while (len > 1) {
    const int64_t half = len >> 1;
    base = (cdf[(base + half - 1) * stride] > target) ? base : base + half;
    len -= half;
  }
  // Only reachable when rounding put target at the total: step back to the last entry with mass.
  return skip_zero_mass(cdf, stride, base);
}

IMI_HD int64_t cdf_search(const float* cdf, int64_t n, float u) { return cdf_search_strided(cdf, n, 1, u); }

// Stage three, first half: a uniform slot of `cell` (CSR position). The slot is final when there
// is no bias; with a bias, resolve_alias picks between the slot and its alias.
IMI_HD int64_t uniform_slot(const CellIndex& ix, int64_t cell, float u) {
  const int64_t begin = ix.offsets[cell];
  const int64_t count = ix.offsets[cell + 1] - begin;
  int64_t j = static_cast<int64_t>(u * static_cast<float>(count));
  if (j >= count) j = count - 1;
  return begin + j;
}

// Stage three, second half: position drawn with probability exp(beta_i) / n[cell] (Walker's alias
// method: exact, O(1)).
IMI_HD int64_t resolve_alias(const CellIndex& ix, int64_t pos, float u_accept) {
  if (ix.alias_prob == nullptr) return pos;
  return u_accept < ix.alias_prob[pos] ? pos : ix.alias_pos[pos];
}

// log Q of a drawn position whose cell is (k1, k2).
IMI_HD float drawn_log_q(const CellIndex& ix, const float* s1, const float* s2, int64_t k1,
                         int64_t k2, int64_t pos, float log_z) {
  const float b = ix.beta_csr == nullptr ? 0.f : ix.beta_csr[pos];
  return (s1[k1] + s2[k2] + b) - log_z;
}

IMI_HD float class_log_q(const CellIndex& ix, const float* s1, const float* s2, int64_t id,
                         float log_z) {
  const float b = ix.beta == nullptr ? 0.f : ix.beta[id];
  return (s1[ix.code1[id]] + s2[ix.code2[id]] + b) - log_z;
}

}  // namespace imi
