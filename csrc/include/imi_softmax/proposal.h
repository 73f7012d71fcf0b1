// The MIDX proposal over an Inverted Multi-Index (DESIGN.md, "Proposal"):
//   log Q(i|h) = s1[a1(i)] + s2[a2(i)] + beta_i - log Z(h),
//   Z(h) = sum_{k1,k2} exp(s1[k1] + s2[k2]) n[k1,k2].
// Bodies shared by the CPU loops and the CUDA kernels: partition function, the three-stage draw,
// and log-probabilities of arbitrary ids. All pointers are on the executing device.
#pragma once

#include "common.h"
#include "philox.h"

namespace imi {

// Read-only view of an index built by build_cells. All pointers are on the executing device.
struct CellIndex {
  int64_t K;                 // codewords per codebook; K*K cells
  const float* log_n;        // [K*K] log sum_{i in cell} exp(beta_i); -inf for empty cells
  const float* cell_mass;    // [K*K] sum_{i in cell} exp(beta_i - *log_n_max), summed in float64
                             // (cells.h); 0 for empty cells
  const float* log_n_max;    // [1] max finite log_n (kept on device: no host sync to launch)
  const int64_t* offsets;    // [K*K+1] CSR offsets into class_ids
  // The per-class arrays are int32 (N < 2^31, checked by every op): half the bytes of int64, and
  // class_ids is read at random positions by every draw (the draws' main cache-miss stream).
  const int32_t* class_ids;  // [N] class ids grouped by cell (CSR positions)
  const float* alias_prob;   // [N] per-cell alias table (Walker/Vose) over exp(beta), by CSR
  const int32_t* alias_pos;  //     position: keep slot p with prob alias_prob[p], else take
                             //     position alias_pos[p]. nullptr: no bias, uniform in a cell
  const float* beta_csr;     // [N] bias snapshot by CSR position; nullptr: zero
  const float* beta;         // [N] bias snapshot by class id; nullptr: zero
  const int32_t* code1;      // [N] first-codebook code of each class
  const int32_t* code2;      // [N] second-codebook code of each class
};

// Every body below works on max-shifted quantities, so that fp32 keeps log Q normalized for scores
// and biases of any magnitude (the absolute rounding error of a float grows with its size):
//   t1 = s1 - max s1, t2 = s2 - max s2, cell_mass = n / exp(log_n_max) (built in float64),
//   log Q(i|h) = (t1[a1(i)] + t2[a2(i)] + (beta_i - log_n_max)) - log Z',
//   Z' = sum_{k1,k2} exp(t1[k1] + t2[k2]) cell_mass[k1,k2]  (= Z / exp(m1 + m2 + log_n_max)).
// The maxima cancel exactly, and every term of a class with non-negligible mass is small.
//
// The per-query preparation is one sequence of float operations, run sequentially by the CPU and
// split over a thread block by the CUDA kernel (thread mapping differs, the rounding order does
// not): prepare_shift, the stage-2 rows (stage2_step per entry, stage2_row_log_mass at the end,
// the exact log-space path of an underflowed row), then stage 1 (stage1_max_term, stage1_weight,
// stage1_cumulate). exp/log are exp_poly/log_poly on both backends, and the multiply-adds are
// never fused (fmul_rn/fadd_rn, IMI_NO_FP_CONTRACT).

// Row masses below this are recomputed in log space: the scaled product underflowed.
#define IMI_ROW_MASS_FLOOR 1e-30f

// t = s - max s, and for the second codebook e2 = exp(t2).
IMI_HD float shift_score(float s, float m) { return s - m; }

// log(n[cell] / exp(log_n_max)): from the float64-built scaled mass while it is a normal float
// (accurate to its own size), else from log_n (only for cells 87 nats below the largest).
IMI_HD float shifted_log_mass(const CellIndex& ix, int64_t cell) {
  const float cm = ix.cell_mass[cell];
  return cm >= FLT_MIN ? log_poly(cm) : ix.log_n[cell] - *ix.log_n_max;
}

// One entry of a stage-2 row: the running sum plus cell_mass * e2.
IMI_HD_FLATTEN float stage2_step(float acc, float mass, float e2) { return fadd_rn(acc, fmul_rn(mass, e2)); }

// The row log mass r[k1] = log sum_k2 cell_mass * e2 from the row's last cumulative value, or -inf
// when it underflowed (the caller then takes the exact path below).
IMI_HD float stage2_row_log_mass(float last) {
  return last > IMI_ROW_MASS_FLOOR ? log_poly(last) : neg_inf<float>();
}

// Exact log-space path of a row whose scaled mass underflowed (or that is empty):
// log sum_k2 exp(t2[k2] + shifted_log_mass[k1,k2]), max-shifted, two sequential passes.
IMI_HD float row_log_mass_exact(const CellIndex& ix, int64_t k1, const float* t2) {
  const int64_t K = ix.K;
  float mx = neg_inf<float>();
  for (int64_t k2 = 0; k2 < K; ++k2) mx = max_(mx, t2[k2] + shifted_log_mass(ix, k1 * K + k2));
  if (mx == neg_inf<float>()) return mx;
  float sum = 0.f;
  for (int64_t k2 = 0; k2 < K; ++k2) sum = fadd_rn(sum, exp_poly((t2[k2] + shifted_log_mass(ix, k1 * K + k2)) - mx));
  return mx + log_poly(sum);
}

// One term of the exact path's stage-2 CDF: exp(t2 + log mass - r), 0 for an empty cell.
IMI_HD float stage2_exact_term(const CellIndex& ix, int64_t k1, int64_t k2, const float* t2, float r_k1) {
  const float lm = shifted_log_mass(ix, k1 * ix.K + k2);
  return lm != neg_inf<float>() ? exp_poly((t2[k2] + lm) - r_k1) : 0.f;
}

// ... and its CDF (normalized by r_k1 = row_log_mass_exact): out[k2 * stride].
IMI_HD void stage2_cdf_row_exact(const CellIndex& ix, int64_t k1, const float* t2, float r_k1,
                                 float* out, int64_t stride) {
  float acc = 0.f;
  for (int64_t k2 = 0; k2 < ix.K; ++k2) {
    acc = fadd_rn(acc, stage2_exact_term(ix, k1, k2, t2, r_k1));
    out[k2 * stride] = acc;
  }
}

// One stage-2 row k1 sequentially (the CUDA kernel's thread-per-row form of the CPU's table):
// the cumulative weights into out[k2 * stride] (out may be null: row mass only); returns r[k1].
IMI_HD float stage2_row(const CellIndex& ix, int64_t k1, const float* t2, const float* e2, float* out,
                        int64_t stride) {
  const int64_t K = ix.K;
  const float* mass = ix.cell_mass + k1 * K;
  float acc = fmul_rn(mass[0], e2[0]);
  if (out != nullptr) out[0] = acc;
  for (int64_t k2 = 1; k2 < K; ++k2) {
    acc = stage2_step(acc, mass[k2], e2[k2]);
    if (out != nullptr) out[k2 * stride] = acc;
  }
  float r = stage2_row_log_mass(acc);
  if (r == neg_inf<float>()) {
    r = row_log_mass_exact(ix, k1, t2);
    if (out != nullptr) stage2_cdf_row_exact(ix, k1, t2, r, out, stride);
  }
  return r;
}

// Stage 1 over the rows: l1max = max_k1 stage1_max_term (a max: any order), the weights, then ONE
// sequential cumulative sum; empty rows (r = -inf) get weight exactly 0.
IMI_HD float stage1_max_term(float t1, float r) { return t1 + r; }
IMI_HD float stage1_weight(float t1, float r, float l1max) { return exp_poly((t1 + r) - l1max); }

// In place: weights w[K] -> cumulative cdf1[K]; returns log Z' = l1max + log(total) (total >= 1:
// the largest weight is exp_poly(0) = 1).
IMI_HD float stage1_cumulate(float* w, int64_t K, float l1max) {
  float acc = 0.f;
  for (int64_t k1 = 0; k1 < K; ++k1) {
    acc = fadd_rn(acc, w[k1]);
    w[k1] = acc;
  }
  return l1max + log_poly(acc);
}

// The per-query preparation on the host, shared by sampling and log_prob: t1, t2 (shifted scores),
// e2 = exp(t2), the row log masses r[K], the stage-1 CDF cdf1[K] and every stage-2 CDF,
// transposed: cdf_t[k2 * K + k1] (row k1 read with stride K by cdf_search_strided). The table is
// built vectorized over rows, each row in stage2_row's sequential k2 order. mass_t[k2 * K + k1] is
// cell_mass transposed (contiguous inner loop). Returns log Z'.
IMI_HD_FLATTEN float query_prepare_table(const CellIndex& ix, const float* mass_t, const float* s1,
                                         const float* s2, float* t1, float* t2, float* e2, float* r,
                                         float* cdf1, float* cdf_t) {
  const int64_t K = ix.K;
  float m1 = neg_inf<float>(), m2 = neg_inf<float>();
  IMI_SIMD_MAX(m1)
  for (int64_t k = 0; k < K; ++k) m1 = max_(m1, s1[k]);
  IMI_SIMD_MAX(m2)
  for (int64_t k = 0; k < K; ++k) m2 = max_(m2, s2[k]);
  for (int64_t k = 0; k < K; ++k) {
    t1[k] = shift_score(s1[k], m1);
    t2[k] = shift_score(s2[k], m2);
    e2[k] = exp_poly(t2[k]);
  }
  for (int64_t k1 = 0; k1 < K; ++k1) cdf_t[k1] = fmul_rn(mass_t[k1], e2[0]);
  for (int64_t k2 = 1; k2 < K; ++k2) {
    const float e = e2[k2];
    const float* prev = cdf_t + (k2 - 1) * K;
    const float* mt = mass_t + k2 * K;
    float* cur = cdf_t + k2 * K;
    for (int64_t k1 = 0; k1 < K; ++k1) cur[k1] = stage2_step(prev[k1], mt[k1], e);
  }
  const float* last = cdf_t + (K - 1) * K;
  int32_t underflowed = 0;  // a count, not a bool: the reduction vectorizes
  for (int64_t k1 = 0; k1 < K; ++k1) {
    r[k1] = stage2_row_log_mass(last[k1]);
    underflowed += r[k1] == neg_inf<float>() ? 1 : 0;
  }
  if (underflowed > 0) {
    for (int64_t k1 = 0; k1 < K; ++k1) {
      if (r[k1] != neg_inf<float>()) continue;
      r[k1] = row_log_mass_exact(ix, k1, t2);
      stage2_cdf_row_exact(ix, k1, t2, r[k1], cdf_t + k1, K);
    }
  }
  float l1max = neg_inf<float>();
  IMI_SIMD_MAX(l1max)
  for (int64_t k1 = 0; k1 < K; ++k1) l1max = max_(l1max, stage1_max_term(t1[k1], r[k1]));
  for (int64_t k1 = 0; k1 < K; ++k1) cdf1[k1] = stage1_weight(t1[k1], r[k1], l1max);
  return stage1_cumulate(cdf1, K, l1max);
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

// Stage three (CONTRACT.md section 1): a slot of `cell` (CSR position begin + slot) from 64 random
// bits r by a 64 x 64 -> 128-bit multiply, slot = (r * count) >> 64, which is uniform over the
// count slots up to count / 2^64; u_accept = the top 24 bits of the fraction the multiply leaves
// (r * count mod 2^64), the acceptance uniform of Walker's single-uniform alias method.
struct SlotDraw {
  int64_t pos;
  float u_accept;
};

IMI_HD SlotDraw cell_slot(const CellIndex& ix, int64_t cell, uint64_t r) {
  const int64_t begin = ix.offsets[cell];
  const uint64_t count = static_cast<uint64_t>(ix.offsets[cell + 1] - begin);
#if defined(__CUDA_ARCH__)
  const uint64_t hi = __umul64hi(r, count), lo = r * count;
#else
  const unsigned __int128 p = static_cast<unsigned __int128>(r) * count;
  const uint64_t hi = static_cast<uint64_t>(p >> 64), lo = static_cast<uint64_t>(p);
#endif
  SlotDraw d;
  // an empty cell is only reached with NaN scores: position -1, never a read past the cell
  d.pos = count == 0 ? int64_t(-1) : begin + static_cast<int64_t>(hi);
  d.u_accept = static_cast<float>(lo >> 40) * (1.0f / 16777216.0f);
  return d;
}

// Position drawn with probability exp(beta_i) / n[cell] (Walker's alias method: exact, O(1));
// without a bias the slot is final. Returns -1 instead of reading out of bounds when the index or
// the scores are corrupt: an empty cell was drawn (only NaN scores do that) or an alias points out
// of its cell (the op was handed a bad alias_pos). The CPU op raises on -1; the CUDA kernel writes
// id -1, which every loss op rejects.
IMI_HD int64_t resolve_alias(const CellIndex& ix, int64_t cell, const SlotDraw& d) {
  if (d.pos < 0 || ix.alias_prob == nullptr || d.u_accept < ix.alias_prob[d.pos]) return d.pos;
  const int64_t a = ix.alias_pos[d.pos];
  return (a >= ix.offsets[cell] && a < ix.offsets[cell + 1]) ? a : -1;
}

// The class at drawn position pos, or -1 (a corrupt index, as resolve_alias's -1) when class_ids
// holds a value outside [0, num_classes) (num_classes = offsets[K * K]: one CSR position per class,
// read once by the caller): a corrupt table is reported, never returned as a drawn id.
IMI_HD int64_t drawn_class(const CellIndex& ix, int64_t pos, int64_t num_classes) {
  const int64_t id = ix.class_ids[pos];
  return (id >= 0 && id < num_classes) ? id : int64_t(-1);
}

// The class term of log Q, shifted: beta_i - log_n_max (beta 0 without a bias).
IMI_HD float shifted_bias(const CellIndex& ix, const float* beta_by, int64_t at) {
  return (beta_by == nullptr ? 0.f : beta_by[at]) - *ix.log_n_max;
}

// log Q of a drawn position whose cell is (k1, k2); t1, t2 shifted scores, log_z = log Z'.
IMI_HD float drawn_log_q(const CellIndex& ix, const float* t1, const float* t2, int64_t k1,
                         int64_t k2, int64_t pos, float log_z) {
  return ((t1[k1] + t2[k2]) + shifted_bias(ix, ix.beta_csr, pos)) - log_z;
}

// log Q of class `id` (in [0, N)), bit-equal to drawn_log_q of a draw that lands on it.
IMI_HD float class_log_q(const CellIndex& ix, const float* t1, const float* t2, int64_t id,
                         float log_z) {
  return ((t1[ix.code1[id]] + t2[ix.code2[id]]) + shifted_bias(ix, ix.beta, id)) - log_z;
}

// Whether v[0..n) are all finite (x - x is 0 for finite x, NaN for NaN and Inf); counted rather than
// returned early, so the loop vectorizes.
IMI_HD bool all_finite(const float* v, int64_t n) {
  int32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) bad += (v[i] - v[i] == 0.f) ? 0 : 1;
  return bad == 0;
}

// Whether class id in [0, N) has both codes in [0, K) (t1/t2 are read at them).
IMI_HD bool codes_in_range(const CellIndex& ix, int64_t id) {
  const int64_t c1 = ix.code1[id], c2 = ix.code2[id];
  return c1 >= 0 && c1 < ix.K && c2 >= 0 && c2 < ix.K;
}

// log Q of a target: 0 for the ignore marker (negative id), NaN for an id outside [0, N) or with a
// code outside [0, K) (the ops raise on those; the NaN keeps a kernel that is reached anyway from
// reading out of bounds). Otherwise class_log_q's value.
IMI_HD float target_log_q(const CellIndex& ix, const float* t1, const float* t2, int64_t id,
                          int64_t num_classes, float log_z) {
  if (id < 0) return 0.f;
  if (id >= num_classes || !codes_in_range(ix, id)) return NAN;
  return class_log_q(ix, t1, t2, id, log_z);
}

}  // namespace imi
