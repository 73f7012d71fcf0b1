// Fused sampled softmax on CUDA: one warp per query row. The formulas are the bodies of
// imi_softmax/sampled_loss.h that the CPU rows run (id check, ignored rows, accidental-hit mask,
// corrected logit, online logsumexp, softmax coefficient, grad-x term); only the thread mapping
// differs:
//   * each column's dot product x_b . w_id is split across the 32 lanes (imi::dot_partial over
//     features lane, lane + 32, ...: coalesced reads of the gathered weight row) and reduced with a
//     butterfly, so every lane holds the same u_j (imi::corrected_logit_from_dot);
//   * the backward stores the coefficients, then each lane sums grad_x[b, i] over the columns in
//     column order (the CPU's order per feature) for its features.
// The dot products sum in another order than the CPU's sequential imi::dot_row, so losses agree with
// the CPU to rounding, not bitwise.
// Ids are checked at use, before any weight row is read (imi::valid_column_id): a row holding a bad id
// is skipped and its smallest bad position recorded in *first_bad, which the launch code reads back.
#include "device_utils.cuh"
#include "launchers.h"
#include "warp_rows.cuh"

#include "imi_softmax/sampled_loss.h"

namespace imi_softmax {
namespace cuda {
namespace {

__device__ __forceinline__ bool warp_row_ids_ok(const int64_t* __restrict__ ids_row, int64_t row, int64_t M1,
                                                int64_t N, int64_t ignore_index, int lane,
                                                int64_t* __restrict__ first_bad) {
  return warp_row_ids_valid(ids_row, row, M1, lane, first_bad,
                            [=](int64_t id, int64_t j) { return imi::valid_column_id(id, j, N, ignore_index); });
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
sampled_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ weight,
                       const scalar_t* __restrict__ bias, int64_t B, int64_t d, int64_t N,
                       const int64_t* __restrict__ ids,
                       const typename imi::acc_type<scalar_t>::type* __restrict__ log_q, int64_t M1,
                       bool remove_accidental_hits, int64_t ignore_index,
                       typename imi::acc_type<scalar_t>::type* __restrict__ loss,
                       typename imi::acc_type<scalar_t>::type* __restrict__ lse,
                       int64_t* __restrict__ first_bad) {
  using acc_t = typename imi::acc_type<scalar_t>::type;
  const int lane = threadIdx.x & 31;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps;
  // `row` is uniform across the warp, so every branch below is too (full-mask shuffles are safe).
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); row < B;
       row += stride) {
    const int64_t* ids_row = ids + row * M1;
    const acc_t* lq_row = log_q + row * M1;
    const scalar_t* x_row = x + row * d;
    if (!warp_row_ids_ok(ids_row, row, M1, N, ignore_index, lane, first_bad)) {
      if (lane == 0) loss[row] = lse[row] = acc_t(NAN);
      continue;
    }
    if (imi::is_ignored_row(ids_row, ignore_index)) {
      if (lane == 0) imi::ignored_row_forward(loss + row, lse + row);
      continue;
    }
    const acc_t u0 = warp_corrected_logit<scalar_t, acc_t>(x_row, weight, bias, d, ids_row[0],
                                                           lq_row[0], lane);
    imi::OnlineLSE<acc_t> state;
    state.add(u0);
    for (int64_t j = 1; j < M1; ++j) {
      if (imi::is_masked_column(ids_row, j, remove_accidental_hits)) continue;
      state.add(warp_corrected_logit<scalar_t, acc_t>(x_row, weight, bias, d, ids_row[j],
                                                      lq_row[j], lane));
    }
    if (lane == 0) imi::finish_row_forward(state, u0, loss + row, lse + row);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
sampled_backward_kernel(const typename imi::acc_type<scalar_t>::type* __restrict__ grad_loss,
                        const scalar_t* __restrict__ x, const scalar_t* __restrict__ weight,
                        const scalar_t* __restrict__ bias, int64_t B, int64_t d, int64_t N,
                        const int64_t* __restrict__ ids,
                        const typename imi::acc_type<scalar_t>::type* __restrict__ log_q,
                        int64_t M1, const typename imi::acc_type<scalar_t>::type* __restrict__ lse,
                        bool remove_accidental_hits, int64_t ignore_index,
                        scalar_t* __restrict__ grad_x,
                        typename imi::acc_type<scalar_t>::type* __restrict__ coef,
                        int64_t* __restrict__ first_bad) {
  using acc_t = typename imi::acc_type<scalar_t>::type;
  const int lane = threadIdx.x & 31;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); row < B;
       row += stride) {
    const int64_t* ids_row = ids + row * M1;
    const acc_t* lq_row = log_q + row * M1;
    const scalar_t* x_row = x + row * d;
    acc_t* coef_row = coef + row * M1;
    scalar_t* gx_row = grad_x + row * d;
    if (!warp_row_ids_ok(ids_row, row, M1, N, ignore_index, lane, first_bad) ||
        imi::is_ignored_row(ids_row, ignore_index)) {
      for (int64_t j = lane; j < M1; j += 32) coef_row[j] = acc_t(0);
      for (int64_t i = lane; i < d; i += 32) gx_row[i] = from_acc<scalar_t>(acc_t(0));
      continue;
    }
    const acc_t g = grad_loss[row], l = lse[row];
    for (int64_t j = 0; j < M1; ++j) {
      acc_t c = acc_t(0);
      if (!imi::is_masked_column(ids_row, j, remove_accidental_hits)) {
        const acc_t u = warp_corrected_logit<scalar_t, acc_t>(x_row, weight, bias, d, ids_row[j],
                                                              lq_row[j], lane);
        c = imi::softmax_coef<acc_t>(u, l, j == 0, g);
      }
      if (lane == 0) coef_row[j] = c;
    }
    __syncwarp();  // lane 0's coefficient stores are visible to the whole warp after this
    for (int64_t i = lane; i < d; i += 32) {
      acc_t acc = acc_t(0);
      for (int64_t j = 0; j < M1; ++j) {
        if (imi::is_masked_column(ids_row, j, remove_accidental_hits)) continue;
        acc += imi::grad_x_term<scalar_t, acc_t>(coef_row[j], weight[ids_row[j] * d + i]);
      }
      gx_row[i] = from_acc<scalar_t>(acc);
    }
    __syncwarp();
  }
}

// Training forward: the forward kernel's row, then (imi::sampled_row_forward_grad's formulas) the
// coefficients for grad_loss = 1 and grad_x in acc_t while the row's weight rows are still in cache.
// coef_row holds u_j (-inf when masked) between the passes.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
sampled_train_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ weight,
                     const scalar_t* __restrict__ bias, int64_t B, int64_t d, int64_t N,
                     const int64_t* __restrict__ ids,
                     const typename imi::acc_type<scalar_t>::type* __restrict__ log_q, int64_t M1,
                     bool remove_accidental_hits, int64_t ignore_index,
                     typename imi::acc_type<scalar_t>::type* __restrict__ loss,
                     typename imi::acc_type<scalar_t>::type* __restrict__ lse,
                     typename imi::acc_type<scalar_t>::type* __restrict__ coef,
                     typename imi::acc_type<scalar_t>::type* __restrict__ grad_x,
                     int64_t* __restrict__ first_bad) {
  using acc_t = typename imi::acc_type<scalar_t>::type;
  const int lane = threadIdx.x & 31;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); row < B;
       row += stride) {
    const int64_t* ids_row = ids + row * M1;
    const acc_t* lq_row = log_q + row * M1;
    const scalar_t* x_row = x + row * d;
    acc_t* coef_row = coef + row * M1;
    acc_t* gx_row = grad_x + row * d;
    const bool ok = warp_row_ids_ok(ids_row, row, M1, N, ignore_index, lane, first_bad);
    if (!ok || imi::is_ignored_row(ids_row, ignore_index)) {
      if (lane == 0) {
        if (ok) {
          imi::ignored_row_forward(loss + row, lse + row);
        } else {
          loss[row] = lse[row] = acc_t(NAN);
        }
      }
      for (int64_t j = lane; j < M1; j += 32) coef_row[j] = acc_t(0);
      for (int64_t i = lane; i < d; i += 32) gx_row[i] = acc_t(0);
      continue;
    }
    imi::OnlineLSE<acc_t> state;
    for (int64_t j = 0; j < M1; ++j) {
      acc_t u = imi::neg_inf<acc_t>();
      if (!imi::is_masked_column(ids_row, j, remove_accidental_hits)) {
        u = warp_corrected_logit<scalar_t, acc_t>(x_row, weight, bias, d, ids_row[j], lq_row[j], lane);
        state.add(u);
      }
      if (lane == 0) coef_row[j] = u;
    }
    __syncwarp();  // lane 0's stores of u are visible to the whole warp after this
    acc_t row_loss, row_lse;
    imi::finish_row_forward(state, coef_row[0], &row_loss, &row_lse);
    if (lane == 0) {
      loss[row] = row_loss;
      lse[row] = row_lse;
    }
    __syncwarp();  // every lane has read coef_row[0] before it is overwritten
    for (int64_t j = lane; j < M1; j += 32) {
      const bool masked = imi::is_masked_column(ids_row, j, remove_accidental_hits);
      coef_row[j] = masked ? acc_t(0) : imi::softmax_coef<acc_t>(coef_row[j], row_lse, j == 0, acc_t(1));
    }
    __syncwarp();
    for (int64_t i = lane; i < d; i += 32) {
      acc_t acc = acc_t(0);
      for (int64_t j = 0; j < M1; ++j) {
        if (imi::is_masked_column(ids_row, j, remove_accidental_hits)) continue;
        acc += imi::grad_x_term<scalar_t, acc_t>(coef_row[j], weight[ids_row[j] * d + i]);
      }
      gx_row[i] = acc;
    }
    __syncwarp();
  }
}

}  // namespace

template <typename scalar_t>
cudaError_t launch_sampled_forward(const scalar_t* x, const scalar_t* weight, const scalar_t* bias,
                                   int64_t B, int64_t d, int64_t N, const int64_t* ids,
                                   const typename imi::acc_type<scalar_t>::type* log_q, int64_t M1,
                                   bool remove_accidental_hits, int64_t ignore_index,
                                   typename imi::acc_type<scalar_t>::type* loss,
                                   typename imi::acc_type<scalar_t>::type* lse, int64_t* first_bad,
                                   cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  sampled_forward_kernel<scalar_t><<<row_grid(B), kThreads, 0, stream>>>(
      x, weight, bias, B, d, N, ids, log_q, M1, remove_accidental_hits, ignore_index, loss, lse, first_bad);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_sampled_train(const scalar_t* x, const scalar_t* weight, const scalar_t* bias,
                                 int64_t B, int64_t d, int64_t N, const int64_t* ids,
                                 const typename imi::acc_type<scalar_t>::type* log_q, int64_t M1,
                                 bool remove_accidental_hits, int64_t ignore_index,
                                 typename imi::acc_type<scalar_t>::type* loss,
                                 typename imi::acc_type<scalar_t>::type* lse,
                                 typename imi::acc_type<scalar_t>::type* coef,
                                 typename imi::acc_type<scalar_t>::type* grad_x, int64_t* first_bad,
                                 cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  sampled_train_kernel<scalar_t><<<row_grid(B), kThreads, 0, stream>>>(
      x, weight, bias, B, d, N, ids, log_q, M1, remove_accidental_hits, ignore_index, loss, lse, coef, grad_x,
      first_bad);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_sampled_backward(const typename imi::acc_type<scalar_t>::type* grad_loss,
                                    const scalar_t* x, const scalar_t* weight,
                                    const scalar_t* bias, int64_t B, int64_t d, int64_t N, const int64_t* ids,
                                    const typename imi::acc_type<scalar_t>::type* log_q, int64_t M1,
                                    const typename imi::acc_type<scalar_t>::type* lse,
                                    bool remove_accidental_hits, int64_t ignore_index,
                                    scalar_t* grad_x, typename imi::acc_type<scalar_t>::type* coef,
                                    int64_t* first_bad, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  sampled_backward_kernel<scalar_t><<<row_grid(B), kThreads, 0, stream>>>(
      grad_loss, x, weight, bias, B, d, N, ids, log_q, M1, lse, remove_accidental_hits, ignore_index,
      grad_x, coef, first_bad);
  return cudaGetLastError();
}

#define IMI_INSTANTIATE_LOSS(T)                                                                  \
  template cudaError_t launch_sampled_forward<T>(                                                \
      const T*, const T*, const T*, int64_t, int64_t, int64_t, const int64_t*,                   \
      const typename imi::acc_type<T>::type*, int64_t, bool, int64_t,                            \
      typename imi::acc_type<T>::type*, typename imi::acc_type<T>::type*, int64_t*,              \
      cudaStream_t);                                                                             \
  template cudaError_t launch_sampled_train<T>(                                                  \
      const T*, const T*, const T*, int64_t, int64_t, int64_t, const int64_t*,                   \
      const typename imi::acc_type<T>::type*, int64_t, bool, int64_t,                            \
      typename imi::acc_type<T>::type*, typename imi::acc_type<T>::type*,                        \
      typename imi::acc_type<T>::type*, typename imi::acc_type<T>::type*, int64_t*,              \
      cudaStream_t);                                                                             \
  template cudaError_t launch_sampled_backward<T>(                                               \
      const typename imi::acc_type<T>::type*, const T*, const T*, const T*, int64_t, int64_t,    \
      int64_t, const int64_t*, const typename imi::acc_type<T>::type*, int64_t,                  \
      const typename imi::acc_type<T>::type*, bool, int64_t, T*,                                 \
      typename imi::acc_type<T>::type*, int64_t*, cudaStream_t);

IMI_INSTANTIATE_LOSS(float)
IMI_INSTANTIATE_LOSS(double)
IMI_INSTANTIATE_LOSS(__half)
IMI_INSTANTIATE_LOSS(__nv_bfloat16)
#undef IMI_INSTANTIATE_LOSS

}  // namespace cuda
}  // namespace imi_softmax
