// k-means assignment on CUDA: the caller computes dots = x @ C^T with cuBLAS; one thread per row
// runs the shared argmin body (imi::nearest_codeword_row), so ties resolve exactly as on the CPU.
#include "device_utils.cuh"
#include "launchers.h"

#include "imi_softmax/kmeans.h"

namespace imi_softmax {
namespace cuda {
namespace {

template <typename scalar_t>
__global__ void nearest_codeword_kernel(const scalar_t* __restrict__ dots,
                                        const scalar_t* __restrict__ c_sqnorm,
                                        const scalar_t* __restrict__ x_sqnorm, int64_t N, int64_t K,
                                        int64_t* __restrict__ codes, scalar_t* __restrict__ sqdist) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < N; i += stride)
    imi::nearest_codeword_row<scalar_t>(dots + i * K, c_sqnorm, x_sqnorm[i], K, codes + i, sqdist + i);
}

}  // namespace

template <typename scalar_t>
cudaError_t launch_nearest_codeword(const scalar_t* dots, const scalar_t* c_sqnorm,
                                    const scalar_t* x_sqnorm, int64_t N, int64_t K, int64_t* codes,
                                    scalar_t* sqdist, cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  constexpr int threads = 256;
  const int64_t blocks = ceil_div(N, threads) < 65536 ? ceil_div(N, threads) : 65536;
  nearest_codeword_kernel<scalar_t><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
      dots, c_sqnorm, x_sqnorm, N, K, codes, sqdist);
  return cudaGetLastError();
}

template cudaError_t launch_nearest_codeword<float>(const float*, const float*, const float*,
                                                    int64_t, int64_t, int64_t*, float*, cudaStream_t);
template cudaError_t launch_nearest_codeword<double>(const double*, const double*, const double*,
                                                     int64_t, int64_t, int64_t*, double*,
                                                     cudaStream_t);

}  // namespace cuda
}  // namespace imi_softmax
