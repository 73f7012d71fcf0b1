// Fused multi-label sampled softmax on CUDA: one warp per query row, the bodies of
// imi_softmax/multilabel_loss.h (id check, padding, masking of negatives equal to any positive,
// corrected logit, logaddexp with the negatives' logsumexp, coefficients) with the thread mapping
// of sampled_loss.cu:
//   * each column's dot product is split across the 32 lanes and reduced with a butterfly, so every
//     lane holds the same u_c and every branch on it is warp-uniform;
//   * the forward passes once over the L positives (lane 0 parks u_p in the loss row) and once over
//     the M negatives (online logsumexp S), then the lanes finish the positives from S;
//   * the backward stores the coefficients, then each lane sums grad_x[b, i] over the columns in
//     column order for its features;
//   * the training forward (multilabel_softmax_train) is the forward kernel then the backward kernel
//     with grad_loss = the positive weights and grad_x kept in acc_t: on a GPU the second read of the
//     rows is cheap next to the CPU's cache misses, so no third kernel body is kept.
// Ids are checked at use, before any weight row is read (imi::valid_multilabel_id): a row holding a
// bad id is skipped and its smallest bad position recorded in *first_bad.
#include "device_utils.cuh"
#include "launchers.h"
#include "warp_rows.cuh"

#include "imi_softmax/multilabel_loss.h"

namespace imi_softmax {
namespace cuda {
namespace {

__device__ __forceinline__ bool warp_row_ids_ok(const int64_t* __restrict__ ids_row, int64_t row, int64_t L,
                                                int64_t LM, int64_t N, int lane, int64_t* __restrict__ first_bad) {
  return warp_row_ids_valid(ids_row, row, LM, lane, first_bad,
                            [=](int64_t id, int64_t c) { return imi::valid_multilabel_id(id, c, L, N); });
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
multilabel_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ weight,
                          const scalar_t* __restrict__ bias, int64_t B, int64_t d, int64_t N,
                          const int64_t* __restrict__ ids,
                          const typename imi::acc_type<scalar_t>::type* __restrict__ log_q, int64_t L, int64_t LM,
                          bool remove_accidental_hits, typename imi::acc_type<scalar_t>::type* __restrict__ loss,
                          typename imi::acc_type<scalar_t>::type* __restrict__ lse, int64_t* __restrict__ first_bad) {
  using acc_t = typename imi::acc_type<scalar_t>::type;
  const int lane = threadIdx.x & 31;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); row < B; row += stride) {
    const int64_t* ids_row = ids + row * LM;
    const acc_t* lq_row = log_q + row * LM;
    const scalar_t* x_row = x + row * d;
    acc_t* loss_row = loss + row * L;
    acc_t* lse_row = lse + row * L;
    if (!warp_row_ids_ok(ids_row, row, L, LM, N, lane, first_bad)) {
      for (int64_t p = lane; p < L; p += 32) loss_row[p] = lse_row[p] = acc_t(NAN);
      continue;
    }
    for (int64_t p = 0; p < L; ++p) {
      acc_t u = acc_t(0);
      if (!imi::is_pad(ids_row[p]))
        u = warp_corrected_logit<scalar_t, acc_t>(x_row, weight, bias, d, ids_row[p], lq_row[p], lane);
      if (lane == 0) loss_row[p] = u;
    }
    imi::OnlineLSE<acc_t> state;
    for (int64_t c = L; c < LM; ++c) {
      if (imi::is_masked_negative(ids_row, L, c, remove_accidental_hits)) continue;
      state.add(warp_corrected_logit<scalar_t, acc_t>(x_row, weight, bias, d, ids_row[c], lq_row[c], lane));
    }
    const acc_t S = state.value();
    __syncwarp();  // lane 0's u_p stores are visible to the whole warp after this
    for (int64_t p = lane; p < L; p += 32) {
      if (imi::is_pad(ids_row[p])) { loss_row[p] = lse_row[p] = acc_t(0); continue; }
      imi::finish_positive_forward<acc_t>(loss_row[p], S, loss_row + p, lse_row + p);
    }
    __syncwarp();
  }
}

// gx_t: scalar_t for the backward op, acc_t for the training forward (the autograd backward scales it).
template <typename scalar_t, typename gx_t>
__global__ void __launch_bounds__(kThreads)
multilabel_backward_kernel(const typename imi::acc_type<scalar_t>::type* __restrict__ grad_loss,
                           const scalar_t* __restrict__ x, const scalar_t* __restrict__ weight,
                           const scalar_t* __restrict__ bias, int64_t B, int64_t d, int64_t N,
                           const int64_t* __restrict__ ids,
                           const typename imi::acc_type<scalar_t>::type* __restrict__ log_q, int64_t L, int64_t LM,
                           const typename imi::acc_type<scalar_t>::type* __restrict__ lse, bool remove_accidental_hits,
                           gx_t* __restrict__ grad_x, typename imi::acc_type<scalar_t>::type* __restrict__ coef,
                           int64_t* __restrict__ first_bad) {
  using acc_t = typename imi::acc_type<scalar_t>::type;
  const int lane = threadIdx.x & 31;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); row < B; row += stride) {
    const int64_t* ids_row = ids + row * LM;
    const acc_t* lq_row = log_q + row * LM;
    const scalar_t* x_row = x + row * d;
    const acc_t* g_row = grad_loss + row * L;
    const acc_t* lse_row = lse + row * L;
    acc_t* coef_row = coef + row * LM;
    gx_t* gx_row = grad_x + row * d;
    if (!warp_row_ids_ok(ids_row, row, L, LM, N, lane, first_bad)) {
      for (int64_t c = lane; c < LM; c += 32) coef_row[c] = acc_t(0);
      for (int64_t i = lane; i < d; i += 32) gx_row[i] = from_acc<gx_t>(acc_t(0));
      continue;
    }
    for (int64_t c = 0; c < LM; ++c) {
      const int64_t id = ids_row[c];
      acc_t k = acc_t(0);
      if (!(c < L ? imi::is_pad(id) : imi::is_masked_negative(ids_row, L, c, remove_accidental_hits))) {
        const acc_t u = warp_corrected_logit<scalar_t, acc_t>(x_row, weight, bias, d, id, lq_row[c], lane);
        k = c < L ? imi::positive_coef<acc_t>(u, lse_row[c], g_row[c])
                  : imi::negative_coef<acc_t>(u, ids_row, L, g_row, lse_row);
      }
      if (lane == 0) coef_row[c] = k;
    }
    __syncwarp();
    for (int64_t i = lane; i < d; i += 32) {
      acc_t acc = acc_t(0);
      for (int64_t c = 0; c < LM; ++c) {
        const acc_t k = coef_row[c];
        if (imi::is_pad(ids_row[c]) || k == acc_t(0)) continue;  // pads, masked negatives
        acc += imi::grad_x_term<scalar_t, acc_t>(k, weight[ids_row[c] * d + i]);
      }
      gx_row[i] = from_acc<gx_t>(acc);
    }
    __syncwarp();
  }
}

}  // namespace

template <typename scalar_t>
cudaError_t launch_multilabel_forward(const scalar_t* x, const scalar_t* weight, const scalar_t* bias, int64_t B,
                                      int64_t d, int64_t N, const int64_t* ids,
                                      const typename imi::acc_type<scalar_t>::type* log_q, int64_t L, int64_t LM,
                                      bool remove_accidental_hits, typename imi::acc_type<scalar_t>::type* loss,
                                      typename imi::acc_type<scalar_t>::type* lse, int64_t* first_bad,
                                      cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  multilabel_forward_kernel<scalar_t><<<row_grid(B), kThreads, 0, stream>>>(
      x, weight, bias, B, d, N, ids, log_q, L, LM, remove_accidental_hits, loss, lse, first_bad);
  return cudaGetLastError();
}

template <typename scalar_t, typename gx_t>
cudaError_t launch_multilabel_backward(const typename imi::acc_type<scalar_t>::type* grad_loss, const scalar_t* x,
                                       const scalar_t* weight, const scalar_t* bias, int64_t B, int64_t d, int64_t N,
                                       const int64_t* ids, const typename imi::acc_type<scalar_t>::type* log_q,
                                       int64_t L, int64_t LM, const typename imi::acc_type<scalar_t>::type* lse,
                                       bool remove_accidental_hits, gx_t* grad_x,
                                       typename imi::acc_type<scalar_t>::type* coef, int64_t* first_bad,
                                       cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  multilabel_backward_kernel<scalar_t, gx_t><<<row_grid(B), kThreads, 0, stream>>>(
      grad_loss, x, weight, bias, B, d, N, ids, log_q, L, LM, lse, remove_accidental_hits, grad_x, coef, first_bad);
  return cudaGetLastError();
}

#define IMI_INSTANTIATE_MULTILABEL(T)                                                                   \
  template cudaError_t launch_multilabel_forward<T>(                                                    \
      const T*, const T*, const T*, int64_t, int64_t, int64_t, const int64_t*,                          \
      const typename imi::acc_type<T>::type*, int64_t, int64_t, bool, typename imi::acc_type<T>::type*, \
      typename imi::acc_type<T>::type*, int64_t*, cudaStream_t);                                        \
  template cudaError_t launch_multilabel_backward<T, T>(                                                \
      const typename imi::acc_type<T>::type*, const T*, const T*, const T*, int64_t, int64_t, int64_t,  \
      const int64_t*, const typename imi::acc_type<T>::type*, int64_t, int64_t,                         \
      const typename imi::acc_type<T>::type*, bool, T*, typename imi::acc_type<T>::type*, int64_t*,     \
      cudaStream_t);
#define IMI_INSTANTIATE_MULTILABEL_ACC_GX(T)                                                            \
  template cudaError_t launch_multilabel_backward<T, typename imi::acc_type<T>::type>(                  \
      const typename imi::acc_type<T>::type*, const T*, const T*, const T*, int64_t, int64_t, int64_t,  \
      const int64_t*, const typename imi::acc_type<T>::type*, int64_t, int64_t,                         \
      const typename imi::acc_type<T>::type*, bool, typename imi::acc_type<T>::type*,                   \
      typename imi::acc_type<T>::type*, int64_t*, cudaStream_t);

IMI_INSTANTIATE_MULTILABEL(float)
IMI_INSTANTIATE_MULTILABEL(double)
IMI_INSTANTIATE_MULTILABEL(__half)
IMI_INSTANTIATE_MULTILABEL(__nv_bfloat16)
// float and double already have gx_t = acc_t above
IMI_INSTANTIATE_MULTILABEL_ACC_GX(__half)
IMI_INSTANTIATE_MULTILABEL_ACC_GX(__nv_bfloat16)
#undef IMI_INSTANTIATE_MULTILABEL
#undef IMI_INSTANTIATE_MULTILABEL_ACC_GX

}  // namespace cuda
}  // namespace imi_softmax
