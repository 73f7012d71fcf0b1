// Fused sampled-softmax loss, one query row at a time (DESIGN.md, "Loss"):
//   u_0 = o_y - log Q(y), u_j = o_{s_j} - log Q(s_j) (-inf for accidental hits when removed),
//   loss = logsumexp(u) - u_0.
// Column 0 of ids/log_q is the target. Rows whose target is ignore_index contribute nothing.
// Never materializes [B, M, d]: each gathered weight row is used and dropped.
//
// Every formula is one body here, called by the CPU row loops below and by the CUDA kernels
// (csrc/cuda/sampled_loss.cu), which differ only in how the dot products and the grad-x sums are
// split across threads.
#pragma once

#include "common.h"
#include "index_check.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace imi {

// Storage -> accumulation type. The CUDA half types need explicit conversions (torch builds with
// __CUDA_NO_HALF_CONVERSIONS__); the host's c10::Half / c10::BFloat16 convert with static_cast.
template <typename acc_t, typename scalar_t>
IMI_HD acc_t acc_cast(scalar_t v) { return static_cast<acc_t>(v); }
#if defined(__CUDACC__)
template <> IMI_HD float acc_cast<float, __half>(__half v) { return __half2float(v); }
template <> IMI_HD float acc_cast<float, __nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
#endif

// ---- ids ---------------------------------------------------------------------------------------

// An id the row may read a weight row with: in [0, N), or ignore_index in column 0 (that row reads
// nothing).
IMI_HD bool valid_column_id(int64_t id, int64_t j, int64_t N, int64_t ignore_index) {
  return in_range(id, N) || (j == 0 && id == ignore_index);
}

// First column of the row whose id fails valid_column_id, or -1.
IMI_HD int64_t first_invalid_column(const int64_t* ids_row, int64_t M1, int64_t N, int64_t ignore_index) {
  for (int64_t j = 0; j < M1; ++j)
    if (!valid_column_id(ids_row[j], j, N, ignore_index)) return j;
  return -1;
}

IMI_HD bool is_ignored_row(const int64_t* ids_row, int64_t ignore_index) { return ids_row[0] == ignore_index; }

IMI_HD bool is_masked_column(const int64_t* ids_row, int64_t j, bool remove_accidental_hits) {
  return j > 0 && remove_accidental_hits && ids_row[j] == ids_row[0];
}

// Entries of the weight-gradient ops (ids [B, 1+M], coef [B, 1+M]): an id in [0, N) is used; -1 (the
// ignore marker the loss gives ignored rows, also padding) and any entry whose coefficient is exactly
// 0 (ignored rows whatever their marker) add nothing and are skipped; anything else is an error.
enum class Entry : int { kUse = 0, kSkip = 1, kBad = 2 };

template <typename acc_t>
IMI_HD Entry weight_grad_entry(int64_t id, acc_t coef, int64_t N) {
  if (in_range(id, N)) return Entry::kUse;
  return (id == -1 || coef == acc_t(0)) ? Entry::kSkip : Entry::kBad;
}

// ---- formulas ----------------------------------------------------------------------------------

// Partial dot product over features begin, begin + step, ... < d (a CUDA lane's share).
template <typename scalar_t, typename acc_t>
IMI_HD acc_t dot_partial(const scalar_t* a, const scalar_t* b, int64_t begin, int64_t d, int64_t step) {
  acc_t s = acc_t(0);
  for (int64_t i = begin; i < d; i += step) s += acc_cast<acc_t>(a[i]) * acc_cast<acc_t>(b[i]);
  return s;
}

// The whole dot product in one thread (vectorized on the host).
template <typename scalar_t, typename acc_t>
IMI_HD acc_t dot_row(const scalar_t* a, const scalar_t* b, int64_t d) {
  acc_t s = acc_t(0);
  IMI_SIMD_SUM(s)
  for (int64_t i = 0; i < d; ++i) s += acc_cast<acc_t>(a[i]) * acc_cast<acc_t>(b[i]);
  return s;
}

// u_j = x.w_id (+ b_id) - log Q, from the dot product x.w_id.
template <typename scalar_t, typename acc_t>
IMI_HD acc_t corrected_logit_from_dot(acc_t dot, const scalar_t* bias, int64_t id, acc_t log_q) {
  if (bias != nullptr) dot += acc_cast<acc_t>(bias[id]);
  return dot - log_q;
}

template <typename scalar_t, typename acc_t>
IMI_HD acc_t corrected_logit(const scalar_t* x_row, const scalar_t* weight, const scalar_t* bias,
                             int64_t d, int64_t id, acc_t log_q) {
  return corrected_logit_from_dot<scalar_t, acc_t>(dot_row<scalar_t, acc_t>(x_row, weight + id * d, d),
                                                   bias, id, log_q);
}

// The row's outputs from the online logsumexp over its unmasked columns and u_0.
template <typename acc_t>
IMI_HD void finish_row_forward(const OnlineLSE<acc_t>& state, acc_t u0, acc_t* loss, acc_t* lse) {
  const acc_t l = state.value();
  *lse = l;
  *loss = l - u0;
}

// An ignored row adds nothing to the loss and gets no gradient.
template <typename acc_t>
IMI_HD void ignored_row_forward(acc_t* loss, acc_t* lse) {
  *loss = acc_t(0);
  *lse = acc_t(0);
}

// Gradient coefficient of column j: d loss / d u_j, scaled by the upstream gradient g.
template <typename acc_t>
IMI_HD acc_t softmax_coef(acc_t u, acc_t lse, bool is_target, acc_t g) {
  const acc_t p = u == neg_inf<acc_t>() ? acc_t(0) : exp_(u - lse);
  return g * (is_target ? p - acc_t(1) : p);
}

// Column j's share of feature i of grad x: coef_j * w_{id_j, i}, summed over the unmasked columns
// in column order on both backends.
template <typename scalar_t, typename acc_t>
IMI_HD acc_t grad_x_term(acc_t coef, scalar_t w) { return coef * acc_cast<acc_t>(w); }

// Entry (b, j)'s share of feature i of grad w_id: coef_bj * x_bi, summed per class in entry order
// (b, then j) on both backends; the bias gradient sums coef_bj alone.
template <typename scalar_t, typename acc_t>
IMI_HD acc_t weight_grad_term(acc_t coef, scalar_t x) { return coef * acc_cast<acc_t>(x); }

// ---- host row bodies ---------------------------------------------------------------------------

// Number of columns ahead whose weight rows are prefetched on the host.
#define IMI_ROW_PREFETCH_DISTANCE 4

template <typename scalar_t>
IMI_HD void prefetch_row(const scalar_t* weight, int64_t d, const int64_t* ids_row, int64_t j, int64_t M1) {
#if !defined(__CUDA_ARCH__)
  if (j >= M1 || ids_row[j] < 0) return;
  const char* row = reinterpret_cast<const char*>(weight + ids_row[j] * d);
  for (int64_t byte = 0; byte < d * static_cast<int64_t>(sizeof(scalar_t)); byte += 64) IMI_PREFETCH(row + byte);
#endif
}

// Every id of the row must have passed first_invalid_column.
template <typename scalar_t, typename acc_t>
IMI_HD void sampled_row_forward(const scalar_t* x_row, const scalar_t* weight,
                                const scalar_t* bias, int64_t d, const int64_t* ids_row,
                                const acc_t* log_q_row, int64_t M1, bool remove_accidental_hits,
                                int64_t ignore_index, acc_t* loss, acc_t* lse) {
  if (is_ignored_row(ids_row, ignore_index)) { ignored_row_forward(loss, lse); return; }
  for (int64_t j = 0; j < IMI_ROW_PREFETCH_DISTANCE; ++j) prefetch_row(weight, d, ids_row, j, M1);
  const acc_t u0 = corrected_logit<scalar_t, acc_t>(x_row, weight, bias, d, ids_row[0], log_q_row[0]);
  OnlineLSE<acc_t> state;
  state.add(u0);
  for (int64_t j = 1; j < M1; ++j) {
    prefetch_row(weight, d, ids_row, j + IMI_ROW_PREFETCH_DISTANCE, M1);
    if (is_masked_column(ids_row, j, remove_accidental_hits)) continue;
    state.add(corrected_logit<scalar_t, acc_t>(x_row, weight, bias, d, ids_row[j], log_q_row[j]));
  }
  finish_row_forward(state, u0, loss, lse);
}

// Writes coef_row[M1] and grad_x_row[d]; gx_acc is a d-long scratch buffer in acc_t. Every id of the
// row must have passed first_invalid_column.
template <typename scalar_t, typename acc_t>
IMI_HD void sampled_row_backward(const scalar_t* x_row, const scalar_t* weight,
                                 const scalar_t* bias, int64_t d, const int64_t* ids_row,
                                 const acc_t* log_q_row, int64_t M1, bool remove_accidental_hits,
                                 int64_t ignore_index, acc_t g, acc_t lse, acc_t* coef_row,
                                 acc_t* gx_acc, scalar_t* grad_x_row) {
  for (int64_t i = 0; i < d; ++i) gx_acc[i] = acc_t(0);
  const bool ignored = is_ignored_row(ids_row, ignore_index);
  for (int64_t j = 0; j < IMI_ROW_PREFETCH_DISTANCE && !ignored; ++j) prefetch_row(weight, d, ids_row, j, M1);
  for (int64_t j = 0; j < M1; ++j) {
    if (!ignored) prefetch_row(weight, d, ids_row, j + IMI_ROW_PREFETCH_DISTANCE, M1);
    if (ignored || is_masked_column(ids_row, j, remove_accidental_hits)) {
      coef_row[j] = acc_t(0);
      continue;
    }
    const int64_t id = ids_row[j];
    const acc_t u = corrected_logit<scalar_t, acc_t>(x_row, weight, bias, d, id, log_q_row[j]);
    const acc_t c = softmax_coef<acc_t>(u, lse, j == 0, g);
    coef_row[j] = c;
    const scalar_t* w = weight + id * d;
    for (int64_t i = 0; i < d; ++i) gx_acc[i] += grad_x_term<scalar_t, acc_t>(c, w[i]);
  }
  for (int64_t i = 0; i < d; ++i) grad_x_row[i] = static_cast<scalar_t>(gx_acc[i]);
}


// Training forward: sampled_row_forward and, while the row's weight rows are still in cache, the
// softmax coefficients for an upstream gradient of 1 (coef_row[M1]: d loss_b / d u_bj) and the query
// gradient gx_row[d] = sum_j coef_j w_{id_j} in acc_t (column order, masked columns skipped). The
// backward then only scales both by grad_loss_b and never reads W again. coef_row holds u_j (-inf
// when masked) between the two passes. Every id of the row must have passed first_invalid_column.
template <typename scalar_t, typename acc_t>
IMI_HD void sampled_row_forward_grad(const scalar_t* x_row, const scalar_t* weight,
                                     const scalar_t* bias, int64_t d, const int64_t* ids_row,
                                     const acc_t* log_q_row, int64_t M1, bool remove_accidental_hits,
                                     int64_t ignore_index, acc_t* loss, acc_t* lse, acc_t* coef_row,
                                     acc_t* gx_row) {
  for (int64_t i = 0; i < d; ++i) gx_row[i] = acc_t(0);
  if (is_ignored_row(ids_row, ignore_index)) {
    ignored_row_forward(loss, lse);
    for (int64_t j = 0; j < M1; ++j) coef_row[j] = acc_t(0);
    return;
  }
  for (int64_t j = 0; j < IMI_ROW_PREFETCH_DISTANCE; ++j) prefetch_row(weight, d, ids_row, j, M1);
  OnlineLSE<acc_t> state;
  for (int64_t j = 0; j < M1; ++j) {
    prefetch_row(weight, d, ids_row, j + IMI_ROW_PREFETCH_DISTANCE, M1);
    if (is_masked_column(ids_row, j, remove_accidental_hits)) {
      coef_row[j] = neg_inf<acc_t>();
      continue;
    }
    const acc_t u = corrected_logit<scalar_t, acc_t>(x_row, weight, bias, d, ids_row[j], log_q_row[j]);
    coef_row[j] = u;
    state.add(u);
  }
  finish_row_forward(state, coef_row[0], loss, lse);
  const acc_t l = *lse;
  for (int64_t j = 0; j < M1; ++j) {
    const bool masked = is_masked_column(ids_row, j, remove_accidental_hits);
    const acc_t c = masked ? acc_t(0) : softmax_coef<acc_t>(coef_row[j], l, j == 0, acc_t(1));
    coef_row[j] = c;
    if (masked) continue;
    const scalar_t* w = weight + ids_row[j] * d;
    for (int64_t i = 0; i < d; ++i) gx_row[i] += grad_x_term<scalar_t, acc_t>(c, w[i]);
  }
}

}  // namespace imi
