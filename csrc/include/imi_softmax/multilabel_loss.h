// Fused multi-label sampled softmax, one query row at a time. A row holds L positive columns (-1 =
// padding) followed by M sampled negatives; ids/log_q are [B, L+M].
//   u_c = x.w_{id_c} + b_{id_c} - log Q(id_c) for every column c;
//   negative j is masked (u_j = -inf) when remove_accidental_hits and id_j equals ANY positive of
//   the row, so no positive of the row is ever a negative of another one;
//   S = logsumexp over the unmasked negatives (-inf when there are none);
//   per positive p: lse_p = logaddexp(u_p, S), loss_p = lse_p - u_p.
// Because S does not depend on p, every positive shares one pass over the negatives: the
// negatives' weight rows are gathered once per row, not once per positive.
// Backward with upstream g_p = d out / d loss_p:
//   coef_p = g_p (exp(u_p - lse_p) - 1),   coef_j = sum_p g_p exp(u_j - lse_p) (0 when masked).
// Pads give loss 0, lse 0, coef 0. Formulas shared with sampled_loss.h are called from there; the
// CUDA kernels (csrc/cuda/multilabel_loss.cu) run the same bodies with another thread mapping.
#pragma once

#include "sampled_loss.h"

namespace imi {

// Column c of a row may read a weight row: ids in [0, N), or -1 (padding) among the L positives.
IMI_HD bool valid_multilabel_id(int64_t id, int64_t c, int64_t L, int64_t N) {
  return in_range(id, N) || (c < L && id == -1);
}

// First column of the row whose id fails valid_multilabel_id, or -1.
IMI_HD int64_t first_invalid_multilabel_column(const int64_t* ids_row, int64_t L, int64_t LM, int64_t N) {
  for (int64_t c = 0; c < LM; ++c)
    if (!valid_multilabel_id(ids_row[c], c, L, N)) return c;
  return -1;
}

IMI_HD bool is_pad(int64_t id) { return id < 0; }

// Negative column c (>= L) is masked when it equals one of the row's positives.
IMI_HD bool is_masked_negative(const int64_t* ids_row, int64_t L, int64_t c, bool remove_accidental_hits) {
  if (!remove_accidental_hits) return false;
  const int64_t id = ids_row[c];
  for (int64_t p = 0; p < L; ++p)
    if (ids_row[p] == id) return true;
  return false;
}

// log(exp(a) + exp(b)), exact at -inf.
template <typename acc_t>
IMI_HD acc_t log_add_exp(acc_t a, acc_t b) {
  const acc_t m = a > b ? a : b;
  if (m == neg_inf<acc_t>()) return m;
  const acc_t lo = a > b ? b : a;
  return m + log_(acc_t(1) + exp_(lo - m));
}

// Positive p's outputs from its corrected logit and the negatives' logsumexp S.
template <typename acc_t>
IMI_HD void finish_positive_forward(acc_t u_p, acc_t S, acc_t* loss, acc_t* lse) {
  const acc_t l = log_add_exp<acc_t>(u_p, S);
  *lse = l;
  *loss = l - u_p;
}

// d out / d u_p and d out / d u_j contributions: the positive's own coefficient ...
template <typename acc_t>
IMI_HD acc_t positive_coef(acc_t u_p, acc_t lse_p, acc_t g_p) {
  return g_p * (exp_(u_p - lse_p) - acc_t(1));
}

// ... and negative j's coefficient, summed over the row's positives in column order.
template <typename acc_t>
IMI_HD acc_t negative_coef(acc_t u_j, const int64_t* ids_row, int64_t L, const acc_t* g_row, const acc_t* lse_row) {
  acc_t c = acc_t(0);
  for (int64_t p = 0; p < L; ++p)
    if (!is_pad(ids_row[p])) c += g_row[p] * exp_(u_j - lse_row[p]);
  return c;
}

// ---- host row bodies ---------------------------------------------------------------------------

// Writes loss_row[L] and lse_row[L]. Every id of the row must have passed
// first_invalid_multilabel_column.
template <typename scalar_t, typename acc_t>
IMI_HD void multilabel_row_forward(const scalar_t* x_row, const scalar_t* weight, const scalar_t* bias, int64_t d,
                                   const int64_t* ids_row, const acc_t* log_q_row, int64_t L, int64_t LM,
                                   bool remove_accidental_hits, acc_t* loss_row, acc_t* lse_row) {
  for (int64_t c = 0; c < IMI_ROW_PREFETCH_DISTANCE; ++c) prefetch_row(weight, d, ids_row, c, LM);
  // loss_row holds u_p until S is known (no scratch)
  for (int64_t p = 0; p < L; ++p) {
    prefetch_row(weight, d, ids_row, p + IMI_ROW_PREFETCH_DISTANCE, LM);
    loss_row[p] = is_pad(ids_row[p]) ? acc_t(0)
                                     : corrected_logit<scalar_t, acc_t>(x_row, weight, bias, d, ids_row[p], log_q_row[p]);
  }
  OnlineLSE<acc_t> state;
  for (int64_t c = L; c < LM; ++c) {
    prefetch_row(weight, d, ids_row, c + IMI_ROW_PREFETCH_DISTANCE, LM);
    if (is_masked_negative(ids_row, L, c, remove_accidental_hits)) continue;
    state.add(corrected_logit<scalar_t, acc_t>(x_row, weight, bias, d, ids_row[c], log_q_row[c]));
  }
  const acc_t S = state.value();
  for (int64_t p = 0; p < L; ++p) {
    if (is_pad(ids_row[p])) { loss_row[p] = lse_row[p] = acc_t(0); continue; }
    finish_positive_forward<acc_t>(loss_row[p], S, loss_row + p, lse_row + p);
  }
}

// Writes coef_row[LM] and grad_x_row[d]; gx_acc is a d-long scratch buffer in acc_t. Every id of the
// row must have passed first_invalid_multilabel_column.
template <typename scalar_t, typename acc_t>
IMI_HD void multilabel_row_backward(const scalar_t* x_row, const scalar_t* weight, const scalar_t* bias, int64_t d,
                                    const int64_t* ids_row, const acc_t* log_q_row, int64_t L, int64_t LM,
                                    bool remove_accidental_hits, const acc_t* g_row, const acc_t* lse_row,
                                    acc_t* coef_row, acc_t* gx_acc, scalar_t* grad_x_row) {
  for (int64_t i = 0; i < d; ++i) gx_acc[i] = acc_t(0);
  for (int64_t c = 0; c < IMI_ROW_PREFETCH_DISTANCE; ++c) prefetch_row(weight, d, ids_row, c, LM);
  for (int64_t c = 0; c < LM; ++c) {
    prefetch_row(weight, d, ids_row, c + IMI_ROW_PREFETCH_DISTANCE, LM);
    const int64_t id = ids_row[c];
    if (c < L ? is_pad(id) : is_masked_negative(ids_row, L, c, remove_accidental_hits)) {
      coef_row[c] = acc_t(0);
      continue;
    }
    const acc_t u = corrected_logit<scalar_t, acc_t>(x_row, weight, bias, d, id, log_q_row[c]);
    const acc_t k = c < L ? positive_coef<acc_t>(u, lse_row[c], g_row[c]) : negative_coef<acc_t>(u, ids_row, L, g_row, lse_row);
    coef_row[c] = k;
    const scalar_t* w = weight + id * d;
    for (int64_t i = 0; i < d; ++i) gx_acc[i] += grad_x_term<scalar_t, acc_t>(k, w[i]);
  }
  for (int64_t i = 0; i < d; ++i) grad_x_row[i] = static_cast<scalar_t>(gx_acc[i]);
}


// Training forward with fixed positive weights pw_row[L] (the reduction's: 1/count for "mean", 1 for
// "sum", 0 at pads): row_loss = sum_p pw_p loss_p, and, while the row's weight rows are still in cache,
// the coefficients d row_loss / d u_c (coef_row[LM]) and the query gradient gx_row[d] =
// sum_c coef_c w_{id_c} in acc_t: multilabel_row_forward followed by multilabel_row_backward with
// g_row = pw_row, in the same operation order (so the same values), reading W once. lse_row[L] is
// scratch (the positives' lse); coef_row holds u_c (-inf when skipped) between the two passes. Every id
// of the row must have passed first_invalid_multilabel_column.
template <typename scalar_t, typename acc_t>
IMI_HD void multilabel_row_forward_grad(const scalar_t* x_row, const scalar_t* weight, const scalar_t* bias, int64_t d,
                                        const int64_t* ids_row, const acc_t* log_q_row, int64_t L, int64_t LM,
                                        bool remove_accidental_hits, const acc_t* pw_row, acc_t* row_loss,
                                        acc_t* lse_row, acc_t* coef_row, acc_t* gx_row) {
  for (int64_t i = 0; i < d; ++i) gx_row[i] = acc_t(0);
  for (int64_t c = 0; c < IMI_ROW_PREFETCH_DISTANCE; ++c) prefetch_row(weight, d, ids_row, c, LM);
  OnlineLSE<acc_t> state;
  for (int64_t c = 0; c < LM; ++c) {
    prefetch_row(weight, d, ids_row, c + IMI_ROW_PREFETCH_DISTANCE, LM);
    if (c < L ? is_pad(ids_row[c]) : is_masked_negative(ids_row, L, c, remove_accidental_hits)) {
      coef_row[c] = neg_inf<acc_t>();
      continue;
    }
    const acc_t u = corrected_logit<scalar_t, acc_t>(x_row, weight, bias, d, ids_row[c], log_q_row[c]);
    coef_row[c] = u;
    if (c >= L) state.add(u);
  }
  const acc_t S = state.value();
  acc_t total = acc_t(0);
  for (int64_t p = 0; p < L; ++p) {
    if (is_pad(ids_row[p])) { lse_row[p] = acc_t(0); continue; }
    acc_t loss_p;
    finish_positive_forward<acc_t>(coef_row[p], S, &loss_p, lse_row + p);
    total += pw_row[p] * loss_p;
  }
  *row_loss = total;
  for (int64_t c = 0; c < LM; ++c) {
    const acc_t u = coef_row[c];
    if (c < L ? is_pad(ids_row[c]) : is_masked_negative(ids_row, L, c, remove_accidental_hits)) {
      coef_row[c] = acc_t(0);
      continue;
    }
    const acc_t k = c < L ? positive_coef<acc_t>(u, lse_row[c], pw_row[c]) : negative_coef<acc_t>(u, ids_row, L, pw_row, lse_row);
    coef_row[c] = k;
    const scalar_t* w = weight + ids_row[c] * d;
    for (int64_t i = 0; i < d; ++i) gx_row[i] += grad_x_term<scalar_t, acc_t>(k, w[i]);
  }
}

}  // namespace imi
