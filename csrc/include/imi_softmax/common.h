// Portability layer for the header-only kernel bodies: the same functions compile for the host
// (CPU backend, at::parallel_for loops) and for the device (CUDA kernels). No torch headers here.
#pragma once

#include <cstdint>
#include <cmath>
#include <cfloat>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define IMI_HD __host__ __device__ __forceinline__
#else
#define IMI_HD inline
#endif

// Host-side vectorization of float reductions (the order of a reduction is free in these loops).
#if !defined(__CUDACC__) && defined(_OPENMP)
#define IMI_PRAGMA(text) _Pragma(#text)
#define IMI_SIMD_SUM(var) IMI_PRAGMA(omp simd reduction(+ : var))
#else
#define IMI_SIMD_SUM(var)
#endif

// Host-side software prefetch of a row that a loop will read a few iterations later (the gathers
// of random weight rows are DRAM-latency bound); a no-op on the device.
#if !defined(__CUDA_ARCH__) && (defined(__GNUC__) || defined(__clang__))
#define IMI_PREFETCH(ptr) __builtin_prefetch(ptr)
#else
#define IMI_PREFETCH(ptr) ((void)0)
#endif

namespace imi {

// Accumulation type: fp32 for every storage type except fp64 (half/bf16 inputs accumulate in fp32).
template <typename T> struct acc_type { using type = float; };
template <> struct acc_type<double> { using type = double; };

IMI_HD float exp_(float v) { return expf(v); }
IMI_HD double exp_(double v) { return exp(v); }
IMI_HD float log_(float v) { return logf(v); }
IMI_HD double log_(double v) { return log(v); }

template <typename T> IMI_HD T neg_inf() { return -static_cast<T>(INFINITY); }
template <typename T> IMI_HD T max_(T a, T b) { return a > b ? a : b; }

// Online (streaming) logsumexp state: m is the running max, s the sum of exp(v - m).
template <typename T>
struct OnlineLSE {
  T m;
  T s;
  IMI_HD OnlineLSE() : m(neg_inf<T>()), s(T(0)) {}
  IMI_HD void add(T v) {
    if (v == neg_inf<T>()) return;
    if (v > m) {
      s = s * exp_(m - v) + T(1);
      m = v;
    } else {
      s += exp_(v - m);
    }
  }
  IMI_HD void merge(const OnlineLSE& o) {
    if (o.m == neg_inf<T>()) return;
    if (m == neg_inf<T>()) { m = o.m; s = o.s; return; }
    if (o.m > m) { s = s * exp_(m - o.m) + o.s; m = o.m; }
    else { s += o.s * exp_(o.m - m); }
  }
  IMI_HD T value() const { return m == neg_inf<T>() ? m : m + log_(s); }
};

}  // namespace imi
