// Index build on CUDA: cell id of every class, a stable radix sort of the classes by cell (cub;
// values start in ascending id order, so a cell lists its classes in ascending id exactly like
// the CPU counting sort), CSR offsets from a histogram + scan, then one thread per cell running
// the shared body imi::cell_log_mass_and_alias (the same sequential Vose construction as on the
// CPU, so the alias tables are the CPU's up to the last bit of exp/log).
#include <cub/cub.cuh>

#include "device_utils.cuh"
#include "launchers.h"

#include "imi_softmax/cells.h"

namespace imi_softmax {
namespace cuda {
namespace {

constexpr int kThreads = 256;

inline unsigned grid_for(int64_t n) {
  const int64_t b = ceil_div(n, kThreads);
  return static_cast<unsigned>(b < 65536 ? (b > 0 ? b : 1) : 65536);
}

// Number of bits that hold every value in [0, v]; at least 1 (cub needs end_bit > begin_bit).
inline int bits_for(int64_t v) {
  int bits = 1;
  while (bits < 63 && (int64_t(1) << bits) <= v) ++bits;
  return bits;
}

// Keys (cells < K*K <= 2^26) and values (class ids < N < 2^31) are int32: the index's class_ids are
// int32, and the sort moves half the bytes.
__global__ void cell_keys_kernel(const int32_t* __restrict__ code1, const int32_t* __restrict__ code2,
                                 int64_t N, int64_t K, int32_t* __restrict__ keys,
                                 int32_t* __restrict__ vals, unsigned long long* __restrict__ counts) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < N; i += stride) {
    const int64_t cell = imi::cell_of(code1, code2, i, K);
    keys[i] = static_cast<int32_t>(cell);
    vals[i] = static_cast<int32_t>(i);
    atomicAdd(counts + cell, 1ull);  // integer counts: order-independent, deterministic
  }
}

// One thread per cell: cells are independent, and each runs the sequential body.
__global__ void cell_mass_kernel(const int32_t* __restrict__ class_ids,
                                 const int64_t* __restrict__ offsets, const float* __restrict__ beta,
                                 int64_t KK, float* __restrict__ beta_csr, float* __restrict__ prob,
                                 int32_t* __restrict__ alias, int32_t* __restrict__ scratch,
                                 float* __restrict__ log_n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < KK; c += stride)
    log_n[c] = imi::cell_log_mass_and_alias(class_ids, offsets[c], offsets[c + 1], beta, beta_csr,
                                            prob, alias, scratch);
}

// One thread per cell again, after log_n_max is known: the float64 scaled masses of cells.h.
__global__ void cell_scaled_mass_kernel(const int64_t* __restrict__ offsets,
                                        const float* __restrict__ beta_csr,
                                        const float* __restrict__ log_n_max, int64_t KK,
                                        float* __restrict__ cell_mass) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const float lmax = *log_n_max;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < KK; c += stride)
    cell_mass[c] = imi::cell_scaled_mass(beta_csr, offsets[c], offsets[c + 1], lmax);
}

}  // namespace

cudaError_t launch_cell_scaled_mass(const int64_t* offsets, const float* beta_csr, const float* log_n_max,
                                    int64_t KK, float* cell_mass, cudaStream_t stream) {
  if (KK == 0) return cudaSuccess;
  cell_scaled_mass_kernel<<<grid_for(KK), kThreads, 0, stream>>>(offsets, beta_csr, log_n_max, KK, cell_mass);
  return cudaGetLastError();
}

size_t build_cells_temp_bytes(int64_t N, int64_t KK, cudaError_t* err) {
  size_t sort_bytes = 0, scan_bytes = 0;
  cudaError_t e = cub::DeviceRadixSort::SortPairs(
      nullptr, sort_bytes, static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr),
      static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr), N, 0, bits_for(KK - 1));
  if (e == cudaSuccess)
    e = cub::DeviceScan::InclusiveSum(nullptr, scan_bytes, static_cast<const int64_t*>(nullptr),
                                      static_cast<int64_t*>(nullptr), KK);
  if (err != nullptr) *err = e;
  return sort_bytes > scan_bytes ? sort_bytes : scan_bytes;
}

cudaError_t launch_build_cells(const int32_t* code1, const int32_t* code2, const float* beta,
                               int64_t N, int64_t K, int32_t* keys_in, int32_t* keys_out,
                               int32_t* vals_in, int64_t* counts, void* temp, size_t temp_bytes,
                               int64_t* offsets, int32_t* class_ids, float* alias_prob,
                               int32_t* alias_pos, float* beta_csr, int32_t* alias_scratch,
                               float* log_n, cudaStream_t stream) {
  const int64_t KK = K * K;
  cudaError_t e = cudaMemsetAsync(counts, 0, sizeof(int64_t) * KK, stream);
  if (e != cudaSuccess) return e;
  e = cudaMemsetAsync(offsets, 0, sizeof(int64_t), stream);  // offsets[0] = 0
  if (e != cudaSuccess) return e;
  if (N > 0) {
    cell_keys_kernel<<<grid_for(N), kThreads, 0, stream>>>(
        code1, code2, N, K, keys_in, vals_in, reinterpret_cast<unsigned long long*>(counts));
    e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    size_t bytes = temp_bytes;
    // Radix sort is stable: equal cells keep the ascending class order of vals_in.
    e = cub::DeviceRadixSort::SortPairs(temp, bytes, static_cast<const int32_t*>(keys_in), keys_out,
                                        static_cast<const int32_t*>(vals_in), class_ids, N, 0,
                                        bits_for(KK - 1), stream);
    if (e != cudaSuccess) return e;
  }
  size_t bytes = temp_bytes;
  e = cub::DeviceScan::InclusiveSum(temp, bytes, static_cast<const int64_t*>(counts), offsets + 1,
                                    KK, stream);
  if (e != cudaSuccess) return e;
  cell_mass_kernel<<<grid_for(KK), kThreads, 0, stream>>>(class_ids, offsets, beta, KK, beta_csr,
                                                          alias_prob, alias_pos, alias_scratch,
                                                          log_n);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace imi_softmax
