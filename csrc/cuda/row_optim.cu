// Row-sparse optimizer steps on the GPU (bodies: csrc/include/imi_softmax/row_optim.h). One warp per
// updated row (grid-stride over rows), lanes over the d entries: the rows are distinct (checked by
// the caller), so no atomics. Only the listed rows are read or written.
#include "device_utils.cuh"
#include "launchers.h"

#include "imi_softmax/row_optim.h"

namespace imi_softmax {
namespace cuda {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int64_t kMaxBlocks = int64_t(1) << 16;

inline unsigned row_blocks(int64_t U) {
  const int64_t b = ceil_div(U, kWarpsPerBlock);
  return static_cast<unsigned>(b < kMaxBlocks ? (b > 0 ? b : 1) : kMaxBlocks);
}

template <typename w_t>
__global__ void adam_rows_kernel(w_t* __restrict__ w, float* __restrict__ m, float* __restrict__ v,
                                 const int64_t* __restrict__ rows, const w_t* __restrict__ g, int64_t U, int64_t d,
                                 imi::AdamCoef c) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t u = warp; u < U; u += stride) {
    const int64_t off = (rows != nullptr ? rows[u] : u) * d;
    for (int64_t i = lane; i < d; i += 32) {
      float mi = m[off + i], vi = v[off + i];
      const float out = imi::adam_update(to_acc(w[off + i]), mi, vi, to_acc(g[u * d + i]), c);
      m[off + i] = mi;
      v[off + i] = vi;
      w[off + i] = imi::round_from_float<w_t>(out);
    }
  }
}

template <typename w_t>
__global__ void adagrad_rows_kernel(w_t* __restrict__ w, float* __restrict__ G, const int64_t* __restrict__ rows,
                                    const w_t* __restrict__ g, int64_t U, int64_t d, imi::AdagradCoef c) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t u = warp; u < U; u += stride) {  // uniform per warp: every lane reaches warp_sum
    const int64_t r = rows != nullptr ? rows[u] : u;
    double sum_sq = 0.0;
    for (int64_t i = lane; i < d; i += 32) sum_sq += imi::adagrad_square(to_acc(g[u * d + i]));
    sum_sq = warp_sum(sum_sq);
    float Gr = G[r];
    const float mult = imi::adagrad_row(Gr, sum_sq, d, c);  // same value on every lane
    __syncwarp();  // every lane has read G[r] before lane 0 writes it
    if (lane == 0) G[r] = Gr;
    for (int64_t i = lane; i < d; i += 32)
      w[r * d + i] = imi::round_from_float<w_t>(imi::adagrad_update(to_acc(w[r * d + i]), to_acc(g[u * d + i]), mult, c));
  }
}

}  // namespace

template <typename w_t>
cudaError_t launch_row_sparse_adam(w_t* param, float* exp_avg, float* exp_avg_sq, const int64_t* rows,
                                   const w_t* grad, int64_t U, int64_t d, imi::AdamCoef coef, cudaStream_t stream) {
  if (U == 0 || d == 0) return cudaSuccess;
  adam_rows_kernel<w_t><<<row_blocks(U), kWarpsPerBlock * 32, 0, stream>>>(param, exp_avg, exp_avg_sq, rows, grad,
                                                                           U, d, coef);
  return cudaGetLastError();
}

template <typename w_t>
cudaError_t launch_row_wise_adagrad(w_t* param, float* sum, const int64_t* rows, const w_t* grad, int64_t U,
                                    int64_t d, imi::AdagradCoef coef, cudaStream_t stream) {
  if (U == 0 || d == 0) return cudaSuccess;
  adagrad_rows_kernel<w_t><<<row_blocks(U), kWarpsPerBlock * 32, 0, stream>>>(param, sum, rows, grad, U, d, coef);
  return cudaGetLastError();
}

#define IMI_INSTANTIATE_ROW_OPTIM(T)                                                                              \
  template cudaError_t launch_row_sparse_adam<T>(T*, float*, float*, const int64_t*, const T*, int64_t, int64_t, \
                                                 imi::AdamCoef, cudaStream_t);                                   \
  template cudaError_t launch_row_wise_adagrad<T>(T*, float*, const int64_t*, const T*, int64_t, int64_t,         \
                                                  imi::AdagradCoef, cudaStream_t);
IMI_INSTANTIATE_ROW_OPTIM(float)
IMI_INSTANTIATE_ROW_OPTIM(__half)
IMI_INSTANTIATE_ROW_OPTIM(__nv_bfloat16)
#undef IMI_INSTANTIATE_ROW_OPTIM

}  // namespace cuda
}  // namespace imi_softmax
