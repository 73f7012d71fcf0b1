// The thread mapping shared by the fused loss kernels (sampled_loss.cu, multilabel_loss.cu): one warp
// per query row, kWarps rows per block, the rows strided over a grid of at most 2^20 blocks; each
// column's dot product split across the 32 lanes and reduced with a butterfly (warp_sum), so every
// lane holds the same logit and branches on it stay warp-uniform.
#pragma once

#include "device_utils.cuh"

#include "imi_softmax/sampled_loss.h"

namespace imi_softmax {
namespace cuda {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;

// u of column (id, log_q) with the dot product x_row . w_id split across the lanes of a warp.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t warp_corrected_logit(const scalar_t* __restrict__ x_row,
                                                      const scalar_t* __restrict__ weight,
                                                      const scalar_t* __restrict__ bias, int64_t d,
                                                      int64_t id, acc_t log_q, int lane) {
  const acc_t dot = warp_sum(imi::dot_partial<scalar_t, acc_t>(x_row, weight + id * d, lane, d, 32));
  return imi::corrected_logit_from_dot<scalar_t, acc_t>(dot, bias, id, log_q);
}

// Whether the row's `width` ids are all usable, valid(id, column) judging each (the same verdict on
// every lane); if not, the lane holding the smallest bad column records row * width + column.
template <typename Valid>
__device__ __forceinline__ bool warp_row_ids_valid(const int64_t* __restrict__ ids_row, int64_t row, int64_t width,
                                                   int lane, int64_t* __restrict__ first_bad, Valid valid) {
  int64_t bad = width;
  for (int64_t c = lane; c < width; c += 32)
    if (!valid(ids_row[c], c)) { bad = c; break; }
  if (__ballot_sync(kFullMask, bad < width) == 0u) return true;
  if (bad < width) imi::record_bad_position(first_bad, row * width + bad);
  return false;
}

inline unsigned row_grid(int64_t B) {
  const int64_t blocks = ceil_div(B, kWarps);
  return static_cast<unsigned>(blocks < (int64_t(1) << 20) ? blocks : (int64_t(1) << 20));
}

}  // namespace cuda
}  // namespace imi_softmax
