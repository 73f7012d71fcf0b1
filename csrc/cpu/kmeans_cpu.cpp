// k-means assignment on CPU: blocked GEMM for the dots, then the shared argmin body per row.
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
  // Bound the dots buffer to ~16 MB whatever N is.
  const int64_t chunk = std::max<int64_t>(1, (int64_t(1) << 22) / K);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "assign_codewords_cpu", [&] {
    for (int64_t start = 0; start < N; start += chunk) {
      const int64_t len = std::min(chunk, N - start);
      const auto xs = x.narrow(0, start, len);
      const auto dots = at::matmul(xs, centroids.t()).contiguous();
      const scalar_t* dp = dots.data_ptr<scalar_t>();
      const scalar_t* xp = x.data_ptr<scalar_t>() + start * d;
      const scalar_t* cn = c_sqnorm.data_ptr<scalar_t>();
      int64_t* cp = codes.data_ptr<int64_t>() + start;
      scalar_t* sp = sqdist.data_ptr<scalar_t>() + start;
      parallel_chunks(len, 1024, [&](ChunkQueue& queue) {
        for (int64_t b, e; queue.next(b, e);)
        for (int64_t i = b; i < e; ++i) {
          const scalar_t* row = xp + i * d;
          scalar_t norm = 0;
          IMI_SIMD_SUM(norm)
          for (int64_t t = 0; t < d; ++t) norm += row[t] * row[t];
          imi::nearest_codeword_row<scalar_t>(dp + i * K, cn, norm, K, cp + i, sp + i);
        }
      });
    }
  });
  return {codes, sqdist};
}

}  // namespace

TORCH_LIBRARY_IMPL(imi_softmax, CPU, m) { m.impl("assign_codewords", &assign_codewords_cpu); }

}  // namespace imi_softmax
