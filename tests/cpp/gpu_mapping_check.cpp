// Host check of the CUDA kernel's arrangement of the proposal bodies (csrc/cuda/proposal.cu): the
// block preparation (one stage-2 row per "thread" with imi::stage2_row, maxima and stage-1 weights
// per entry, one sequential imi::stage1_cumulate), the table and the streaming stage 2, and the
// per-draw stage 3, run here with the threads as loops. Everything must equal the CPU passes
// (draw_passes.h: the transposed, vectorized table, AVX-512, AVX2 or portable passes, IMI_CPU_SIMD) bit for bit: the
// only evidence for the GPU math while no GPU runs the tests. Built and run by
// tests/test_draw_exactness.py with the extension's host flags. Prints "ok" or the first mismatches.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "../../csrc/cpu/draw_passes.h"
#include "imi_softmax/cells.h"
#include "imi_softmax/gpu_parallel.h"

using namespace imi_softmax;

static bool same(float a, float b) { return std::memcmp(&a, &b, sizeof(float)) == 0; }

struct Index {
  int64_t K;
  std::vector<int64_t> offsets;
  std::vector<int32_t> code1, code2, class_ids, alias_pos, scratch;  // the index's arrays are int32
  std::vector<float> beta, beta_csr, alias_prob, log_n, cell_mass;
  float log_n_max = -INFINITY;
  imi::CellIndex view() const {
    const bool b = !beta.empty();
    return imi::CellIndex{K, log_n.data(), cell_mass.data(), &log_n_max, offsets.data(), class_ids.data(),
                          b ? alias_prob.data() : nullptr, b ? alias_pos.data() : nullptr,
                          b ? beta_csr.data() : nullptr, b ? beta.data() : nullptr, code1.data(),
                          code2.data()};
  }
};

// What build_cells does (counting sort, cells.h bodies), skewed codes so that cells differ in size.
static Index make_index(int64_t N, int64_t K, bool bias, float scale, std::mt19937_64& rng) {
  Index ix;
  ix.K = K;
  std::normal_distribution<double> normal(0, 1);
  ix.code1.resize(N);
  ix.code2.resize(N);
  for (int64_t i = 0; i < N; ++i) {
    ix.code1[i] = static_cast<int32_t>(std::min<int64_t>(K - 1, static_cast<int64_t>(std::abs(normal(rng)) * K / 3)));
    ix.code2[i] = static_cast<int32_t>(rng() % K);
  }
  if (bias) {
    ix.beta.resize(N);
    for (auto& v : ix.beta) v = static_cast<float>(normal(rng) * scale);
  }
  ix.offsets.assign(K * K + 1, 0);
  for (int64_t i = 0; i < N; ++i) ++ix.offsets[imi::cell_of(ix.code1.data(), ix.code2.data(), i, K) + 1];
  for (int64_t c = 0; c < K * K; ++c) ix.offsets[c + 1] += ix.offsets[c];
  std::vector<int64_t> cursor(ix.offsets.begin(), ix.offsets.end() - 1);
  ix.class_ids.resize(N);
  for (int64_t i = 0; i < N; ++i) ix.class_ids[cursor[imi::cell_of(ix.code1.data(), ix.code2.data(), i, K)]++] = static_cast<int32_t>(i);
  const int64_t per = bias ? N : 0;
  ix.beta_csr.resize(per);
  ix.alias_prob.resize(per);
  ix.alias_pos.resize(per);
  ix.scratch.resize(per);
  ix.log_n.resize(K * K);
  ix.cell_mass.resize(K * K);
  for (int64_t c = 0; c < K * K; ++c) {
    ix.log_n[c] = imi::cell_log_mass_and_alias(ix.class_ids.data(), ix.offsets[c], ix.offsets[c + 1],
                                               bias ? ix.beta.data() : nullptr, ix.beta_csr.data(),
                                               ix.alias_prob.data(), ix.alias_pos.data(), ix.scratch.data());
    if (ix.log_n[c] != -INFINITY) ix.log_n_max = std::max(ix.log_n_max, ix.log_n[c]);
  }
  for (int64_t c = 0; c < K * K; ++c)
    ix.cell_mass[c] = imi::cell_scaled_mass(bias ? ix.beta_csr.data() : nullptr, ix.offsets[c], ix.offsets[c + 1],
                                            ix.log_n_max);
  return ix;
}

static int failures = 0;
static void fail(const char* what, int64_t K, int64_t b, int64_t at) {
  if (failures++ < 10) std::printf("mismatch: %s (K=%ld, query %ld, at %ld)\n", what, static_cast<long>(K),
                                   static_cast<long>(b), static_cast<long>(at));
}

static void check_case(int64_t N, int64_t K, bool bias, float scale, float score_center, int64_t B, int64_t M,
                       std::mt19937_64& rng) {
  const Index index = make_index(N, K, bias, scale, rng);
  const imi::CellIndex ix = index.view();
  std::normal_distribution<double> normal(0, 1);
  std::vector<float> s1(B * K), s2(B * K);
  for (auto& v : s1) v = score_center + static_cast<float>(normal(rng) * scale);
  for (auto& v : s2) v = score_center + static_cast<float>(normal(rng) * scale);
  const uint64_t seed = rng(), offset = 4 * (rng() % 1000000);
  draw::Scratch ws(ix, M, draw::simd_level());
  std::vector<int64_t> ids(M);
  std::vector<float> log_q(M);
  // the kernel's shared arrays
  std::vector<float> t1(K), t2(K), e2(K), r(K), cdf1(K), table(K * (K + 1));
  for (int64_t b = 0; b < B; ++b) {
    const float* q1 = s1.data() + b * K;
    const float* q2 = s2.data() + b * K;
    const float log_z_cpu = ws.prepare(ix, q1, q2);
    draw::draw_query(ix, ws, log_z_cpu, seed, offset, static_cast<uint64_t>(b), M,
                     ids.data(), log_q.data());
    // block_query_prepare, threads as loops
    float m1 = -INFINITY, m2 = -INFINITY;
    for (int64_t k = K - 1; k >= 0; --k) {  // any order: a max is exact
      m1 = imi::max_(m1, q1[k]);
      m2 = imi::max_(m2, q2[k]);
    }
    for (int64_t k = 0; k < K; ++k) {
      t1[k] = imi::shift_score(q1[k], m1);
      t2[k] = imi::shift_score(q2[k], m2);
      e2[k] = imi::exp_poly(t2[k]);
    }
    for (int64_t k1 = 0; k1 < K; ++k1) r[k1] = imi::stage2_row(ix, k1, t2.data(), e2.data(), table.data() + k1 * (K + 1), 1);
    float l1max = -INFINITY;
    for (int64_t k1 = 0; k1 < K; ++k1) l1max = imi::max_(l1max, imi::stage1_max_term(t1[k1], r[k1]));
    for (int64_t k1 = 0; k1 < K; ++k1) cdf1[k1] = imi::stage1_weight(t1[k1], r[k1], l1max);
    const float log_z = imi::stage1_cumulate(cdf1.data(), K, l1max);
    if (!same(log_z, log_z_cpu)) fail("log Z", K, b, 0);
    for (int64_t k = 0; k < K; ++k) {
      if (!same(t1[k], ws.t1[k]) || !same(t2[k], ws.t2[k]) || !same(e2[k], ws.e2[k])) fail("t1/t2/e2", K, b, k);
      if (!same(r[k], ws.r[k])) fail("row log mass", K, b, k);
      if (!same(cdf1[k], ws.cdf1[k])) fail("stage-1 cdf", K, b, k);
    }
    for (int64_t k1 = 0; k1 < K; ++k1)
      for (int64_t k2 = 0; k2 < K; ++k2)
        if (r[k1] != -INFINITY && !same(table[k1 * (K + 1) + k2], ws.cdf_t[k2 * K + k1])) fail("stage-2 table", K, b, k1 * K + k2);
    // the draw loop of midx_sample_kernel, both stage-2 modes
    for (int64_t j = 0; j < M; ++j) {
      const imi::PhiloxWords w = imi::philox_draw(seed, offset, static_cast<uint64_t>(b), static_cast<uint64_t>(j));
      const int64_t k1 = imi::cdf_search(cdf1.data(), K, imi::uniform24(w.w[0]));
      const float u1 = imi::uniform24(w.w[1]);
      const int64_t k2 = imi::cdf_search(table.data() + k1 * (K + 1), K, u1);
      const int64_t k2s = imi::stage2_search_streaming(ix, k1, t2.data(), e2.data(), r[k1], u1);
      if (k2s != k2) fail("streaming stage 2", K, b, j);
      const int64_t p = imi::resolve_alias(ix, k1 * K + k2, imi::cell_slot(ix, k1 * K + k2, imi::random64(w.w[2], w.w[3])));
      if (ix.class_ids[p] != ids[j]) fail("drawn id", K, b, j);
      const float lq = imi::drawn_log_q(ix, t1.data(), t2.data(), k1, k2, p, log_z);
      if (!same(lq, log_q[j])) fail("drawn log Q", K, b, j);
    }
  }
}

int main() {
  std::mt19937_64 rng(12345);
  // (N, K, bias, scale, score centre, B, M): small and large K, K > 64 (gather search), scale 12
  // (underflowed rows: the exact log-space path), scores and biases around 1e4.
  check_case(300, 6, true, 1.f, 0.f, 9, 37, rng);
  check_case(5000, 16, false, 3.f, 0.f, 9, 64, rng);
  check_case(20000, 64, true, 2.f, 0.f, 6, 250, rng);
  check_case(4000, 23, true, 12.f, 0.f, 9, 40, rng);
  check_case(30000, 100, true, 2.f, 0.f, 4, 48, rng);
  check_case(4000, 16, true, 30.f, 1e4f, 6, 64, rng);
  check_case(8000, 32, false, 40.f, -1e4f, 6, 64, rng);
  if (failures == 0) std::printf("ok\n");
  return failures == 0 ? 0 : 1;
}
