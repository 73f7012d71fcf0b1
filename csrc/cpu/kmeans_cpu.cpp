// k-means assignment on CPU: per block of rows a GEMM for the dots, then the shared argmin body per row.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../tensor_views.h"
#include "imi_softmax/kmeans.h"
#include "parallel_chunks.h"

namespace imi_softmax {
namespace {

std::tuple<at::Tensor, at::Tensor> assign_codewords_cpu(const at::Tensor& x_in,
                                                        const at::Tensor& centroids_in) {
  check_assign_inputs(x_in, centroids_in);
  const auto x = x_in.contiguous();
  const auto centroids = centroids_in.contiguous();
  const int64_t N = x.size(0), K = centroids.size(0), d = x.size(1);
  auto codes = at::empty({N}, x.options().dtype(at::kLong));
  auto sqdist = at::empty({N}, x.options());
  const auto c_sqnorm = centroids.mul(centroids).sum(1).contiguous();
  // Blocks of rows that the threads claim as they come (parallel_chunks.h); each block's dots are
  // one small GEMM run by the thread that claimed it (BLAS is sequential inside the region). One
  // big product for all rows would split them in equal parts up front: beside a busy process, the
  // thread that is off its core would hold up the whole product for its half.
  constexpr int64_t kBlock = 1024;
  const auto centroids_t = centroids.t();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "assign_codewords_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* cn = c_sqnorm.data_ptr<scalar_t>();
    int64_t* cp = codes.data_ptr<int64_t>();
    scalar_t* sp = sqdist.data_ptr<scalar_t>();
    parallel_chunks(N, kBlock, [&](ChunkQueue& queue) {
      at::Tensor dots = at::empty({std::min(kBlock, N), K}, x.options());  // this thread's block
      for (int64_t b, e; queue.next(b, e);) {
        at::Tensor block_dots = dots.narrow(0, 0, e - b);
        at::mm_out(block_dots, x.narrow(0, b, e - b), centroids_t);
        const scalar_t* dp = block_dots.data_ptr<scalar_t>();
        for (int64_t i = b; i < e; ++i) {
          const scalar_t* row = xp + i * d;
          scalar_t norm = 0;
          IMI_SIMD_SUM(norm)
          for (int64_t t = 0; t < d; ++t) norm += row[t] * row[t];
          imi::nearest_codeword_row<scalar_t>(dp + (i - b) * K, cn, norm, K, cp + i, sp + i);
        }
      }
    });
  });
  return {codes, sqdist};
}

}  // namespace

TORCH_LIBRARY_IMPL(imi_softmax, CPU, m) { m.impl("assign_codewords", &assign_codewords_cpu); }

}  // namespace imi_softmax
