// One block of rows against a codebook on CPU: the block's dots are one small GEMM (sequential
// BLAS inside a parallel region), then the shared argmin body per row. assign_codewords and
// assign_rows both call it, so a row gets the same code from either op whatever block it lands in.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "imi_softmax/kmeans.h"

namespace imi_softmax {

// Rows per block that a thread claims in assign_codewords and assign_rows.
constexpr int64_t kAssignBlockRows = 1024;

// Squared norm of one row, summed as every CPU assignment sums it.
template <typename scalar_t>
inline scalar_t row_sq_norm(const scalar_t* row, int64_t d) {
  scalar_t norm = 0;
  IMI_SIMD_SUM(norm)
  for (int64_t t = 0; t < d; ++t) norm += row[t] * row[t];
  return norm;
}

// block: contiguous [n, d] rows; centroids_t: [d, K] (t() of a contiguous codebook); c_sqnorm:
// the K squared centroid norms; dots: this thread's scratch of at least [n, K]. Writes codes[0, n)
// and, where sqdist is not null, sqdist[0, n).
template <typename scalar_t, typename code_t>
void nearest_in_block(const at::Tensor& block, const at::Tensor& centroids_t, const scalar_t* c_sqnorm,
                      const at::Tensor& dots, code_t* codes, scalar_t* sqdist) {
  const int64_t n = block.size(0), d = block.size(1), K = centroids_t.size(1);
  at::Tensor block_dots = dots.narrow(0, 0, n);
  at::mm_out(block_dots, block, centroids_t);
  const scalar_t* dp = block_dots.data_ptr<scalar_t>();
  const scalar_t* xp = block.data_ptr<scalar_t>();
  for (int64_t i = 0; i < n; ++i) {
    int64_t code;
    scalar_t dist;
    imi::nearest_codeword_row<scalar_t>(dp + i * K, c_sqnorm, row_sq_norm(xp + i * d, d), K, &code, &dist);
    codes[i] = static_cast<code_t>(code);
    if (sqdist != nullptr) sqdist[i] = dist;
  }
}

}  // namespace imi_softmax
