// The M draws of one query on the host, as passes over structure-of-arrays scratch: uniforms for
// all draws, then every stage-1 search, every stage-2 search, the slots, the gathers. Each pass is a
// short loop of independent iterations, so it vectorizes (AVX-512 where the CPU has it) or at least
// overlaps its latencies, which one long loop per draw does not.
//
// Two implementations of the first three passes give identical results: `portable` calls the
// shared header bodies (philox_draw, cdf_search, cdf_search_strided) and `avx512` computes the
// same numbers 16 draws at a time: Philox on 16 counters, and both searches as the same branchless
// halving as cdf_search (stage 1 with K <= 64 reading its CDF from registers, otherwise gathers).
// Stage 3 (cell_slot, resolve_alias) and the log Q are the header bodies for both.
// IMI_CPU_SIMD=0 forces the portable passes (tests compare the two).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "imi_softmax/proposal.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define IMI_HAVE_AVX512_PASSES 1
#define IMI_TARGET_AVX512 __attribute__((target("avx512f")))
#if defined(__linux__)
// Compiles the auto-vectorized loops once per ISA, picked at load time (one binary for every
// x86-64 machine).
#define IMI_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#else
#define IMI_HAVE_AVX512_PASSES 0
#endif
#ifndef IMI_CPU_CLONES
#define IMI_CPU_CLONES
#endif

namespace imi_softmax {
namespace draw {

// Per-thread scratch for one query at a time (sized once per parallel chunk).
// u0, u1: stage-1/2 uniforms; w2, w3: the slot's 64 random bits; u_accept: alias acceptance.
struct Scratch {
  std::vector<float> mass_t, cdf_t, t1, t2, e2, r, cdf1, u0, u1, u_accept;
  std::vector<uint32_t> w2, w3;
  std::vector<int32_t> k1, k2;
  std::vector<int64_t> pos;
  Scratch(const imi::CellIndex& ix, int64_t M)
      : mass_t(ix.K * ix.K), cdf_t(ix.K * ix.K), t1(ix.K), t2(ix.K), e2(ix.K), r(ix.K), cdf1(ix.K),
        u0(M), u1(M), u_accept(M), w2(M), w3(M), k1(M), k2(M), pos(M) {
    const int64_t K = ix.K;
    for (int64_t a = 0; a < K; ++a)
      for (int64_t b = 0; b < K; ++b) mass_t[b * K + a] = ix.cell_mass[a * K + b];
  }
  float prepare(const imi::CellIndex& ix, const float* s1, const float* s2);
};

// log Z' of the query (proposal.h); fills t1, t2, e2, r, cdf1 and the transposed stage-2 table.
// Compiled per ISA: the table and the exp/log loops are most of a query's preparation and
// vectorize. Never FMA-contracted, so every clone (and the CUDA kernel) rounds the same way.
IMI_CPU_CLONES IMI_NO_FP_CONTRACT inline float prepare_query(const imi::CellIndex& ix, const float* mass_t,
                                                             const float* s1, const float* s2, float* t1,
                                                             float* t2, float* e2, float* r, float* cdf1,
                                                             float* cdf_t) {
  return imi::query_prepare_table(ix, mass_t, s1, s2, t1, t2, e2, r, cdf1, cdf_t);
}

inline float Scratch::prepare(const imi::CellIndex& ix, const float* s1, const float* s2) {
  return prepare_query(ix, mass_t.data(), s1, s2, t1.data(), t2.data(), e2.data(), r.data(), cdf1.data(),
                       cdf_t.data());
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

}  // namespace portable

#if IMI_HAVE_AVX512_PASSES
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
      const __mmask16 le = _mm512_cmp_ps_mask(v, target, _CMP_LE_OQ);
      base = _mm512_mask_add_epi32(base, le, base, _mm512_set1_epi32(static_cast<int>(half)));
      len -= half;
    }
    _mm512_storeu_si512(k1 + j, base);
    skip_empty_lanes(_mm512_cmp_ps_mask(target, total, _CMP_GE_OQ), cdf1, 1, nullptr, k1 + j);
  }
  if (j < n) portable::stage1(cdf1, K, u + j, k1 + j, n - j);
}

// A 16-lane gather of floats (the masked form: the plain one leaves GCC 12 warning about its
// unused pass-through operand).
IMI_TARGET_AVX512 inline __m512 gather16(const float* base, __m512i index) {
  return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), __mmask16(0xFFFF), index, base, 4);
}

// The branchless halving of cdf_search_strided, 16 draws per step via gathers: draw j searches the
// length-n CDF at cdf + column[j] read with `stride` (column null: every draw searches cdf itself).
IMI_TARGET_AVX512 inline void halving_search(const float* cdf, int64_t n, int64_t stride,
                                             const int32_t* column, const float* u, int32_t* out,
                                             int64_t count) {
  const int32_t len0 = static_cast<int32_t>(n), step = static_cast<int32_t>(stride);
  int64_t j = 0;
  for (; j + 16 <= count; j += 16) {
    const __m512i col = column != nullptr ? _mm512_loadu_si512(column + j) : _mm512_setzero_si512();
    const __m512 total = gather16(cdf, _mm512_add_epi32(col, _mm512_set1_epi32((len0 - 1) * step)));
    const __m512 target = _mm512_mul_ps(_mm512_loadu_ps(u + j), total);
    __m512i at = col, base = _mm512_setzero_si512();  // at = base * stride + col
    for (int32_t len = len0; len > 1;) {
      const int32_t half = len >> 1;
      const __m512 v = gather16(cdf, _mm512_add_epi32(at, _mm512_set1_epi32((half - 1) * step)));
      const __mmask16 le = _mm512_cmp_ps_mask(v, target, _CMP_LE_OQ);
      at = _mm512_mask_add_epi32(at, le, at, _mm512_set1_epi32(half * step));
      base = _mm512_mask_add_epi32(base, le, base, _mm512_set1_epi32(half));
      len -= half;
    }
    _mm512_storeu_si512(out + j, base);
    skip_empty_lanes(_mm512_cmp_ps_mask(target, total, _CMP_GE_OQ), cdf, stride,
                     column != nullptr ? column + j : nullptr, out + j);
  }
  for (; j < count; ++j)
    out[j] = static_cast<int32_t>(imi::cdf_search_strided(cdf + (column != nullptr ? column[j] : 0), n, stride, u[j]));
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
#endif

// AVX-512 passes unless the CPU lacks them or IMI_CPU_SIMD=0.
inline bool use_avx512() {
#if IMI_HAVE_AVX512_PASSES
  static const bool supported = __builtin_cpu_supports("avx512f");
  const char* env = std::getenv("IMI_CPU_SIMD");
  return supported && !(env != nullptr && std::strcmp(env, "0") == 0);
#else
  return false;
#endif
}

// Stage 3 and the outputs. Slots first, with the next reads prefetched, so that the cache misses
// of the following pass (alias check, class id, bias of random CSR positions) overlap. t1, t2: the
// shifted scores of the query (ws.t1, ws.t2 after prepare).
// Returns false when a draw met a corrupt index or NaN scores (its id is -1, see resolve_alias).
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
  for (int64_t j = 0; j < M; ++j) {
    const int64_t p = ws.pos[j];
    if (p < 0) {
      ids[j] = -1;
      log_q[j] = std::numeric_limits<float>::quiet_NaN();
      ok = false;
      continue;
    }
    ids[j] = ix.class_ids[p];
    log_q[j] = imi::drawn_log_q(ix, ws.t1.data(), ws.t2.data(), ws.k1[j], ws.k2[j], p, log_z);
  }
  return ok;
}

// All M draws of query `query` after ws.prepare (log_z = its result): ids[M] and log_q[M].
inline bool draw_query(const imi::CellIndex& ix, Scratch& ws, bool simd, float log_z, uint64_t seed,
                       uint64_t offset, uint64_t query, int64_t M, int64_t* ids, float* log_q) {
  const int64_t K = ix.K;
#if IMI_HAVE_AVX512_PASSES
  if (simd) {
    avx512::uniforms(seed, offset, query, M, ws.u0.data(), ws.u1.data(), ws.w2.data(), ws.w3.data());
    avx512::stage1(ws.cdf1.data(), K, ws.u0.data(), ws.k1.data(), M);
    avx512::stage2(ws.cdf_t.data(), K, ws.k1.data(), ws.u1.data(), ws.k2.data(), M);
    return finish(ix, ws, log_z, M, ids, log_q);
  }
#endif
  (void)simd;
  portable::uniforms(seed, offset, query, 0, M, ws.u0.data(), ws.u1.data(), ws.w2.data(), ws.w3.data());
  portable::stage1(ws.cdf1.data(), K, ws.u0.data(), ws.k1.data(), M);
  portable::stage2(ws.cdf_t.data(), K, ws.k1.data(), ws.u1.data(), ws.k2.data(), M);
  return finish(ix, ws, log_z, M, ids, log_q);
}

}  // namespace draw
}  // namespace imi_softmax
