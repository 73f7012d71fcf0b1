// MIDX proposal on CPU: per query, the shared preparation (log Z, stage-1 CDF, all stage-2 CDFs in
// one vectorized pass), then M draws by inverse-CDF search. The draws
// run in two passes so that the cache misses of the second (alias check, class id, bias of
// random CSR positions) are independent of each other and overlap.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <mutex>
#include <vector>

#include "../tensor_views.h"
#include "imi_softmax/proposal.h"

namespace imi_softmax {
namespace {

struct QueryScratch {
  std::vector<float> e2, r, cdf1, cdf2_t, u_accept;
  std::vector<int64_t> pos;
  std::vector<int32_t> k1, k2;
  QueryScratch(int64_t K, int64_t M)
      : e2(K), r(K), cdf1(K), cdf2_t(K * K), u_accept(M), pos(M), k1(M), k2(M) {}
};

std::tuple<at::Tensor, at::Tensor> midx_sample_seeded_cpu(
    const at::Tensor& s1_in, const at::Tensor& s2_in, const at::Tensor& log_n,
    const at::Tensor& cell_mass, const at::Tensor& log_n_max, const at::Tensor& offsets,
    const at::Tensor& class_ids, const std::optional<at::Tensor>& alias_prob,
    const std::optional<at::Tensor>& alias_pos, const std::optional<at::Tensor>& beta_csr,
    int64_t num_samples, int64_t seed, int64_t offset) {
  check_query_scores(s1_in, s2_in);
  const int64_t B = s1_in.size(0), K = s1_in.size(1), M = num_samples;
  TORCH_CHECK(M >= 1, "midx_sample: num_samples must be >= 1, got ", M);
  check_cell_masses(K, log_n, cell_mass, log_n_max);
  TORCH_CHECK(offsets.numel() == K * K + 1 && offsets.scalar_type() == at::kLong &&
                  class_ids.scalar_type() == at::kLong,
              "midx_sample: offsets must be int64 [K*K+1] and class_ids int64 [N]");
  const auto s1 = s1_in.contiguous();
  const auto s2 = s2_in.contiguous();
  auto ix = make_cell_index(K, log_n, cell_mass, log_n_max);
  set_sampling_tables(ix, offsets, class_ids, alias_prob, alias_pos, beta_csr);
  auto ids = at::empty({B, M}, s1.options().dtype(at::kLong));
  auto log_q = at::empty({B, M}, s1.options());
  const float* s1p = s1.data_ptr<float>();
  const float* s2p = s2.data_ptr<float>();
  int64_t* idp = ids.data_ptr<int64_t>();
  float* lqp = log_q.data_ptr<float>();
  const uint64_t useed = static_cast<uint64_t>(seed), uoff = static_cast<uint64_t>(offset);
  at::parallel_for(0, B, 4, [&](int64_t b0, int64_t b1) {
    QueryScratch ws(K, M);
    for (int64_t b = b0; b < b1; ++b) {
      const float* q1 = s1p + b * K;
      const float* q2 = s2p + b * K;
      const float log_z = imi::query_prepare(ix, q1, q2, ws.e2.data(), ws.r.data(), ws.cdf1.data());
      imi::stage2_cdf_table(ix, q2, ws.e2.data(), ws.r.data(), ws.cdf2_t.data());
      for (int64_t j = 0; j < M; ++j) {
        const imi::Uniform4 u = imi::philox_uniform4(useed, uoff, b, j);
        const int64_t k1 = imi::cdf_search(ws.cdf1.data(), K, u.v[0]);
        const int64_t k2 = imi::cdf_search_strided(ws.cdf2_t.data() + k1, K, K, u.v[1]);
        ws.k1[j] = static_cast<int32_t>(k1);
        ws.k2[j] = static_cast<int32_t>(k2);
        const int64_t p = imi::uniform_slot(ix, k1 * K + k2, u.v[2]);
        ws.pos[j] = p;
        ws.u_accept[j] = u.v[3];
        if (ix.alias_prob != nullptr) {
          __builtin_prefetch(ix.alias_prob + p);
          __builtin_prefetch(ix.alias_pos + p);
        } else {
          __builtin_prefetch(ix.class_ids + p);
        }
      }
      if (ix.alias_prob != nullptr) {
        for (int64_t j = 0; j < M; ++j) {
          const int64_t p = imi::resolve_alias(ix, ws.pos[j], ws.u_accept[j]);
          ws.pos[j] = p;
          __builtin_prefetch(ix.class_ids + p);
          __builtin_prefetch(ix.beta_csr + p);
        }
      }
      for (int64_t j = 0; j < M; ++j) {
        const int64_t p = ws.pos[j];
        idp[b * M + j] = ix.class_ids[p];
        lqp[b * M + j] = imi::drawn_log_q(ix, q1, q2, ws.k1[j], ws.k2[j], p, log_z);
      }
    }
  });
  return {ids, log_q};
}

std::tuple<at::Tensor, at::Tensor> midx_sample_cpu(
    const at::Tensor& s1, const at::Tensor& s2, const at::Tensor& log_n, const at::Tensor& cell_mass,
    const at::Tensor& log_n_max, const at::Tensor& offsets, const at::Tensor& class_ids,
    const std::optional<at::Tensor>& alias_prob, const std::optional<at::Tensor>& alias_pos,
    const std::optional<at::Tensor>& beta_csr, int64_t num_samples, std::optional<at::Generator> generator) {
  uint64_t seed;
  {
    auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(
        generator, at::detail::getDefaultCPUGenerator());
    std::lock_guard<std::mutex> lock(gen->mutex_);
    seed = gen->random64();  // a fresh key per call: consecutive calls differ, seeds reproduce
  }
  return midx_sample_seeded_cpu(s1, s2, log_n, cell_mass, log_n_max, offsets, class_ids, alias_prob,
                                alias_pos, beta_csr, num_samples, static_cast<int64_t>(seed), 0);
}

at::Tensor midx_log_prob_cpu(const at::Tensor& s1_in, const at::Tensor& s2_in,
                             const at::Tensor& log_n, const at::Tensor& cell_mass,
                             const at::Tensor& log_n_max, const std::optional<at::Tensor>& beta,
                             const at::Tensor& code1, const at::Tensor& code2,
                             const at::Tensor& ids_in) {
  check_query_scores(s1_in, s2_in);
  const int64_t B = s1_in.size(0), K = s1_in.size(1);
  check_cell_masses(K, log_n, cell_mass, log_n_max);
  check_codes(code1, code2);
  TORCH_CHECK(ids_in.dim() == 2 && ids_in.size(0) == B && ids_in.scalar_type() == at::kLong,
              "midx_log_prob: ids must be int64 [B, L] with B = ", B, ", got ", ids_in.sizes());
  const auto s1 = s1_in.contiguous();
  const auto s2 = s2_in.contiguous();
  const auto ids = ids_in.contiguous();
  const int64_t L = ids.size(1);
  auto ix = make_cell_index(K, log_n, cell_mass, log_n_max);
  set_class_codes(ix, beta, code1, code2);
  auto out = at::empty({B, L}, s1.options());
  const float* s1p = s1.data_ptr<float>();
  const float* s2p = s2.data_ptr<float>();
  const int64_t* idp = ids.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B, 4, [&](int64_t b0, int64_t b1) {
    std::vector<float> e2(K), r(K), cdf1(K);
    for (int64_t b = b0; b < b1; ++b) {
      const float* q1 = s1p + b * K;
      const float* q2 = s2p + b * K;
      const float log_z = imi::query_prepare(ix, q1, q2, e2.data(), r.data(), cdf1.data());
      for (int64_t l = 0; l < L; ++l) op[b * L + l] = imi::class_log_q(ix, q1, q2, idp[b * L + l], log_z);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(imi_softmax, CPU, m) {
  m.impl("midx_sample", &midx_sample_cpu);
  m.impl("midx_sample_seeded", &midx_sample_seeded_cpu);
  m.impl("midx_log_prob", &midx_log_prob_cpu);
}

}  // namespace imi_softmax
