// Small CUDA-only helpers shared by the kernel files: storage <-> accumulation conversions that do
// not depend on cuda_fp16's implicit conversions (torch builds extensions with
// -D__CUDA_NO_HALF_CONVERSIONS__ / -D__CUDA_NO_BFLOAT16_CONVERSIONS__, which remove them), warp
// and block reductions, launch-size helpers. No torch headers.
#pragma once

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <cstdint>

#include "imi_softmax/common.h"

namespace imi_softmax {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;

// Storage -> accumulation type.
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

// Accumulation -> storage type (round to nearest even, like static_cast on the CPU side).
template <typename scalar_t> __device__ __forceinline__ scalar_t from_acc(float v);
template <typename scalar_t> __device__ __forceinline__ scalar_t from_acc(double v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Butterfly sum over the 32 lanes of a full warp. Every lane ends with the SAME bits: at each level
// a lane adds its partner's partial to its own and the partner does the reverse, and floating-point
// addition is commutative, so uniform control flow that depends on the result stays uniform.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = imi::max_(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// Max over a block whose size is a multiple of 32; `red` is shared scratch of >= 33 entries.
// Every thread of the block must call it; every thread gets the result.
template <typename T>
__device__ __forceinline__ T block_max(T v, T* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_max(v);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    T w = lane < nwarps ? red[lane] : imi::neg_inf<T>();
    w = warp_max(w);
    if (lane == 0) red[32] = w;
  }
  __syncthreads();
  const T out = red[32];
  __syncthreads();  // red may be reused right after
  return out;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace cuda
}  // namespace imi_softmax
