// Fused sampled softmax on CUDA: one warp per query row. Each column's corrected logit
//   u_j = x_b . w_{ids[b,j]} + bias[ids[b,j]] - log_q[b,j]
// is a warp dot product (lanes stride the feature dimension: coalesced reads of the gathered
// weight row, fp32 accumulation for half/bf16), reduced with a butterfly so every lane holds the
// same u_j; the row's logsumexp is an online (streaming) logsumexp over the columns, so nothing of
// size [B, M, d] is ever materialised. The backward recomputes u_j with the same function (the
// same bits as the forward), takes the shared imi::softmax_coef, and accumulates
// grad_x[b] = sum_j coef_j w_{ids[b,j]} per feature in column order (the CPU's order).
// The dot products sum in a different order than the CPU's sequential imi::dot_row, so losses
// agree with the CPU to rounding, not bitwise.
#include "device_utils.cuh"
#include "launchers.h"

#include "imi_softmax/sampled_loss.h"

namespace imi_softmax {
namespace cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;

// imi::corrected_logit with the dot product split across the 32 lanes of a warp.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t warp_corrected_logit(const scalar_t* __restrict__ x_row,
                                                      const scalar_t* __restrict__ weight,
                                                      const scalar_t* __restrict__ bias, int64_t d,
                                                      int64_t id, acc_t log_q, int lane) {
  const scalar_t* w = weight + id * d;
  acc_t s = acc_t(0);
  for (int64_t i = lane; i < d; i += 32) s += to_acc(x_row[i]) * to_acc(w[i]);
  s = warp_sum(s);
  if (bias != nullptr) s += to_acc(bias[id]);
  return s - log_q;
}

inline unsigned row_grid(int64_t B) {
  const int64_t blocks = ceil_div(B, kWarps);
  return static_cast<unsigned>(blocks < (int64_t(1) << 20) ? blocks : (int64_t(1) << 20));
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
sampled_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ weight,
                       const scalar_t* __restrict__ bias, int64_t B, int64_t d,
                       const int64_t* __restrict__ ids,
                       const typename imi::acc_type<scalar_t>::type* __restrict__ log_q, int64_t M1,
                       bool remove_accidental_hits, int64_t ignore_index,
                       typename imi::acc_type<scalar_t>::type* __restrict__ loss,
                       typename imi::acc_type<scalar_t>::type* __restrict__ lse) {
  using acc_t = typename imi::acc_type<scalar_t>::type;
  const int lane = threadIdx.x & 31;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps;
  // `row` is uniform across the warp, so every branch below is too (full-mask shuffles are safe).
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); row < B;
       row += stride) {
    const int64_t* ids_row = ids + row * M1;
    const acc_t* lq_row = log_q + row * M1;
    const scalar_t* x_row = x + row * d;
    if (ids_row[0] == ignore_index) {
      if (lane == 0) { loss[row] = acc_t(0); lse[row] = acc_t(0); }
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
    if (lane == 0) {
      const acc_t l = state.value();
      lse[row] = l;
      loss[row] = l - u0;
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
sampled_backward_kernel(const typename imi::acc_type<scalar_t>::type* __restrict__ grad_loss,
                        const scalar_t* __restrict__ x, const scalar_t* __restrict__ weight,
                        const scalar_t* __restrict__ bias, int64_t B, int64_t d,
                        const int64_t* __restrict__ ids,
                        const typename imi::acc_type<scalar_t>::type* __restrict__ log_q,
                        int64_t M1, const typename imi::acc_type<scalar_t>::type* __restrict__ lse,
                        bool remove_accidental_hits, int64_t ignore_index,
                        scalar_t* __restrict__ grad_x,
                        typename imi::acc_type<scalar_t>::type* __restrict__ coef) {
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
    if (ids_row[0] == ignore_index) {
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
        acc += coef_row[j] * to_acc(weight[ids_row[j] * d + i]);
      }
      gx_row[i] = from_acc<scalar_t>(acc);
    }
    __syncwarp();
  }
}

}  // namespace

template <typename scalar_t>
cudaError_t launch_sampled_forward(const scalar_t* x, const scalar_t* weight, const scalar_t* bias,
                                   int64_t B, int64_t d, const int64_t* ids,
                                   const typename imi::acc_type<scalar_t>::type* log_q, int64_t M1,
                                   bool remove_accidental_hits, int64_t ignore_index,
                                   typename imi::acc_type<scalar_t>::type* loss,
                                   typename imi::acc_type<scalar_t>::type* lse,
                                   cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  sampled_forward_kernel<scalar_t><<<row_grid(B), kThreads, 0, stream>>>(
      x, weight, bias, B, d, ids, log_q, M1, remove_accidental_hits, ignore_index, loss, lse);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_sampled_backward(const typename imi::acc_type<scalar_t>::type* grad_loss,
                                    const scalar_t* x, const scalar_t* weight,
                                    const scalar_t* bias, int64_t B, int64_t d, const int64_t* ids,
                                    const typename imi::acc_type<scalar_t>::type* log_q, int64_t M1,
                                    const typename imi::acc_type<scalar_t>::type* lse,
                                    bool remove_accidental_hits, int64_t ignore_index,
                                    scalar_t* grad_x, typename imi::acc_type<scalar_t>::type* coef,
                                    cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  sampled_backward_kernel<scalar_t><<<row_grid(B), kThreads, 0, stream>>>(
      grad_loss, x, weight, bias, B, d, ids, log_q, M1, lse, remove_accidental_hits, ignore_index,
      grad_x, coef);
  return cudaGetLastError();
}

#define IMI_INSTANTIATE_LOSS(T)                                                                  \
  template cudaError_t launch_sampled_forward<T>(                                                \
      const T*, const T*, const T*, int64_t, int64_t, const int64_t*,                            \
      const typename imi::acc_type<T>::type*, int64_t, bool, int64_t,                            \
      typename imi::acc_type<T>::type*, typename imi::acc_type<T>::type*, cudaStream_t);         \
  template cudaError_t launch_sampled_backward<T>(                                               \
      const typename imi::acc_type<T>::type*, const T*, const T*, const T*, int64_t, int64_t,    \
      const int64_t*, const typename imi::acc_type<T>::type*, int64_t,                           \
      const typename imi::acc_type<T>::type*, bool, int64_t, T*,                                 \
      typename imi::acc_type<T>::type*, cudaStream_t);

IMI_INSTANTIATE_LOSS(float)
IMI_INSTANTIATE_LOSS(double)
IMI_INSTANTIATE_LOSS(__half)
IMI_INSTANTIATE_LOSS(__nv_bfloat16)
#undef IMI_INSTANTIATE_LOSS

}  // namespace cuda
}  // namespace imi_softmax
