// Time of each CPU draw pass (csrc/cpu/draw_passes.h) on a synthetic index, one thread, no torch:
//   g++ -O3 -std=c++20 -fopenmp -fno-trapping-math -Icsrc/include bench/draw_passes_timing.cpp -o /tmp/dpt
//   /tmp/dpt [score_std] [K]
// N = 1M classes with skewed first codes, K = 64, B = 512 queries, M = 256 draws; prints the best of
// 30 runs per pass (sums over the queries) and a hash of the ids and log Q for every level the CPU
// supports (portable, avx2, avx512; IMI_CPU_SIMD=<level> times that one alone). The hashes must be
// equal: every level draws the same samples.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>

#include "../csrc/cpu/draw_passes.h"
#include "../csrc/include/imi_softmax/cells.h"

using namespace imi_softmax;
using Clock = std::chrono::steady_clock;

static double ms_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

int main(int argc, char** argv) {
  const int64_t N = 1000000, B = 512, M = 256;
  const float score_std = argc > 1 ? static_cast<float>(atof(argv[1])) : 0.4f;
  const int64_t K = argc > 2 ? atol(argv[2]) : 64;
  std::mt19937_64 rng(1);
  std::normal_distribution<double> normal(0, 1);
  std::vector<int32_t> code1(N), code2(N);  // the index's per-class arrays are int32
  std::vector<int64_t> count(K * K, 0);
  for (int64_t i = 0; i < N; ++i) {
    code1[i] = static_cast<int32_t>(std::min<int64_t>(K - 1, static_cast<int64_t>(std::abs(normal(rng)) * K / 3)));
    code2[i] = static_cast<int32_t>(rng() % K);
    count[code1[i] * K + code2[i]]++;
  }
  std::vector<int64_t> offsets(K * K + 1, 0), fill(K * K);
  std::vector<int32_t> class_ids(N);
  for (int64_t c = 0; c < K * K; ++c) offsets[c + 1] = offsets[c] + count[c];
  for (int64_t c = 0; c < K * K; ++c) fill[c] = offsets[c];
  for (int64_t i = 0; i < N; ++i) class_ids[fill[code1[i] * K + code2[i]]++] = static_cast<int32_t>(i);
  std::vector<float> log_n(K * K), mass(K * K);
  float log_n_max = -INFINITY;
  for (int64_t c = 0; c < K * K; ++c) {
    log_n[c] = count[c] ? logf(static_cast<float>(count[c])) : -INFINITY;
    log_n_max = std::max(log_n_max, log_n[c]);
  }
  for (int64_t c = 0; c < K * K; ++c) mass[c] = imi::cell_scaled_mass(nullptr, offsets[c], offsets[c + 1], log_n_max);
  imi::CellIndex ix{K, log_n.data(), mass.data(), &log_n_max, offsets.data(), class_ids.data(),
                    nullptr, nullptr, nullptr, nullptr, code1.data(), code2.data()};
  std::vector<float> s1(B * K), s2(B * K);
  for (auto& v : s1) v = score_std * static_cast<float>(normal(rng));
  for (auto& v : s2) v = score_std * static_cast<float>(normal(rng));
  std::vector<int64_t> ids(B * M);
  std::vector<float> log_q(B * M);

  std::vector<draw::Simd> levels;
  if (std::getenv("IMI_CPU_SIMD") != nullptr) {
    levels.push_back(draw::simd_level());
  } else {
    for (int l = 0; l <= static_cast<int>(draw::cpu_simd()); ++l) levels.push_back(static_cast<draw::Simd>(l));
  }
  const char* names[5] = {"prepare", "philox", "stage 1", "stage 2", "slots+gathers"};
  for (const draw::Simd level : levels) {
    double best[5] = {1e9, 1e9, 1e9, 1e9, 1e9}, best_total = 1e9;
    for (int rep = 0; rep < 30; ++rep) {
      double acc[5] = {0, 0, 0, 0, 0};
      const auto start = Clock::now();
      draw::Scratch ws(ix, M, level);
      for (int64_t b = 0; b < B; ++b) {
        const float* q1 = s1.data() + b * K;
        const float* q2 = s2.data() + b * K;
        Clock::time_point t[6];
        t[0] = Clock::now();
        const float log_z = ws.prepare(ix, q1, q2);
        t[1] = Clock::now();
        draw::uniforms(level, 7, 0, b, M, ws.u0.data(), ws.u1.data(), ws.w2.data(), ws.w3.data());
        t[2] = Clock::now();
        draw::stage1(level, ws.cdf1.data(), K, ws.u0.data(), ws.k1.data(), M);
        t[3] = Clock::now();
        draw::stage2(level, ws.cdf_t.data(), K, ws.k1.data(), ws.u1.data(), ws.k2.data(), M);
        t[4] = Clock::now();
        draw::finish(ix, ws, log_z, M, ids.data() + b * M, log_q.data() + b * M);
        t[5] = Clock::now();
        for (int i = 0; i < 5; ++i) acc[i] += ms_between(t[i], t[i + 1]);
      }
      best_total = std::min(best_total, ms_between(start, Clock::now()));
      for (int i = 0; i < 5; ++i) best[i] = std::min(best[i], acc[i]);
    }
    printf("%s passes, B=%ld queries x M=%ld draws, N=%ld, K=%ld: total %.3f ms (%.1f ns per draw)\n",
           draw::simd_name(level), static_cast<long>(B), static_cast<long>(M), static_cast<long>(N),
           static_cast<long>(K), best_total, best_total * 1e6 / static_cast<double>(B * M));
    for (int i = 0; i < 5; ++i)
      printf("  %-14s %.3f ms (%.2f us per query)\n", names[i], best[i], best[i] * 1e3 / static_cast<double>(B));
    uint64_t hash = 1469598103934665603ull;
    for (int64_t v : ids) hash = (hash ^ static_cast<uint64_t>(v)) * 1099511628211ull;
    for (float v : log_q) {
      uint32_t bits;
      std::memcpy(&bits, &v, sizeof bits);
      hash = (hash ^ bits) * 1099511628211ull;
    }
    printf("  ids and log Q hash %016llx\n", static_cast<unsigned long long>(hash));
  }
}
