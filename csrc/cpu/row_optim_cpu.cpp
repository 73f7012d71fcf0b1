// CPU launchers of the row-sparse optimizer steps (csrc/include/imi_softmax/row_optim.h): parallel
// over the updated rows, handed out in chunks that the threads claim as they come (parallel_chunks.h:
// a thread another process keeps off its core does not hold up the step with half the rows), a
// vectorizable loop over d inside each. Only the rows listed are read or written; nothing of size N
// is allocated or swept.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../tensor_views.h"
#include "imi_softmax/row_optim.h"
#include "parallel_chunks.h"

namespace imi_softmax {
namespace {

// Rows per chunk: enough elements that a chunk outweighs its claim.
int64_t row_grain(int64_t d) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, d)); }

// Storage type of the weight: float32, bfloat16 or float16 (checked before).
template <typename F>
void dispatch_weight(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    case at::kHalf: f(at::Half{}); break;
    default: TORCH_CHECK(false, "row optimizer: unsupported weight dtype ", t);
  }
}

// The listed rows are scattered over [N, d]: the loop is DRAM-latency bound unless the rows a few
// iterations ahead are requested early (every cache line of them).
constexpr int64_t kPrefetchAhead = 4;

template <typename T>
inline void prefetch_row(const T* p, int64_t d) {
  for (int64_t i = 0; i < d; i += 64 / static_cast<int64_t>(sizeof(T))) IMI_PREFETCH(p + i);
}

// Rows [u0, u1) of one update (rows == nullptr: row u itself). Separate functions rather than the
// parallel_chunks lambdas, which would not inherit the optimize attribute.
template <typename w_t>
IMI_NO_FP_CONTRACT void adam_range(w_t* w, float* m, float* v, const int64_t* rows, const w_t* g, int64_t u0,
                                   int64_t u1, int64_t d, const imi::AdamCoef& c) {
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t off = (rows != nullptr ? rows[u] : u) * d;
    if (rows != nullptr && u + kPrefetchAhead < u1) {
      const int64_t next = rows[u + kPrefetchAhead] * d;
      prefetch_row(w + next, d);
      prefetch_row(m + next, d);
      prefetch_row(v + next, d);
    }
    w_t* wr = w + off;
    float* mr = m + off;
    float* vr = v + off;
    const w_t* gr = g + u * d;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) {
      const float out = imi::adam_update(static_cast<float>(wr[i]), mr[i], vr[i], static_cast<float>(gr[i]), c);
      wr[i] = imi::round_from_float<w_t>(out);
    }
  }
}

template <typename w_t>
IMI_NO_FP_CONTRACT void adagrad_range(w_t* w, float* G, const int64_t* rows, const w_t* g, int64_t u0, int64_t u1,
                                      int64_t d, const imi::AdagradCoef& c) {
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t r = rows != nullptr ? rows[u] : u;
    if (rows != nullptr && u + kPrefetchAhead < u1) {
      prefetch_row(w + rows[u + kPrefetchAhead] * d, d);
      IMI_PREFETCH(G + rows[u + kPrefetchAhead]);
    }
    w_t* wr = w + r * d;
    const w_t* gr = g + u * d;
    double sum_sq = 0.0;
    IMI_SIMD_SUM(sum_sq)
    for (int64_t i = 0; i < d; ++i) sum_sq += imi::adagrad_square(static_cast<float>(gr[i]));
    const float mult = imi::adagrad_row(G[r], sum_sq, d, c);
#pragma omp simd
    for (int64_t i = 0; i < d; ++i)
      wr[i] = imi::round_from_float<w_t>(
          imi::adagrad_update(static_cast<float>(wr[i]), static_cast<float>(gr[i]), mult, c));
  }
}

template <typename w_t>
void adam_rows(w_t* w, float* m, float* v, const int64_t* rows, const w_t* g, int64_t U, int64_t d,
               const imi::AdamCoef& c) {
  parallel_chunks(U, row_grain(d), [&](ChunkQueue& queue) {
    for (int64_t u0, u1; queue.next(u0, u1);) adam_range(w, m, v, rows, g, u0, u1, d, c);
  });
}

template <typename w_t>
void adagrad_rows(w_t* w, float* G, const int64_t* rows, const w_t* g, int64_t U, int64_t d,
                  const imi::AdagradCoef& c) {
  parallel_chunks(U, row_grain(d), [&](ChunkQueue& queue) {
    for (int64_t u0, u1; queue.next(u0, u1);) adagrad_range(w, G, rows, g, u0, u1, d, c);
  });
}

void row_sparse_adam_cpu(const at::Tensor& param, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                         const std::optional<at::Tensor>& rows_in, const at::Tensor& grad_in, double lr, double beta1,
                         double beta2, double eps, double weight_decay, int64_t step) {
  const RowOptimShape s = row_optim_inputs("row_sparse_adam_", param,
                                           {named("exp_avg", exp_avg), named("exp_avg_sq", exp_avg_sq)},
                                           param.sizes(), rows_in, grad_in);
  check_adam_step(step);
  if (s.U == 0) return;
  const imi::AdamCoef c = imi::make_adam_coef(lr, beta1, beta2, eps, weight_decay, step);
  dispatch_weight(param.scalar_type(), [&](auto tag) {
    using w_t = decltype(tag);
    adam_rows<w_t>(param.data_ptr<w_t>(), exp_avg.data_ptr<float>(), exp_avg_sq.data_ptr<float>(),
                   s.rows_ptr(), s.grad.data_ptr<w_t>(), s.U, s.d, c);
  });
}

void row_wise_adagrad_cpu(const at::Tensor& param, const at::Tensor& sum, const std::optional<at::Tensor>& rows_in,
                          const at::Tensor& grad_in, double lr, double eps, double weight_decay) {
  const RowOptimShape s =
      row_optim_inputs("row_wise_adagrad_", param, {named("sum", sum)}, {param.size(0)}, rows_in, grad_in);
  if (s.U == 0 || s.d == 0) return;  // a row of no columns has no mean square (G would become 0 / 0)
  const imi::AdagradCoef c = imi::make_adagrad_coef(lr, eps, weight_decay);
  dispatch_weight(param.scalar_type(), [&](auto tag) {
    using w_t = decltype(tag);
    adagrad_rows<w_t>(param.data_ptr<w_t>(), sum.data_ptr<float>(), s.rows_ptr(),
                      s.grad.data_ptr<w_t>(), s.U, s.d, c);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(imi_softmax, CPU, m) {
  m.impl("row_sparse_adam_", &row_sparse_adam_cpu);
  m.impl("row_wise_adagrad_", &row_wise_adagrad_cpu);
}

}  // namespace imi_softmax
