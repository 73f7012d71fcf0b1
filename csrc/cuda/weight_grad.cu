// Weight/bias gradients from the per-column coefficients: grad_w[id] += coef[b,j] * x[b],
// grad_b[id] += coef[b,j] over the entries (b, j) of ids [B, M1] (ids outside [0, N) skipped).
// Two strategies:
//   * atomics: one block-row per entry, atomicAdd into an acc_t buffer. Fast to launch, but the
//     float summation order depends on scheduling (not bitwise reproducible).
//   * segmented (default): stable radix sort of the entries by class, run-length encode, then one
//     block-row per class run sums its entries in (b, j) order, the CPU's order: deterministic,
//     and no acc_t [N, d] buffer (rows are written once, already cast).
// The sparse op always uses the segmented path (it needs the sorted unique ids anyway).
#include <cub/cub.cuh>

#include "device_utils.cuh"
#include "launchers.h"

#include "imi_softmax/sampled_loss.h"

namespace imi_softmax {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGridX = int64_t(1) << 20;

inline int bits_for(int64_t v) {
  int bits = 1;
  while (bits < 63 && (int64_t(1) << bits) <= v) ++bits;
  return bits;
}

// Threads of a block-row cover a tile of the feature dimension; grid.y tiles d.
inline unsigned feature_threads(int64_t d) {
  const int64_t t = ceil_div(d, 32) * 32;
  return static_cast<unsigned>(t < 256 ? (t > 0 ? t : 32) : 256);
}

template <typename scalar_t>
__global__ void wgrad_atomic_kernel(const typename imi::acc_type<scalar_t>::type* __restrict__ coef,
                                    const int64_t* __restrict__ ids, const scalar_t* __restrict__ x,
                                    int64_t E, int64_t M1, int64_t d, int64_t N,
                                    typename imi::acc_type<scalar_t>::type* __restrict__ gw,
                                    typename imi::acc_type<scalar_t>::type* __restrict__ gb,
                                    int64_t* __restrict__ first_bad) {
  using acc_t = typename imi::acc_type<scalar_t>::type;
  const int64_t i = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  for (int64_t e = blockIdx.x; e < E; e += gridDim.x) {
    const int64_t id = ids[e];
    const acc_t c = coef[e];
    const imi::Entry use = imi::weight_grad_entry(id, c, N);
    if (use == imi::Entry::kBad && blockIdx.y == 0 && threadIdx.x == 0) imi::record_bad_position(first_bad, e);
    if (use != imi::Entry::kUse || c == acc_t(0)) continue;
    if (i < d) atomicAdd(gw + id * d + i, imi::weight_grad_term<scalar_t, acc_t>(c, x[(e / M1) * d + i]));
    if (blockIdx.y == 0 && threadIdx.x == 0) atomicAdd(gb + id, c);
  }
}

template <typename acc_t>
__global__ void segment_keys_kernel(const int64_t* __restrict__ ids, const acc_t* __restrict__ coef, int64_t E,
                                    int64_t N, int64_t* __restrict__ keys, int64_t* __restrict__ vals,
                                    int64_t* __restrict__ first_bad) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < E; e += stride) {
    const int64_t id = ids[e];
    const imi::Entry use = imi::weight_grad_entry(id, coef[e], N);
    if (use == imi::Entry::kBad) imi::record_bad_position(first_bad, e);
    keys[e] = use == imi::Entry::kUse ? id + 1 : 0;  // 0: skipped entries, sorted first
    vals[e] = e;
  }
}

template <typename scalar_t>
__global__ void segment_reduce_kernel(const typename imi::acc_type<scalar_t>::type* __restrict__ coef,
                                      const scalar_t* __restrict__ x, int64_t M1, int64_t d,
                                      const int64_t* __restrict__ sorted_entries,
                                      const int64_t* __restrict__ run_keys,
                                      const int64_t* __restrict__ run_counts,
                                      const int64_t* __restrict__ run_offsets,
                                      const int64_t* __restrict__ num_runs, bool dense,
                                      scalar_t* __restrict__ gw, scalar_t* __restrict__ gb) {
  using acc_t = typename imi::acc_type<scalar_t>::type;
  const int64_t R = *num_runs;
  const int64_t first = (R > 0 && run_keys[0] == 0) ? 1 : 0;
  const int64_t i = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  for (int64_t r = blockIdx.x; r < R; r += gridDim.x) {
    const int64_t key = run_keys[r];
    if (key == 0) continue;
    const int64_t row = dense ? key - 1 : r - first;
    const int64_t begin = run_offsets[r], end = begin + run_counts[r];
    if (i < d) {
      acc_t acc = acc_t(0);
      for (int64_t p = begin; p < end; ++p) {
        const int64_t e = sorted_entries[p];
        const acc_t c = coef[e];
        if (c == acc_t(0)) continue;
        acc += imi::weight_grad_term<scalar_t, acc_t>(c, x[(e / M1) * d + i]);
      }
      gw[row * d + i] = from_acc<scalar_t>(acc);
    }
    if (blockIdx.y == 0 && threadIdx.x == 0) {
      acc_t acc = acc_t(0);
      for (int64_t p = begin; p < end; ++p) {
        const acc_t c = coef[sorted_entries[p]];
        if (c == acc_t(0)) continue;
        acc += c;
      }
      gb[row] = from_acc<scalar_t>(acc);
    }
  }
}

__global__ void segment_info_kernel(const int64_t* __restrict__ run_keys,
                                    const int64_t* __restrict__ num_runs, int64_t* __restrict__ info) {
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    const int64_t R = *num_runs;
    const int64_t first = (R > 0 && run_keys[0] == 0) ? 1 : 0;
    info[0] = R - first;
    info[1] = first;
  }
}

__global__ void segment_unique_kernel(const int64_t* __restrict__ run_keys, int64_t first,
                                      int64_t U, int64_t* __restrict__ unique_ids) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; u < U; u += stride)
    unique_ids[u] = run_keys[first + u] - 1;
}

inline unsigned flat_grid(int64_t n) {
  const int64_t b = ceil_div(n, kThreads);
  return static_cast<unsigned>(b < 65536 ? (b > 0 ? b : 1) : 65536);
}

}  // namespace

template <typename scalar_t>
cudaError_t launch_weight_grad_atomic(const typename imi::acc_type<scalar_t>::type* coef,
                                      const int64_t* ids, const scalar_t* x, int64_t E, int64_t M1,
                                      int64_t d, int64_t num_classes,
                                      typename imi::acc_type<scalar_t>::type* grad_w_acc,
                                      typename imi::acc_type<scalar_t>::type* grad_b_acc,
                                      int64_t* first_bad, cudaStream_t stream) {
  if (E == 0) return cudaSuccess;
  const unsigned threads = feature_threads(d);
  const int64_t tiles = d > 0 ? ceil_div(d, threads) : 1;  // bias still needs a block when d == 0
  const dim3 grid(static_cast<unsigned>(E < kMaxGridX ? E : kMaxGridX),
                  static_cast<unsigned>(tiles));
  wgrad_atomic_kernel<scalar_t><<<grid, threads, 0, stream>>>(coef, ids, x, E, M1, d, num_classes,
                                                              grad_w_acc, grad_b_acc, first_bad);
  return cudaGetLastError();
}

size_t segment_temp_bytes(int64_t E, int64_t num_classes, cudaError_t* err) {
  size_t sort_bytes = 0, rle_bytes = 0, scan_bytes = 0;
  cudaError_t e = cub::DeviceRadixSort::SortPairs(
      nullptr, sort_bytes, static_cast<const int64_t*>(nullptr), static_cast<int64_t*>(nullptr),
      static_cast<const int64_t*>(nullptr), static_cast<int64_t*>(nullptr), E, 0,
      bits_for(num_classes));
  if (e == cudaSuccess)
    e = cub::DeviceRunLengthEncode::Encode(nullptr, rle_bytes, static_cast<const int64_t*>(nullptr),
                                           static_cast<int64_t*>(nullptr),
                                           static_cast<int64_t*>(nullptr),
                                           static_cast<int64_t*>(nullptr), static_cast<int>(E));
  if (e == cudaSuccess)
    e = cub::DeviceScan::ExclusiveSum(nullptr, scan_bytes, static_cast<const int64_t*>(nullptr),
                                      static_cast<int64_t*>(nullptr), E);
  if (err != nullptr) *err = e;
  size_t m = sort_bytes > rle_bytes ? sort_bytes : rle_bytes;
  return m > scan_bytes ? m : scan_bytes;
}

template <typename acc_t>
cudaError_t launch_segment_by_class(const int64_t* ids, const acc_t* coef, int64_t E, int64_t num_classes,
                                    int64_t* keys_in, int64_t* vals_in, int64_t* sorted_keys,
                                    int64_t* sorted_entries, int64_t* run_keys,
                                    int64_t* run_counts, int64_t* run_offsets, int64_t* num_runs,
                                    void* temp, size_t temp_bytes, int64_t* first_bad, cudaStream_t stream) {
  cudaError_t e = cudaMemsetAsync(num_runs, 0, sizeof(int64_t), stream);
  if (e != cudaSuccess || E == 0) return e;
  e = cudaMemsetAsync(run_counts, 0, sizeof(int64_t) * E, stream);
  if (e != cudaSuccess) return e;
  segment_keys_kernel<acc_t><<<flat_grid(E), kThreads, 0, stream>>>(ids, coef, E, num_classes, keys_in, vals_in,
                                                                    first_bad);
  e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  size_t bytes = temp_bytes;
  // Stable: entries of one class keep ascending entry order (b, then j).
  e = cub::DeviceRadixSort::SortPairs(temp, bytes, static_cast<const int64_t*>(keys_in), sorted_keys,
                                      static_cast<const int64_t*>(vals_in), sorted_entries, E, 0,
                                      bits_for(num_classes), stream);
  if (e != cudaSuccess) return e;
  bytes = temp_bytes;
  e = cub::DeviceRunLengthEncode::Encode(temp, bytes, static_cast<const int64_t*>(sorted_keys),
                                         run_keys, run_counts, num_runs, static_cast<int>(E),
                                         stream);
  if (e != cudaSuccess) return e;
  bytes = temp_bytes;
  return cub::DeviceScan::ExclusiveSum(temp, bytes, static_cast<const int64_t*>(run_counts),
                                       run_offsets, E, stream);
}

template <typename scalar_t>
cudaError_t launch_segment_reduce(const typename imi::acc_type<scalar_t>::type* coef,
                                  const scalar_t* x, int64_t M1, int64_t d,
                                  const int64_t* sorted_entries, const int64_t* run_keys,
                                  const int64_t* run_counts, const int64_t* run_offsets,
                                  const int64_t* num_runs, int64_t max_runs, bool dense,
                                  scalar_t* grad_w, scalar_t* grad_b, cudaStream_t stream) {
  if (max_runs == 0) return cudaSuccess;
  const unsigned threads = feature_threads(d);
  const int64_t tiles = d > 0 ? ceil_div(d, threads) : 1;  // bias still needs a block when d == 0
  const dim3 grid(static_cast<unsigned>(max_runs < kMaxGridX ? max_runs : kMaxGridX),
                  static_cast<unsigned>(tiles));
  segment_reduce_kernel<scalar_t><<<grid, threads, 0, stream>>>(
      coef, x, M1, d, sorted_entries, run_keys, run_counts, run_offsets, num_runs, dense, grad_w,
      grad_b);
  return cudaGetLastError();
}

cudaError_t launch_segment_info(const int64_t* run_keys, const int64_t* num_runs, int64_t* info,
                                cudaStream_t stream) {
  segment_info_kernel<<<1, 32, 0, stream>>>(run_keys, num_runs, info);
  return cudaGetLastError();
}

cudaError_t launch_segment_unique_ids(const int64_t* run_keys, int64_t first, int64_t U,
                                      int64_t* unique_ids, cudaStream_t stream) {
  if (U == 0) return cudaSuccess;
  segment_unique_kernel<<<flat_grid(U), kThreads, 0, stream>>>(run_keys, first, U, unique_ids);
  return cudaGetLastError();
}

#define IMI_INSTANTIATE_WGRAD(T)                                                                 \
  template cudaError_t launch_weight_grad_atomic<T>(                                             \
      const typename imi::acc_type<T>::type*, const int64_t*, const T*, int64_t, int64_t,        \
      int64_t, int64_t, typename imi::acc_type<T>::type*, typename imi::acc_type<T>::type*,      \
      int64_t*, cudaStream_t);                                                                   \
  template cudaError_t launch_segment_reduce<T>(                                                 \
      const typename imi::acc_type<T>::type*, const T*, int64_t, int64_t, const int64_t*,        \
      const int64_t*, const int64_t*, const int64_t*, const int64_t*, int64_t, bool, T*, T*,     \
      cudaStream_t);

IMI_INSTANTIATE_WGRAD(float)
IMI_INSTANTIATE_WGRAD(double)
IMI_INSTANTIATE_WGRAD(__half)
IMI_INSTANTIATE_WGRAD(__nv_bfloat16)
#undef IMI_INSTANTIATE_WGRAD

#define IMI_INSTANTIATE_SEGMENT(A)                                                                  \
  template cudaError_t launch_segment_by_class<A>(const int64_t*, const A*, int64_t, int64_t, int64_t*, \
                                                  int64_t*, int64_t*, int64_t*, int64_t*, int64_t*,    \
                                                  int64_t*, int64_t*, void*, size_t, int64_t*,         \
                                                  cudaStream_t);
IMI_INSTANTIATE_SEGMENT(float)
IMI_INSTANTIATE_SEGMENT(double)
#undef IMI_INSTANTIATE_SEGMENT

}  // namespace cuda
}  // namespace imi_softmax
