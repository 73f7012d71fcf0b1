// The M draws of one query on the host, as passes over structure-of-arrays scratch: uniforms for
// all draws, then every stage-1 search, every stage-2 search, the slots, the gathers. Each pass is a
// short loop of independent iterations, so it vectorizes (AVX-512 or AVX2 where the CPU has them)
// or at least overlaps its latencies, which one long loop per draw does not.
//
// Three implementations of the first three passes give identical results: `portable` calls the
// shared header bodies (philox_draw, cdf_search, cdf_search_strided), `avx512` computes the same
// numbers 16 draws at a time and `avx2` 8 at a time: Philox on 16 (8) counters, and both searches
// as the same branchless halving as cdf_search (AVX-512 stage 1 with K <= 64 reading its CDF from
// registers, otherwise gathers). Stage 3 (cell_slot, resolve_alias) and the log Q are the header
// bodies for all three. No pass uses FMA: the draws would round differently from the portable
// passes and the CUDA kernels.
//
// The level is chosen per call (simd_choice): the widest the CPU has, or IMI_CPU_SIMD = portable
// (or 0), avx2, avx512 (auto or 1: the default). A level the CPU (or this build) lacks falls back to
// the widest it has, with a message the caller prints once, never an illegal instruction. Tests and
// benchmarks force each level on one machine.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "imi_softmax/proposal.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define IMI_HAVE_X86_PASSES 1
// Only these functions are compiled for the wider ISA (no -mavx2 / -mavx512f for the build), and
// the CPU is checked before any of them runs.
#define IMI_TARGET_AVX512 __attribute__((target("avx512f")))
#define IMI_TARGET_AVX2 __attribute__((target("avx2")))
#if defined(__linux__)
// Compiles the auto-vectorized loops once per ISA, picked at load time (one binary for every
// x86-64 machine).
#define IMI_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#else
#define IMI_HAVE_X86_PASSES 0
#endif
#ifndef IMI_CPU_CLONES
#define IMI_CPU_CLONES
#endif

namespace imi_softmax {
namespace draw {

// The widths of the draw passes, in the order of what a CPU supports.
enum class Simd : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

inline const char* simd_name(Simd level) {
  return level == Simd::kAvx512 ? "avx512" : level == Simd::kAvx2 ? "avx2" : "portable";
}

// The widest passes this CPU and this build can run.
inline Simd cpu_simd() {
#if IMI_HAVE_X86_PASSES
  static const Simd best = __builtin_cpu_supports("avx512f") ? Simd::kAvx512
                           : __builtin_cpu_supports("avx2") ? Simd::kAvx2
                                                            : Simd::kPortable;
  return best;
#else
  return Simd::kPortable;
#endif
}

// The passes a call runs and, when IMI_CPU_SIMD asked for something else, why (null otherwise):
// the caller prints that once. IMI_CPU_SIMD is read on every call, so tests switch it in-process.
struct SimdChoice {
  Simd level;
  const char* problem;
};

inline SimdChoice simd_choice() {
  const Simd best = cpu_simd();
  const char* env = std::getenv("IMI_CPU_SIMD");
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, "auto") == 0 || std::strcmp(env, "1") == 0)
    return {best, nullptr};
  Simd want;
  if (std::strcmp(env, "portable") == 0 || std::strcmp(env, "0") == 0)
    want = Simd::kPortable;
  else if (std::strcmp(env, "avx2") == 0)
    want = Simd::kAvx2;
  else if (std::strcmp(env, "avx512") == 0)
    want = Simd::kAvx512;
  else
    return {best, "IMI_CPU_SIMD must be one of auto (or 1), portable (or 0), avx2, avx512; the value set is "
                  "not one of them, so the widest draw passes this CPU supports are used"};
  if (static_cast<int>(want) > static_cast<int>(best))
    return {best, best == Simd::kAvx2
                      ? "IMI_CPU_SIMD asks for AVX-512 draw passes, which this CPU (or build) lacks: using the "
                        "AVX2 passes (the same draws)"
                      : "IMI_CPU_SIMD asks for vectorized draw passes that this CPU (or build) lacks: using the "
                        "portable passes (the same draws)"};
  return {want, nullptr};
}

// The level alone, the problem printed to stderr once per process (for programs without torch;
// the torch ops warn through TORCH_WARN_ONCE instead).
inline Simd simd_level() {
  const SimdChoice c = simd_choice();
  static std::atomic<bool> told{false};
  if (c.problem != nullptr && !told.exchange(true)) std::fprintf(stderr, "imi_softmax: %s\n", c.problem);
  return c.level;
}

// Per-thread scratch for one query at a time (sized once per parallel chunk).
// u0, u1: stage-1/2 uniforms; w2, w3: the slot's 64 random bits; u_accept: alias acceptance.
struct Scratch {
  Simd level;
  std::vector<float> mass_t, cdf_t, t1, t2, e2, r, cdf1, u0, u1, u_accept;
  std::vector<uint32_t> w2, w3;
  std::vector<int32_t> k1, k2;
  std::vector<int64_t> pos;
  Scratch(const imi::CellIndex& ix, int64_t M, Simd level_)
      : level(level_), mass_t(ix.K * ix.K), cdf_t(ix.K * ix.K), t1(ix.K), t2(ix.K), e2(ix.K), r(ix.K),
        cdf1(ix.K), u0(M), u1(M), u_accept(M), w2(M), w3(M), k1(M), k2(M), pos(M) {
    const int64_t K = ix.K;
    for (int64_t a = 0; a < K; ++a)
      for (int64_t b = 0; b < K; ++b) mass_t[b * K + a] = ix.cell_mass[a * K + b];
  }
  float prepare(const imi::CellIndex& ix, const float* s1, const float* s2);
};

// log Z' of the query (proposal.h); fills t1, t2, e2, r, cdf1 and the transposed stage-2 table.
// Compiled once per level: the table and the exp/log loops are most of a query's preparation and
// vectorize. Never FMA-contracted, so every version (and the CUDA kernel) rounds the same way: the
// loops are elementwise, their reductions maxima, and the cumulative sums sequential.
#define IMI_PREPARE_QUERY_BODY \
  { return imi::query_prepare_table(ix, mass_t, s1, s2, t1, t2, e2, r, cdf1, cdf_t); }
#define IMI_PREPARE_QUERY_ARGS                                                                            \
  (const imi::CellIndex& ix, const float* mass_t, const float* s1, const float* s2, float* t1, float* t2, \
   float* e2, float* r, float* cdf1, float* cdf_t)
IMI_NO_FP_CONTRACT inline float prepare_query_portable IMI_PREPARE_QUERY_ARGS IMI_PREPARE_QUERY_BODY
#if IMI_HAVE_X86_PASSES
IMI_TARGET_AVX2 IMI_NO_FP_CONTRACT inline float prepare_query_avx2 IMI_PREPARE_QUERY_ARGS IMI_PREPARE_QUERY_BODY
IMI_TARGET_AVX512 IMI_NO_FP_CONTRACT inline float prepare_query_avx512 IMI_PREPARE_QUERY_ARGS IMI_PREPARE_QUERY_BODY
#endif
#undef IMI_PREPARE_QUERY_BODY
#undef IMI_PREPARE_QUERY_ARGS

inline float Scratch::prepare(const imi::CellIndex& ix, const float* s1, const float* s2) {
#if IMI_HAVE_X86_PASSES
  if (level == Simd::kAvx512)
    return prepare_query_avx512(ix, mass_t.data(), s1, s2, t1.data(), t2.data(), e2.data(), r.data(),
                                cdf1.data(), cdf_t.data());
  if (level == Simd::kAvx2)
    return prepare_query_avx2(ix, mass_t.data(), s1, s2, t1.data(), t2.data(), e2.data(), r.data(),
                              cdf1.data(), cdf_t.data());
#endif
  return prepare_query_portable(ix, mass_t.data(), s1, s2, t1.data(), t2.data(), e2.data(), r.data(),
                                cdf1.data(), cdf_t.data());
}

namespace portable {

// Draws j0 .. j0+n-1 of a call at `offset` (32-bit outputs, philox_block).
IMI_CPU_CLONES inline void uniforms(uint64_t seed, uint64_t offset, uint64_t query, int64_t j0,
                                    int64_t n, float* u0, float* u1, uint32_t* w2, uint32_t* w3) {
  for (int64_t j = 0; j < n; ++j) {
    const imi::PhiloxWords w = imi::philox_draw(seed, offset, query, static_cast<uint64_t>(j0 + j));
    u0[j] = imi::uniform24(w.w[0]);
    u1[j] = imi::uniform24(w.w[1]);
    w2[j] = w.w[2];
    w3[j] = w.w[3];
  }
}

inline void stage1(const float* cdf1, int64_t K, const float* u, int32_t* k1, int64_t n) {
  for (int64_t j = 0; j < n; ++j) k1[j] = static_cast<int32_t>(imi::cdf_search(cdf1, K, u[j]));
}

inline void stage2(const float* cdf_t, int64_t K, const int32_t* k1, const float* u, int32_t* k2,
                   int64_t n) {
  for (int64_t j = 0; j < n; ++j)
    k2[j] = static_cast<int32_t>(imi::cdf_search_strided(cdf_t + k1[j], K, K, u[j]));
}

// Draws j0 .. j0+n-1 of a search (the vector passes' tails): draw j searches the length-n CDF at
// cdf + column[j] (column null: cdf itself) read with `stride`.
inline void search_tail(const float* cdf, int64_t n, int64_t stride, const int32_t* column, const float* u,
                        int32_t* out, int64_t j0, int64_t count) {
  for (int64_t j = j0; j < count; ++j)
    out[j] = static_cast<int32_t>(imi::cdf_search_strided(cdf + (column != nullptr ? column[j] : 0), n, stride, u[j]));
}

}  // namespace portable

#if IMI_HAVE_X86_PASSES
// The search result is the first entry above the target, which has mass, except when rounding put
// the target at the total (lanes in `at_total`): those step back over trailing zero-mass entries.
// cdf + column[lane] (column may be null) is read with `stride`.
inline void skip_empty_lanes(uint32_t at_total, const float* cdf, int64_t stride, const int32_t* column,
                             int32_t* out) {
  for (; at_total != 0; at_total &= at_total - 1) {
    const int lane = __builtin_ctz(at_total);
    out[lane] = imi::skip_zero_mass(cdf + (column ? column[lane] : 0), stride, out[lane]);
  }
}

// The step of cdf_search's halving moves where NOT (entry > target): compared with _CMP_NGT_UQ,
// which is also true for NaN (NaN scores), as the scalar `>` is false there.
#define IMI_CMP_MOVES _CMP_NGT_UQ

// GCC 12 warns about the self-initialized pass-through of its own AVX-512 intrinsics (GCC bug
// 105593, fixed in 13) wherever they are inlined: a false positive.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
namespace avx512 {

// uniform24 on 16 lanes.
IMI_TARGET_AVX512 inline __m512 to_uniform(__m512i bits) {
  return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(bits, 8)), _mm512_set1_ps(1.0f / 16777216.0f));
}

IMI_TARGET_AVX512 inline void uniforms(uint64_t seed, uint64_t offset, uint64_t query, int64_t n,
                                       float* u0, float* u1, uint32_t* w2, uint32_t* w3) {
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(0xCD9E8D57u));
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const uint64_t c = imi::philox_block(offset, static_cast<uint64_t>(j));
    const __m512i lo = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(c)));
    const __m512i hi = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(c >> 32)));
    __m512i c0 = _mm512_add_epi32(lo, lane);  // 64-bit counter c + lane: carry into the high word
    __m512i c1 = _mm512_mask_add_epi32(hi, _mm512_cmplt_epu32_mask(c0, lo), hi, _mm512_set1_epi32(1));
    __m512i c2 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(query)));
    __m512i c3 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(query >> 32)));
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      // 32x32 -> 64-bit products of the even lanes and of the odd lanes, then split into hi/lo.
      const __m512i pe0 = _mm512_mul_epu32(c0, m0), po0 = _mm512_mul_epu32(_mm512_srli_epi64(c0, 32), m0);
      const __m512i pe1 = _mm512_mul_epu32(c2, m1), po1 = _mm512_mul_epu32(_mm512_srli_epi64(c2, 32), m1);
      const __m512i lo0 = _mm512_mask_blend_epi32(0xAAAA, pe0, _mm512_slli_epi64(po0, 32));
      const __m512i hi0 = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(pe0, 32), po0);
      const __m512i lo1 = _mm512_mask_blend_epi32(0xAAAA, pe1, _mm512_slli_epi64(po1, 32));
      const __m512i hi1 = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(pe1, 32), po1);
      c0 = _mm512_xor_si512(_mm512_xor_si512(hi1, c1), _mm512_set1_epi32(static_cast<int>(k0)));
      c2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c3), _mm512_set1_epi32(static_cast<int>(k1)));
      c1 = lo1;
      c3 = lo0;
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    _mm512_storeu_ps(u0 + j, to_uniform(c0));
    _mm512_storeu_ps(u1 + j, to_uniform(c1));
    _mm512_storeu_si512(w2 + j, c2);
    _mm512_storeu_si512(w3 + j, c3);
  }
  if (j < n) portable::uniforms(seed, offset, query, j, n - j, u0 + j, u1 + j, w2 + j, w3 + j);
}

// Entries at..at+15 of a length-n array, zeros past n.
IMI_TARGET_AVX512 inline __m512 load16(const float* a, int64_t n, int64_t at) {
  const int64_t left = n - at;
  const __mmask16 m = left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1u);
  return _mm512_maskz_loadu_ps(m, a + (at < n ? at : 0));
}

// K <= 64: the whole stage-1 CDF sits in four registers, and the branchless halving of cdf_search
// reads it with permutes (16 draws per step).
IMI_TARGET_AVX512 inline void stage1_in_registers(const float* cdf1, int64_t K, const float* u, int32_t* k1,
                                                  int64_t n) {
  const __m512 c0 = load16(cdf1, K, 0), c1 = load16(cdf1, K, 16), c2 = load16(cdf1, K, 32),
               c3 = load16(cdf1, K, 48);
  const __m512 total = _mm512_set1_ps(cdf1[K - 1]);
  const __m512i bit5 = _mm512_set1_epi32(32);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512 target = _mm512_mul_ps(_mm512_loadu_ps(u + j), total);
    __m512i base = _mm512_setzero_si512();
    for (int64_t len = K; len > 1;) {
      const int64_t half = len >> 1;
      const __m512i at = _mm512_add_epi32(base, _mm512_set1_epi32(static_cast<int>(half - 1)));
      const __m512 low = _mm512_permutex2var_ps(c0, at, c1);    // index bits 0-4 (+ bit 4 picks c1)
      const __m512 high = _mm512_permutex2var_ps(c2, at, c3);
      const __m512 v = _mm512_mask_blend_ps(_mm512_test_epi32_mask(at, bit5), low, high);
      const __mmask16 move = _mm512_cmp_ps_mask(v, target, IMI_CMP_MOVES);
      base = _mm512_mask_add_epi32(base, move, base, _mm512_set1_epi32(static_cast<int>(half)));
      len -= half;
    }
    _mm512_storeu_si512(k1 + j, base);
    skip_empty_lanes(_mm512_cmp_ps_mask(target, total, _CMP_GE_OQ), cdf1, 1, nullptr, k1 + j);
  }
  portable::search_tail(cdf1, K, 1, nullptr, u, k1, j, n);
}

// A 16-lane gather of floats (the masked form: the plain one leaves GCC 12 warning about its
// unused pass-through operand).
IMI_TARGET_AVX512 inline __m512 gather16(const float* base, __m512i index) {
  return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), __mmask16(0xFFFF), index, base, 4);
}

// The branchless halving of cdf_search_strided via gathers: draw j searches the length-n CDF at
// cdf + column[j] read with `stride` (column null: every draw searches cdf itself). 64 draws per
// iteration as four independent 16-lane searches, so that the gathers of one overlap the latency
// chains of the others (stage 2 at N = 1M, K = 64 on AMD Zen 4: 1.19 us a query with one chain,
// 0.83 with two, 0.75 with four; bench/draw_passes_timing.cpp).
template <int kVectors>
IMI_TARGET_AVX512 inline void halving_search_block(const float* cdf, int32_t len0, int32_t step,
                                                   const int32_t* column, const float* u, int32_t* out) {
  __m512 total[kVectors], target[kVectors];
  __m512i at[kVectors], base[kVectors];
  for (int q = 0; q < kVectors; ++q) {
    at[q] = column != nullptr ? _mm512_loadu_si512(column + 16 * q) : _mm512_setzero_si512();  // base * stride + column
    total[q] = gather16(cdf, _mm512_add_epi32(at[q], _mm512_set1_epi32((len0 - 1) * step)));
    target[q] = _mm512_mul_ps(_mm512_loadu_ps(u + 16 * q), total[q]);
    base[q] = _mm512_setzero_si512();
  }
  for (int32_t len = len0; len > 1;) {
    const int32_t half = len >> 1;
    const __m512i probe = _mm512_set1_epi32((half - 1) * step), jump = _mm512_set1_epi32(half * step),
                  add = _mm512_set1_epi32(half);
    for (int q = 0; q < kVectors; ++q) {
      const __m512 v = gather16(cdf, _mm512_add_epi32(at[q], probe));
      const __mmask16 move = _mm512_cmp_ps_mask(v, target[q], IMI_CMP_MOVES);
      at[q] = _mm512_mask_add_epi32(at[q], move, at[q], jump);
      base[q] = _mm512_mask_add_epi32(base[q], move, base[q], add);
    }
    len -= half;
  }
  for (int q = 0; q < kVectors; ++q) {
    _mm512_storeu_si512(out + 16 * q, base[q]);
    skip_empty_lanes(_mm512_cmp_ps_mask(target[q], total[q], _CMP_GE_OQ), cdf, step,
                     column != nullptr ? column + 16 * q : nullptr, out + 16 * q);
  }
}

IMI_TARGET_AVX512 inline void halving_search(const float* cdf, int64_t n, int64_t stride,
                                             const int32_t* column, const float* u, int32_t* out,
                                             int64_t count) {
  const int32_t len0 = static_cast<int32_t>(n), step = static_cast<int32_t>(stride);
  int64_t j = 0;
  for (; j + 64 <= count; j += 64)
    halving_search_block<4>(cdf, len0, step, column != nullptr ? column + j : nullptr, u + j, out + j);
  for (; j + 16 <= count; j += 16)
    halving_search_block<1>(cdf, len0, step, column != nullptr ? column + j : nullptr, u + j, out + j);
  portable::search_tail(cdf, n, stride, column, u, out, j, count);
}

IMI_TARGET_AVX512 inline void stage1(const float* cdf1, int64_t K, const float* u, int32_t* k1, int64_t n) {
  if (K <= 64)
    stage1_in_registers(cdf1, K, u, k1, n);
  else
    halving_search(cdf1, K, 1, nullptr, u, k1, n);
}

IMI_TARGET_AVX512 inline void stage2(const float* cdf_t, int64_t K, const int32_t* k1, const float* u,
                                     int32_t* k2, int64_t n) {
  halving_search(cdf_t, K, K, k1, u, k2, n);
}

}  // namespace avx512
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

namespace avx2 {

// uniform24 on 8 lanes.
IMI_TARGET_AVX2 inline __m256 to_uniform(__m256i bits) {
  return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(bits, 8)), _mm256_set1_ps(1.0f / 16777216.0f));
}

// One Philox round on 8 counters: the 32x32 -> 64-bit products of the even and the odd lanes,
// split into hi/lo words.
IMI_TARGET_AVX2 inline void philox_round(__m256i& c0, __m256i& c1, __m256i& c2, __m256i& c3, uint32_t k0,
                                         uint32_t k1) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  const __m256i pe0 = _mm256_mul_epu32(c0, m0), po0 = _mm256_mul_epu32(_mm256_srli_epi64(c0, 32), m0);
  const __m256i pe1 = _mm256_mul_epu32(c2, m1), po1 = _mm256_mul_epu32(_mm256_srli_epi64(c2, 32), m1);
  const __m256i lo0 = _mm256_blend_epi32(pe0, _mm256_slli_epi64(po0, 32), 0xAA);
  const __m256i hi0 = _mm256_blend_epi32(_mm256_srli_epi64(pe0, 32), po0, 0xAA);
  const __m256i lo1 = _mm256_blend_epi32(pe1, _mm256_slli_epi64(po1, 32), 0xAA);
  const __m256i hi1 = _mm256_blend_epi32(_mm256_srli_epi64(pe1, 32), po1, 0xAA);
  c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
  c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
  c1 = lo1;
  c3 = lo0;
}

// The counters (c + lane, query) of 8 consecutive draws from block c: the low word c + lane may
// wrap, then the high word gains the carry (no unsigned compare on AVX2: compare with the sign
// bits flipped).
IMI_TARGET_AVX2 inline void philox_counters(uint64_t c, uint64_t query, __m256i& c0, __m256i& c1, __m256i& c2,
                                            __m256i& c3) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  const __m256i lo = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(c)));
  const __m256i hi = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(c >> 32)));
  c0 = _mm256_add_epi32(lo, lane);
  const __m256i wrapped = _mm256_cmpgt_epi32(_mm256_xor_si256(lo, sign), _mm256_xor_si256(c0, sign));
  c1 = _mm256_sub_epi32(hi, wrapped);  // wrapped lanes are -1
  c2 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(query)));
  c3 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(query >> 32)));
}

IMI_TARGET_AVX2 inline void store_words(int64_t j, __m256i c0, __m256i c1, __m256i c2, __m256i c3, float* u0,
                                        float* u1, uint32_t* w2, uint32_t* w3) {
  _mm256_storeu_ps(u0 + j, to_uniform(c0));
  _mm256_storeu_ps(u1 + j, to_uniform(c1));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(w2 + j), c2);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(w3 + j), c3);
}

// 16 draws per iteration as two independent 8-lane streams (the rounds are a dependency chain:
// two of them keep the multipliers busy), then 8, then the portable tail.
IMI_TARGET_AVX2 inline void uniforms(uint64_t seed, uint64_t offset, uint64_t query, int64_t n, float* u0,
                                     float* u1, uint32_t* w2, uint32_t* w3) {
  const uint32_t key0 = static_cast<uint32_t>(seed), key1 = static_cast<uint32_t>(seed >> 32);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    __m256i a0, a1, a2, a3, b0, b1, b2, b3;
    philox_counters(imi::philox_block(offset, static_cast<uint64_t>(j)), query, a0, a1, a2, a3);
    philox_counters(imi::philox_block(offset, static_cast<uint64_t>(j + 8)), query, b0, b1, b2, b3);
    uint32_t k0 = key0, k1 = key1;
    for (int round = 0; round < 10; ++round) {
      philox_round(a0, a1, a2, a3, k0, k1);
      philox_round(b0, b1, b2, b3, k0, k1);
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    store_words(j, a0, a1, a2, a3, u0, u1, w2, w3);
    store_words(j + 8, b0, b1, b2, b3, u0, u1, w2, w3);
  }
  for (; j + 8 <= n; j += 8) {
    __m256i a0, a1, a2, a3;
    philox_counters(imi::philox_block(offset, static_cast<uint64_t>(j)), query, a0, a1, a2, a3);
    uint32_t k0 = key0, k1 = key1;
    for (int round = 0; round < 10; ++round) {
      philox_round(a0, a1, a2, a3, k0, k1);
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    store_words(j, a0, a1, a2, a3, u0, u1, w2, w3);
  }
  if (j < n) portable::uniforms(seed, offset, query, j, n - j, u0 + j, u1 + j, w2 + j, w3 + j);
}

IMI_TARGET_AVX2 inline __m256 gather8(const float* base, __m256i index) {
  return _mm256_i32gather_ps(base, index, 4);
}

// The branchless halving of cdf_search_strided via gathers: draw j searches the length-n CDF at
// cdf + column[j] read with `stride` (column null: every draw searches cdf itself). 32 draws per
// iteration as four independent 8-lane searches, so that the gathers of one overlap the latency
// chains of the others (stage 2 on AMD Zen 4: 0.95 us a query with two chains, 0.74 with four).
// The lanes that move add `half` (and half * stride) under the comparison's all-ones mask.
template <int kVectors>
IMI_TARGET_AVX2 inline void halving_search_block(const float* cdf, int32_t len0, int32_t step,
                                                 const int32_t* column, const float* u, int32_t* out) {
  __m256 total[kVectors], target[kVectors];
  __m256i at[kVectors], base[kVectors];
  for (int q = 0; q < kVectors; ++q) {
    at[q] = column != nullptr ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(column + 8 * q))
                              : _mm256_setzero_si256();  // at = base * stride + column
    total[q] = gather8(cdf, _mm256_add_epi32(at[q], _mm256_set1_epi32((len0 - 1) * step)));
    target[q] = _mm256_mul_ps(_mm256_loadu_ps(u + 8 * q), total[q]);
    base[q] = _mm256_setzero_si256();
  }
  for (int32_t len = len0; len > 1;) {
    const int32_t half = len >> 1;
    const __m256i probe = _mm256_set1_epi32((half - 1) * step), jump = _mm256_set1_epi32(half * step),
                  add = _mm256_set1_epi32(half);
    for (int q = 0; q < kVectors; ++q) {
      const __m256 v = gather8(cdf, _mm256_add_epi32(at[q], probe));
      const __m256i move = _mm256_castps_si256(_mm256_cmp_ps(v, target[q], IMI_CMP_MOVES));
      at[q] = _mm256_add_epi32(at[q], _mm256_and_si256(move, jump));
      base[q] = _mm256_add_epi32(base[q], _mm256_and_si256(move, add));
    }
    len -= half;
  }
  for (int q = 0; q < kVectors; ++q) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 8 * q), base[q]);
    skip_empty_lanes(static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(target[q], total[q], _CMP_GE_OQ))),
                     cdf, step, column != nullptr ? column + 8 * q : nullptr, out + 8 * q);
  }
}

IMI_TARGET_AVX2 inline void halving_search(const float* cdf, int64_t n, int64_t stride, const int32_t* column,
                                           const float* u, int32_t* out, int64_t count) {
  const int32_t len0 = static_cast<int32_t>(n), step = static_cast<int32_t>(stride);
  int64_t j = 0;
  for (; j + 32 <= count; j += 32)
    halving_search_block<4>(cdf, len0, step, column != nullptr ? column + j : nullptr, u + j, out + j);
  for (; j + 8 <= count; j += 8)
    halving_search_block<1>(cdf, len0, step, column != nullptr ? column + j : nullptr, u + j, out + j);
  portable::search_tail(cdf, n, stride, column, u, out, j, count);
}

// K <= 64: the halving of cdf_search reads, at step s, one of at most 2^s entries of the stage-1 CDF,
// chosen by the lane's decisions so far (m, bit i = moved at step i), since the lengths of the
// steps do not depend on the decisions. Those entries are laid out per step (tab[s][m]) once per
// query, and each step reads its table from registers with permutes: no gathers (8 draws a step).
IMI_TARGET_AVX2 inline void stage1_in_registers(const float* cdf1, int64_t K, const float* u, int32_t* k1,
                                                int64_t n) {
  alignas(32) float tab[6][32] = {};
  int32_t halves[6];
  int steps = 0;
  for (int64_t len = K; len > 1; len -= len >> 1) {
    const int32_t half = static_cast<int32_t>(len >> 1);
    for (int32_t m = 0; m < (1 << steps); ++m) {
      int32_t base = 0;
      for (int i = 0; i < steps; ++i) base += ((m >> i) & 1) * halves[i];
      tab[steps][m] = cdf1[base + half - 1];
    }
    halves[steps++] = half;
  }
  __m256 reg[6][4];
  for (int s = 0; s < steps; ++s)
    for (int r = 0; r < 4; ++r) reg[s][r] = _mm256_load_ps(tab[s] + 8 * r);
  const __m256 total = _mm256_set1_ps(cdf1[K - 1]);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 target = _mm256_mul_ps(_mm256_loadu_ps(u + j), total);
    __m256i m = _mm256_setzero_si256(), base = _mm256_setzero_si256();
    for (int s = 0; s < steps; ++s) {
      __m256 v = _mm256_permutevar8x32_ps(reg[s][0], m);  // the low 3 bits of m pick the lane
      if (s >= 4) {  // bit 3 of m picks the register of a pair, bit 4 the pair
        const __m256 bit3 = _mm256_castsi256_ps(_mm256_slli_epi32(m, 28));
        v = _mm256_blendv_ps(v, _mm256_permutevar8x32_ps(reg[s][1], m), bit3);
        if (s >= 5) {
          const __m256 w = _mm256_blendv_ps(_mm256_permutevar8x32_ps(reg[s][2], m),
                                            _mm256_permutevar8x32_ps(reg[s][3], m), bit3);
          v = _mm256_blendv_ps(v, w, _mm256_castsi256_ps(_mm256_slli_epi32(m, 27)));
        }
      }
      const __m256i move = _mm256_castps_si256(_mm256_cmp_ps(v, target, IMI_CMP_MOVES));
      m = _mm256_add_epi32(m, _mm256_and_si256(move, _mm256_set1_epi32(1 << s)));
      base = _mm256_add_epi32(base, _mm256_and_si256(move, _mm256_set1_epi32(halves[s])));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(k1 + j), base);
    skip_empty_lanes(static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(target, total, _CMP_GE_OQ))), cdf1,
                     1, nullptr, k1 + j);
  }
  portable::search_tail(cdf1, K, 1, nullptr, u, k1, j, n);
}

IMI_TARGET_AVX2 inline void stage1(const float* cdf1, int64_t K, const float* u, int32_t* k1, int64_t n) {
  if (K <= 64)
    stage1_in_registers(cdf1, K, u, k1, n);
  else
    halving_search(cdf1, K, 1, nullptr, u, k1, n);
}

IMI_TARGET_AVX2 inline void stage2(const float* cdf_t, int64_t K, const int32_t* k1, const float* u,
                                   int32_t* k2, int64_t n) {
  halving_search(cdf_t, K, K, k1, u, k2, n);
}

}  // namespace avx2
#undef IMI_CMP_MOVES
#endif  // IMI_HAVE_X86_PASSES

// The first three passes at a level (the level must be one simd_choice returned).
inline void uniforms(Simd level, uint64_t seed, uint64_t offset, uint64_t query, int64_t n, float* u0, float* u1,
                     uint32_t* w2, uint32_t* w3) {
#if IMI_HAVE_X86_PASSES
  if (level == Simd::kAvx512) return avx512::uniforms(seed, offset, query, n, u0, u1, w2, w3);
  if (level == Simd::kAvx2) return avx2::uniforms(seed, offset, query, n, u0, u1, w2, w3);
#endif
  (void)level;
  portable::uniforms(seed, offset, query, 0, n, u0, u1, w2, w3);
}

inline void stage1(Simd level, const float* cdf1, int64_t K, const float* u, int32_t* k1, int64_t n) {
#if IMI_HAVE_X86_PASSES
  if (level == Simd::kAvx512) return avx512::stage1(cdf1, K, u, k1, n);
  if (level == Simd::kAvx2) return avx2::stage1(cdf1, K, u, k1, n);
#endif
  (void)level;
  portable::stage1(cdf1, K, u, k1, n);
}

inline void stage2(Simd level, const float* cdf_t, int64_t K, const int32_t* k1, const float* u, int32_t* k2,
                   int64_t n) {
#if IMI_HAVE_X86_PASSES
  if (level == Simd::kAvx512) return avx512::stage2(cdf_t, K, k1, u, k2, n);
  if (level == Simd::kAvx2) return avx2::stage2(cdf_t, K, k1, u, k2, n);
#endif
  (void)level;
  portable::stage2(cdf_t, K, k1, u, k2, n);
}

// Stage 3 and the outputs. Slots first, with the next reads prefetched, so that the cache misses
// of the following pass (alias check, class id, bias of random CSR positions) overlap. t1, t2: the
// shifted scores of the query (ws.t1, ws.t2 after prepare).
// Returns false when a draw met a corrupt index or NaN scores (its id is -1, see resolve_alias and
// drawn_class).
inline bool finish(const imi::CellIndex& ix, Scratch& ws, float log_z, int64_t M, int64_t* ids,
                   float* log_q) {
  const int64_t K = ix.K;
  for (int64_t j = 0; j < M; ++j) {
    const imi::SlotDraw d = imi::cell_slot(ix, ws.k1[j] * K + ws.k2[j], imi::random64(ws.w2[j], ws.w3[j]));
    const int64_t p = d.pos;
    ws.pos[j] = p;
    ws.u_accept[j] = d.u_accept;
    if (ix.alias_prob != nullptr) {
      IMI_PREFETCH(ix.alias_prob + p);
      IMI_PREFETCH(ix.alias_pos + p);
    } else {
      IMI_PREFETCH(ix.class_ids + p);
    }
  }
  if (ix.alias_prob != nullptr) {
    for (int64_t j = 0; j < M; ++j) {
      const int64_t p = imi::resolve_alias(ix, ws.k1[j] * K + ws.k2[j], imi::SlotDraw{ws.pos[j], ws.u_accept[j]});
      ws.pos[j] = p;
      IMI_PREFETCH(ix.class_ids + p);
      IMI_PREFETCH(ix.beta_csr + p);
    }
  }
  bool ok = true;
  const int64_t num_classes = ix.offsets[K * K];
  for (int64_t j = 0; j < M; ++j) {
    const int64_t p = ws.pos[j];
    const int64_t id = p < 0 ? int64_t(-1) : imi::drawn_class(ix, p, num_classes);
    if (id < 0) {
      ids[j] = -1;
      log_q[j] = std::numeric_limits<float>::quiet_NaN();
      ok = false;
      continue;
    }
    ids[j] = id;
    log_q[j] = imi::drawn_log_q(ix, ws.t1.data(), ws.t2.data(), ws.k1[j], ws.k2[j], p, log_z);
  }
  return ok;
}

// All M draws of query `query` after ws.prepare (log_z = its result): ids[M] and log_q[M], with the
// passes of ws.level.
inline bool draw_query(const imi::CellIndex& ix, Scratch& ws, float log_z, uint64_t seed, uint64_t offset,
                       uint64_t query, int64_t M, int64_t* ids, float* log_q) {
  const int64_t K = ix.K;
  uniforms(ws.level, seed, offset, query, M, ws.u0.data(), ws.u1.data(), ws.w2.data(), ws.w3.data());
  stage1(ws.level, ws.cdf1.data(), K, ws.u0.data(), ws.k1.data(), M);
  stage2(ws.level, ws.cdf_t.data(), K, ws.k1.data(), ws.u1.data(), ws.k2.data(), M);
  return finish(ix, ws, log_z, M, ids, log_q);
}

}  // namespace draw
}  // namespace imi_softmax
