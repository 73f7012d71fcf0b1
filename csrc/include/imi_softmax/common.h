// Portability layer for the header-only kernel bodies: the same functions compile for the host
// (CPU backend, at::parallel_for loops) and for the device (CUDA kernels). No torch headers here.
#pragma once

#include <cstdint>
#include <cmath>
#include <cfloat>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define IMI_HD __host__ __device__ __forceinline__
#define IMI_HD_FLATTEN IMI_HD
#elif defined(__GNUC__) || defined(__clang__)
#define IMI_HD inline
// Always inlined on the host, so that a caller compiled for a wider ISA vectorizes the body.
#define IMI_HD_FLATTEN inline __attribute__((always_inline))
#else
#define IMI_HD inline
#define IMI_HD_FLATTEN inline
#endif

// Host-side vectorization of float reductions (the order of a reduction is free in these loops;
// a max is exact in any order).
#if !defined(__CUDACC__) && defined(_OPENMP)
#define IMI_PRAGMA(text) _Pragma(#text)
#define IMI_SIMD_SUM(var) IMI_PRAGMA(omp simd reduction(+ : var))
#define IMI_SIMD_MAX(var) IMI_PRAGMA(omp simd reduction(max : var))
#else
#define IMI_SIMD_SUM(var)
#define IMI_SIMD_MAX(var)
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

// Branch-free exp and log for float loops that the host compiler should vectorize (libm calls
// block that). Cephes polynomials, within 2 ulp of expf/logf on the ranges used here.
#if defined(__CUDA_ARCH__)
IMI_HD_FLATTEN float bits_to_float(uint32_t b) { return __uint_as_float(b); }
IMI_HD_FLATTEN uint32_t float_to_bits(float f) { return __float_as_uint(f); }
#else
IMI_HD_FLATTEN float bits_to_float(uint32_t b) { return __builtin_bit_cast(float, b); }
IMI_HD_FLATTEN uint32_t float_to_bits(float f) { return __builtin_bit_cast(uint32_t, f); }
#endif

// Float operations that are never fused into an FMA. The proposal bodies (exp_poly, log_poly, the
// stage-2 table) are written with them so that the CPU and the CUDA kernels round identically: on
// the device the _rn intrinsics are never contracted (whatever --fmad says); on the host the
// callers are compiled without contraction (IMI_NO_FP_CONTRACT), where `a * b + c` stays two
// roundings.
#if defined(__CUDA_ARCH__)
IMI_HD_FLATTEN float fmul_rn(float a, float b) { return __fmul_rn(a, b); }
IMI_HD_FLATTEN float fadd_rn(float a, float b) { return __fadd_rn(a, b); }
IMI_HD_FLATTEN float fsub_rn(float a, float b) { return __fsub_rn(a, b); }
#else
IMI_HD_FLATTEN float fmul_rn(float a, float b) { return a * b; }
IMI_HD_FLATTEN float fadd_rn(float a, float b) { return a + b; }
IMI_HD_FLATTEN float fsub_rn(float a, float b) { return a - b; }
#endif

// Host functions that run the proposal bodies: no FMA contraction, also in the AVX-512 clones (GCC
// contracts `a + b * c` across statements there by default; its `optimize` attribute reaches the
// always-inlined bodies, see tests/cpp/gpu_mapping_check.cpp). Clang's default (fp-contract=on)
// only fuses within one expression, which the fmul_rn/fadd_rn calls never are; a build with
// -ffp-contract=fast or -ffast-math loses bitwise CPU/CUDA agreement.
#if !defined(__CUDACC__) && defined(__GNUC__) && !defined(__clang__)
#define IMI_NO_FP_CONTRACT __attribute__((optimize("fp-contract=off")))
#else
#define IMI_NO_FP_CONTRACT
#endif

// exp(x), exactly 0 below -87.3 (and for -inf and NaN), x clamped at 88.
IMI_HD_FLATTEN float exp_poly(float x) {
  float xc = x < 88.f ? x : 88.f;
  xc = xc > -87.3f ? xc : -87.3f;
  // n = floor(xc / ln 2 + 1/2) by truncating a positive number (no libm call: vectorizes).
  const int32_t ni = static_cast<int32_t>(fadd_rn(fmul_rn(xc, 1.44269504088896341f), 128.5f)) - 128;
  const float n = static_cast<float>(ni);
  const float r = fadd_rn(fsub_rn(xc, fmul_rn(n, 0.693359375f)), fmul_rn(n, 2.12194440e-4f));
  float p = 1.9875691500e-4f;
  p = fadd_rn(fmul_rn(p, r), 1.3981999507e-3f);
  p = fadd_rn(fmul_rn(p, r), 8.3334519073e-3f);
  p = fadd_rn(fmul_rn(p, r), 4.1665795894e-2f);
  p = fadd_rn(fmul_rn(p, r), 1.6666665459e-1f);
  p = fadd_rn(fmul_rn(p, r), 5.0000001201e-1f);
  const float y = fadd_rn(fadd_rn(fmul_rn(fmul_rn(p, r), r), r), 1.f);
  const float v = fmul_rn(y, bits_to_float(static_cast<uint32_t>(ni + 127) << 23));
  return x > -87.3f ? v : 0.f;
}

// log(x) for positive normal x (other inputs give an unspecified value: guard them).
IMI_HD_FLATTEN float log_poly(float x) {
  const uint32_t b = float_to_bits(x);
  float e = static_cast<float>(static_cast<int32_t>((b >> 23) & 0xffu) - 126);
  float m = bits_to_float((b & 0x807fffffu) | 0x3f000000u);  // [0.5, 1)
  const bool small = m < 0.707106781186547524f;
  e = small ? fsub_rn(e, 1.f) : e;
  m = small ? fsub_rn(fadd_rn(m, m), 1.f) : fsub_rn(m, 1.f);
  const float z = fmul_rn(m, m);
  float p = 7.0376836292e-2f;
  p = fsub_rn(fmul_rn(p, m), 1.1514610310e-1f);
  p = fadd_rn(fmul_rn(p, m), 1.1676998740e-1f);
  p = fsub_rn(fmul_rn(p, m), 1.2420140846e-1f);
  p = fadd_rn(fmul_rn(p, m), 1.4249322787e-1f);
  p = fsub_rn(fmul_rn(p, m), 1.6668057665e-1f);
  p = fadd_rn(fmul_rn(p, m), 2.0000714765e-1f);
  p = fsub_rn(fmul_rn(p, m), 2.4999993993e-1f);
  p = fadd_rn(fmul_rn(p, m), 3.3333331174e-1f);
  float y = fmul_rn(fmul_rn(m, z), p);
  y = fadd_rn(y, fmul_rn(-2.12194440e-4f, e));
  y = fadd_rn(y, fmul_rn(-0.5f, z));
  return fadd_rn(fadd_rn(m, y), fmul_rn(0.693359375f, e));
}

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
