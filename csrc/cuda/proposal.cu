// MIDX proposal on CUDA: one block per query.
//   1. The per-query preparation of imi::query_prepare_table (proposal.h), split across the block:
//      the maxima of s1 and s2 (block_max: a max is exact in any order), the shifted scores and e2
//      per thread, one stage-2 row per thread (imi::stage2_row: the sequential k2 order of the
//      CPU's table, written to shared memory when it fits), the stage-1 weights per thread and ONE
//      thread for their cumulative sum (imi::stage1_cumulate). Same float operations, same order,
//      exp_poly/log_poly, and no FMA contraction (the bodies use the fmul_rn/fadd_rn intrinsics,
//      which --fmad=true does not fuse): the CPU's bits.
//   2. Without the table (K above ~200), stage 2 recomputes the drawn row per draw
//      (imi::stage2_search_streaming, same k2).
//   3. M draws, one thread each: imi::philox_draw of (query, draw) exactly as on the CPU,
//      imi::cdf_search (stages 1 and 2), imi::cell_slot + imi::resolve_alias (stage 3),
//      imi::drawn_log_q; then the targets' log Q (imi::target_log_q) from the same preparation.
#include "device_utils.cuh"
#include "launchers.h"

#include "imi_softmax/gpu_parallel.h"
#include "imi_softmax/philox.h"
#include "imi_softmax/proposal.h"

namespace imi_softmax {
namespace cuda {
namespace {

constexpr int kThreads = 128;      // multiple of 32 (block_max)
constexpr int kRedFloats = 64;     // block_max scratch (>= 33), keeps the table 16-byte aligned
constexpr size_t kDefaultSmem = 48 * 1024;

struct QueryShared {
  float* t1;
  float* t2;
  float* e2;
  float* r;
  float* cdf1;
  float* red;
  float* table;  // [K][K + 1] (padded row stride: no bank conflicts when thread k1 fills row k1)
};

__device__ __forceinline__ QueryShared carve(float* smem, int64_t K) {
  QueryShared q;
  q.t1 = smem;
  q.t2 = q.t1 + K;
  q.e2 = q.t2 + K;
  q.r = q.e2 + K;
  q.cdf1 = q.r + K;
  q.red = q.cdf1 + K;
  q.table = q.red + kRedFloats;
  return q;
}

inline size_t prep_smem_bytes(int64_t K) { return sizeof(float) * (5 * K + kRedFloats); }
inline size_t table_smem_bytes(int64_t K) { return prep_smem_bytes(K) + sizeof(float) * K * (K + 1); }

// The query preparation for query row (s1g, s2g), by the whole block; returns log Z' to every
// thread. On return q.t1, q.t2, q.e2, q.r and q.cdf1 hold what imi::query_prepare_table fills,
// and with table != nullptr row k1 of the stage-2 table at table + k1 * row_stride.
__device__ float block_query_prepare(const imi::CellIndex& ix, const float* __restrict__ s1g,
                                     const float* __restrict__ s2g, const QueryShared& q,
                                     float* table, int64_t row_stride) {
  const int64_t K = ix.K;
  float v1 = imi::neg_inf<float>(), v2 = imi::neg_inf<float>();
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    v1 = imi::max_(v1, s1g[k]);
    v2 = imi::max_(v2, s2g[k]);
  }
  const float m1 = block_max(v1, q.red);
  const float m2 = block_max(v2, q.red);
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    q.t1[k] = imi::shift_score(s1g[k], m1);
    q.t2[k] = imi::shift_score(s2g[k], m2);
    q.e2[k] = imi::exp_poly(q.t2[k]);
  }
  __syncthreads();
  for (int64_t k1 = threadIdx.x; k1 < K; k1 += blockDim.x)
    q.r[k1] = imi::stage2_row(ix, k1, q.t2, q.e2, table != nullptr ? table + k1 * row_stride : nullptr, 1);
  __syncthreads();
  float v = imi::neg_inf<float>();
  for (int64_t k1 = threadIdx.x; k1 < K; k1 += blockDim.x)
    v = imi::max_(v, imi::stage1_max_term(q.t1[k1], q.r[k1]));
  const float l1max = block_max(v, q.red);
  for (int64_t k1 = threadIdx.x; k1 < K; k1 += blockDim.x)
    q.cdf1[k1] = imi::stage1_weight(q.t1[k1], q.r[k1], l1max);
  __syncthreads();
  if (threadIdx.x == 0) q.red[0] = imi::stage1_cumulate(q.cdf1, K, l1max);
  __syncthreads();
  const float log_z = q.red[0];
  __syncthreads();  // q.red is reused by the next query's block_max
  return log_z;
}

template <bool kTable>
__global__ void __launch_bounds__(kThreads)
midx_sample_kernel(imi::CellIndex ix, const float* __restrict__ s1, const float* __restrict__ s2,
                   int64_t B, int64_t M, PhiloxArgs philox, int64_t* __restrict__ ids,
                   float* __restrict__ log_q, const int64_t* __restrict__ targets, int64_t L,
                   int64_t num_classes, float* __restrict__ target_log_q) {
  extern __shared__ float smem[];
  const int64_t K = ix.K;
  const QueryShared q = carve(smem, K);
  // Same (seed, offset) for every thread; graph-captured generators are read on the device
  // (what at::cuda::philox::unpack does). offset counts 32-bit outputs (imi::philox_block).
  uint64_t seed = philox.seed, offset = philox.offset;
  if (philox.captured) {
    seed = static_cast<uint64_t>(*philox.seed_ptr);
    offset = static_cast<uint64_t>(*philox.offset_ptr) + philox.offset_intragraph;
  }
  const int64_t row_stride = K + 1;
  const int64_t num_index_classes = ix.offsets[K * K];
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    const float log_z = block_query_prepare(ix, s1 + b * K, s2 + b * K, q, kTable ? q.table : nullptr,
                                            row_stride);
    for (int64_t j = threadIdx.x; j < M; j += blockDim.x) {
      const imi::PhiloxWords w = imi::philox_draw(seed, offset, static_cast<uint64_t>(b),
                                                  static_cast<uint64_t>(j));
      const int64_t k1 = imi::cdf_search(q.cdf1, K, imi::uniform24(w.w[0]));
      const float u1 = imi::uniform24(w.w[1]);
      const int64_t k2 = kTable ? imi::cdf_search(q.table + k1 * row_stride, K, u1)
                                : imi::stage2_search_streaming(ix, k1, q.t2, q.e2, q.r[k1], u1);
      const imi::SlotDraw d = imi::cell_slot(ix, k1 * K + k2, imi::random64(w.w[2], w.w[3]));
      const int64_t p = imi::resolve_alias(ix, k1 * K + k2, d);
      // id < 0: corrupt index or NaN scores; id -1 is rejected by every loss op (no device assert)
      const int64_t id = p < 0 ? int64_t(-1) : imi::drawn_class(ix, p, num_index_classes);
      ids[b * M + j] = id;
      log_q[b * M + j] = id < 0 ? nanf("")
                                : imi::drawn_log_q(ix, q.t1, q.t2, k1, k2, p, log_z);
    }
    for (int64_t l = threadIdx.x; l < L; l += blockDim.x)
      target_log_q[b * L + l] = imi::target_log_q(ix, q.t1, q.t2, targets[b * L + l], num_classes, log_z);
    __syncthreads();  // shared arrays are rewritten by the next query
  }
}

__global__ void __launch_bounds__(kThreads)
midx_log_prob_kernel(imi::CellIndex ix, const float* __restrict__ s1, const float* __restrict__ s2,
                     int64_t B, const int64_t* __restrict__ ids, int64_t L,
                     float* __restrict__ out) {
  extern __shared__ float smem[];
  const int64_t K = ix.K;
  const QueryShared q = carve(smem, K);
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    const float log_z = block_query_prepare(ix, s1 + b * K, s2 + b * K, q, nullptr, 0);
    for (int64_t l = threadIdx.x; l < L; l += blockDim.x)
      out[b * L + l] = imi::class_log_q(ix, q.t1, q.t2, ids[b * L + l], log_z);
    __syncthreads();
  }
}

inline unsigned query_grid(int64_t B) {
  return static_cast<unsigned>(B < 2147483647 ? B : 2147483647);
}

// Largest dynamic shared memory a block may opt into on the current device.
inline cudaError_t max_optin_smem(size_t* out) {
  int dev = 0, bytes = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  *out = e == cudaSuccess ? static_cast<size_t>(bytes) : kDefaultSmem;
  return e;
}

// Raises the kernel's dynamic shared-memory limit to the device's opt-in maximum (not to this call's
// size: the attribute is per process, and two threads sampling with different K would otherwise lower
// it under each other's launch; the limit reserves nothing).
template <typename Kernel>
inline cudaError_t allow_smem(Kernel kernel, size_t bytes, size_t optin) {
  if (bytes <= kDefaultSmem) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(optin));
}

}  // namespace

cudaError_t launch_midx_sample(const imi::CellIndex& ix, const float* s1, const float* s2,
                               int64_t B, int64_t M, PhiloxArgs philox, int stage2_mode,
                               int64_t* ids, float* log_q, const int64_t* targets, int64_t L,
                               int64_t num_classes, float* target_log_q, cudaStream_t stream) {
  if (B == 0 || (M == 0 && L == 0)) return cudaSuccess;
  size_t optin = kDefaultSmem;
  cudaError_t e = max_optin_smem(&optin);
  if (e != cudaSuccess) return e;
  const size_t table_bytes = table_smem_bytes(ix.K), prep_bytes = prep_smem_bytes(ix.K);
  const bool table = stage2_mode == 1 ? true : stage2_mode == 2 ? false : table_bytes <= optin;
  if (table) {
    if (table_bytes > optin) return cudaErrorInvalidValue;
    e = allow_smem(midx_sample_kernel<true>, table_bytes, optin);
    if (e != cudaSuccess) return e;
    midx_sample_kernel<true><<<query_grid(B), kThreads, table_bytes, stream>>>(
        ix, s1, s2, B, M, philox, ids, log_q, targets, L, num_classes, target_log_q);
  } else {
    if (prep_bytes > optin) return cudaErrorInvalidValue;
    e = allow_smem(midx_sample_kernel<false>, prep_bytes, optin);
    if (e != cudaSuccess) return e;
    midx_sample_kernel<false><<<query_grid(B), kThreads, prep_bytes, stream>>>(
        ix, s1, s2, B, M, philox, ids, log_q, targets, L, num_classes, target_log_q);
  }
  return cudaGetLastError();
}

cudaError_t midx_max_codewords(int64_t* out) {
  size_t optin = kDefaultSmem;
  const cudaError_t e = max_optin_smem(&optin);
  *out = (static_cast<int64_t>(optin / sizeof(float)) - kRedFloats) / 5;  // inverse of prep_smem_bytes
  return e;
}

cudaError_t launch_midx_log_prob(const imi::CellIndex& ix, const float* s1, const float* s2,
                                 int64_t B, const int64_t* ids, int64_t L, float* out,
                                 cudaStream_t stream) {
  if (B == 0 || L == 0) return cudaSuccess;
  size_t optin = kDefaultSmem;
  cudaError_t e = max_optin_smem(&optin);
  if (e != cudaSuccess) return e;
  const size_t bytes = prep_smem_bytes(ix.K);
  if (bytes > optin) return cudaErrorInvalidValue;
  e = allow_smem(midx_log_prob_kernel, bytes, optin);
  if (e != cudaSuccess) return e;
  midx_log_prob_kernel<<<query_grid(B), kThreads, bytes, stream>>>(ix, s1, s2, B, ids, L, out);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace imi_softmax
