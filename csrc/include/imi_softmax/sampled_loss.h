// Fused sampled-softmax loss, one query row at a time (DESIGN.md, "Loss"):
//   u_0 = o_y - log Q(y), u_j = o_{s_j} - log Q(s_j) (-inf for accidental hits when removed),
//   loss = logsumexp(u) - u_0.
// Column 0 of ids/log_q is the target. Rows whose target is ignore_index contribute nothing.
// Never materializes [B, M, d]: each gathered weight row is used and dropped.
#pragma once

#include "common.h"

namespace imi {

template <typename scalar_t, typename acc_t>
IMI_HD acc_t dot_row(const scalar_t* a, const scalar_t* b, int64_t d) {
  acc_t s = acc_t(0);
  IMI_SIMD_SUM(s)
  for (int64_t i = 0; i < d; ++i) s += static_cast<acc_t>(a[i]) * static_cast<acc_t>(b[i]);
  return s;
}

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

IMI_HD bool is_masked_column(const int64_t* ids_row, int64_t j, bool remove_accidental_hits) {
  return j > 0 && remove_accidental_hits && ids_row[j] == ids_row[0];
}

template <typename scalar_t, typename acc_t>
IMI_HD acc_t corrected_logit(const scalar_t* x_row, const scalar_t* weight, const scalar_t* bias,
                             int64_t d, int64_t id, acc_t log_q) {
  acc_t o = dot_row<scalar_t, acc_t>(x_row, weight + id * d, d);
  if (bias != nullptr) o += static_cast<acc_t>(bias[id]);
  return o - log_q;
}

// Gradient coefficient of column j: d loss / d u_j, scaled by the upstream gradient g.
template <typename acc_t>
IMI_HD acc_t softmax_coef(acc_t u, acc_t lse, bool is_target, acc_t g) {
  const acc_t p = u == neg_inf<acc_t>() ? acc_t(0) : exp_(u - lse);
  return g * (is_target ? p - acc_t(1) : p);
}

template <typename scalar_t, typename acc_t>
IMI_HD void sampled_row_forward(const scalar_t* x_row, const scalar_t* weight,
                                const scalar_t* bias, int64_t d, const int64_t* ids_row,
                                const acc_t* log_q_row, int64_t M1, bool remove_accidental_hits,
                                int64_t ignore_index, acc_t* loss, acc_t* lse) {
  if (ids_row[0] == ignore_index) { *loss = acc_t(0); *lse = acc_t(0); return; }
  for (int64_t j = 0; j < IMI_ROW_PREFETCH_DISTANCE; ++j) prefetch_row(weight, d, ids_row, j, M1);
  const acc_t u0 = corrected_logit<scalar_t, acc_t>(x_row, weight, bias, d, ids_row[0], log_q_row[0]);
  OnlineLSE<acc_t> state;
  state.add(u0);
  for (int64_t j = 1; j < M1; ++j) {
    prefetch_row(weight, d, ids_row, j + IMI_ROW_PREFETCH_DISTANCE, M1);
    if (is_masked_column(ids_row, j, remove_accidental_hits)) continue;
    state.add(corrected_logit<scalar_t, acc_t>(x_row, weight, bias, d, ids_row[j], log_q_row[j]));
  }
  *lse = state.value();
  *loss = *lse - u0;
}

// Writes coef_row[M1] and grad_x_row[d]; gx_acc is a d-long scratch buffer in acc_t.
template <typename scalar_t, typename acc_t>
IMI_HD void sampled_row_backward(const scalar_t* x_row, const scalar_t* weight,
                                 const scalar_t* bias, int64_t d, const int64_t* ids_row,
                                 const acc_t* log_q_row, int64_t M1, bool remove_accidental_hits,
                                 int64_t ignore_index, acc_t g, acc_t lse, acc_t* coef_row,
                                 acc_t* gx_acc, scalar_t* grad_x_row) {
  for (int64_t i = 0; i < d; ++i) gx_acc[i] = acc_t(0);
  const bool ignored = ids_row[0] == ignore_index;
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
    for (int64_t i = 0; i < d; ++i) gx_acc[i] += c * static_cast<acc_t>(w[i]);
  }
  for (int64_t i = 0; i < d; ++i) grad_x_row[i] = static_cast<scalar_t>(gx_acc[i]);
}

}  // namespace imi
