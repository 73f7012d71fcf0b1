// k-means assignment on CPU: per block of rows a GEMM for the dots, then the shared argmin body per row.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../tensor_views.h"
#include "nearest_block.h"
#include "parallel_chunks.h"

namespace imi_softmax {
namespace {

std::tuple<at::Tensor, at::Tensor> assign_codewords_cpu(const at::Tensor& x_in,
                                                        const at::Tensor& centroids_in) {
  check_assign_inputs(x_in, centroids_in);
  const auto x = x_in.contiguous();
  const auto centroids = centroids_in.contiguous();
  const int64_t N = x.size(0), K = centroids.size(0);
  auto codes = at::empty({N}, x.options().dtype(at::kLong));
  auto sqdist = at::empty({N}, x.options());
  const auto c_sqnorm = centroids.mul(centroids).sum(1).contiguous();
  // Blocks of rows that the threads claim as they come (parallel_chunks.h); each block's dots are
  // one small GEMM run by the thread that claimed it (BLAS is sequential inside the region). One
  // big product for all rows would split them in equal parts up front: beside a busy process, the
  // thread that is off its core would hold up the whole product for its half.
  constexpr int64_t kBlock = kAssignBlockRows;
  const auto centroids_t = centroids.t();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "assign_codewords_cpu", [&] {
    const scalar_t* cn = c_sqnorm.data_ptr<scalar_t>();
    int64_t* cp = codes.data_ptr<int64_t>();
    scalar_t* sp = sqdist.data_ptr<scalar_t>();
    parallel_chunks(N, kBlock, [&](ChunkQueue& queue) {
      at::Tensor dots = at::empty({std::min(kBlock, N), K}, x.options());  // this thread's block
      for (int64_t b, e; queue.next(b, e);)
        nearest_in_block<scalar_t, int64_t>(x.narrow(0, b, e - b), centroids_t, cn, dots, cp + b, sp + b);
    });
  });
  return {codes, sqdist};
}

}  // namespace

TORCH_LIBRARY_IMPL(imi_softmax, CPU, m) { m.impl("assign_codewords", &assign_codewords_cpu); }

}  // namespace imi_softmax
