// MIDX proposal on CPU: per query, the shared preparation (log Z, stage-1 CDF and all stage-2 CDFs
// in one vectorized pass), then the M draws as passes over scratch arrays (draw_passes.h) and the
// targets' log Q from the same preparation.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <mutex>
#include <vector>

#include "../tensor_views.h"
#include "draw_passes.h"
#include "parallel_chunks.h"
#include "imi_softmax/proposal.h"

namespace imi_softmax {
namespace {

// The draw passes of this call (draw_passes.h); an IMI_CPU_SIMD the CPU cannot honour is said once.
draw::Simd draw_level() {
  const draw::SimdChoice c = draw::simd_choice();
  if (c.problem != nullptr) {
    TORCH_WARN_ONCE("imi_softmax: ", c.problem);
  }
  return c.level;
}

// Whether query row b's scores are all finite; the first row found that is not goes to bad_row. The
// ops check here, inside their loop, so the Python caller needs no check (and no sync) of its own:
// NaN / Inf scores would otherwise give NaN CDFs and meaningless draws and log Q.
bool finite_scores(const float* s1, const float* s2, int64_t K, int64_t b, std::atomic<int64_t>& bad_row) {
  if (imi::all_finite(s1, K) && imi::all_finite(s2, K)) return true;
  int64_t none = -1;
  bad_row.compare_exchange_strong(none, b);
  return false;
}

void check_scores_were_finite(const char* op, const std::atomic<int64_t>& bad_row) {
  const int64_t b = bad_row.load();
  if (b >= 0) fail_scores_not_finite(op, b);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> midx_sample_seeded_cpu(
    const at::Tensor& s1_in, const at::Tensor& s2_in, const at::Tensor& log_n,
    const at::Tensor& cell_mass, const at::Tensor& log_n_max, const at::Tensor& offsets,
    const at::Tensor& class_ids, const std::optional<at::Tensor>& alias_prob,
    const std::optional<at::Tensor>& alias_pos, const std::optional<at::Tensor>& beta_csr,
    int64_t num_samples, int64_t seed, int64_t offset, const std::optional<at::Tensor>& targets_in,
    const std::optional<at::Tensor>& beta, const std::optional<at::Tensor>& code1_in,
    const std::optional<at::Tensor>& code2_in) {
  check_query_scores(s1_in, s2_in);
  const int64_t B = s1_in.size(0), K = s1_in.size(1), M = num_samples;
  check_num_samples(M);
  check_philox_offset(offset);
  const auto s1 = s1_in.contiguous();
  const auto s2 = s2_in.contiguous();
  const SampleCall c = midx_sample_call(s1, M, log_n, cell_mass, log_n_max, offsets, class_ids, alias_prob, alias_pos,
                                        beta_csr, targets_in, beta, code1_in, code2_in);
  const imi::CellIndex& ix = c.ix;
  const SampleTargets& tg = c.tg;
  const bool has_targets = tg.present;
  const int64_t L = tg.L, N = tg.N;
  const at::Tensor &ids = c.ids, &log_q = c.log_q, &target_log_q = c.target_log_q;
  const float* s1p = s1.data_ptr<float>();
  const float* s2p = s2.data_ptr<float>();
  int64_t* idp = ids.data_ptr<int64_t>();
  float* lqp = log_q.data_ptr<float>();
  const int64_t* tp = has_targets ? tg.targets.data_ptr<int64_t>() : nullptr;
  float* tlqp = target_log_q.data_ptr<float>();
  const uint64_t useed = static_cast<uint64_t>(seed), uoff = static_cast<uint64_t>(offset);
  const draw::Simd level = draw_level();
  std::atomic<bool> bad_target{false}, bad_draw{false};
  std::atomic<int64_t> bad_scores{-1};  // the first row found whose scores are not all finite
  if (M > 0 || L > 0) {
    // ~5 us a query: chunks of 8 queries, claimed as the threads come (parallel_chunks.h)
    parallel_chunks(B, 8, [&](ChunkQueue& queue) {
      draw::Scratch ws(ix, M, level);
      for (int64_t b0, b1; queue.next(b0, b1);)
      for (int64_t b = b0; b < b1; ++b) {
        if (!finite_scores(s1p + b * K, s2p + b * K, K, b, bad_scores)) continue;
        const float log_z = ws.prepare(ix, s1p + b * K, s2p + b * K);
        if (!draw::draw_query(ix, ws, log_z, useed, uoff, static_cast<uint64_t>(b), M, idp + b * M,
                              lqp + b * M))
          bad_draw = true;
        for (int64_t l = 0; l < L; ++l) {
          const int64_t t = tp[b * L + l];
          if (t >= N || (t >= 0 && !imi::codes_in_range(ix, t))) bad_target = true;
          tlqp[b * L + l] = imi::target_log_q(ix, ws.t1.data(), ws.t2.data(), t, N, log_z);
        }
      }
    });
  }
  check_scores_were_finite("midx_sample", bad_scores);
  TORCH_CHECK(!bad_draw, "midx_sample: a draw reached an empty cell, an alias outside its cell or a class id "
              "outside [0, N): the query scores hold NaN or the index tables (offsets, alias_pos, class_ids) are "
              "corrupt; rebuild the index");
  TORCH_CHECK(!bad_target, "midx_sample: targets must lie in [0, ", N,
              ") or be negative (ignored), and their codes in [0, ", K, ")");
  return {ids, log_q, target_log_q};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> midx_sample_cpu(
    const at::Tensor& s1, const at::Tensor& s2, const at::Tensor& log_n, const at::Tensor& cell_mass,
    const at::Tensor& log_n_max, const at::Tensor& offsets, const at::Tensor& class_ids,
    const std::optional<at::Tensor>& alias_prob, const std::optional<at::Tensor>& alias_pos,
    const std::optional<at::Tensor>& beta_csr, int64_t num_samples, std::optional<at::Generator> generator,
    const std::optional<at::Tensor>& targets, const std::optional<at::Tensor>& beta,
    const std::optional<at::Tensor>& code1, const std::optional<at::Tensor>& code2) {
  uint64_t seed;
  {
    auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(
        generator, at::detail::getDefaultCPUGenerator());
    std::lock_guard<std::mutex> lock(gen->mutex_);
    seed = gen->random64();  // a fresh key per call: consecutive calls differ, seeds reproduce
  }
  return midx_sample_seeded_cpu(s1, s2, log_n, cell_mass, log_n_max, offsets, class_ids, alias_prob,
                                alias_pos, beta_csr, num_samples, static_cast<int64_t>(seed), 0, targets,
                                beta, code1, code2);
}

at::Tensor midx_log_prob_cpu(const at::Tensor& s1_in, const at::Tensor& s2_in,
                             const at::Tensor& log_n, const at::Tensor& cell_mass,
                             const at::Tensor& log_n_max, const std::optional<at::Tensor>& beta,
                             const at::Tensor& code1, const at::Tensor& code2,
                             const at::Tensor& ids_in) {
  check_query_scores(s1_in, s2_in);
  const int64_t B = s1_in.size(0), K = s1_in.size(1);
  check_log_prob_ids(ids_in, B);
  check_codes(code1, code2, "midx_log_prob");
  check_ids_and_codes("midx_log_prob", "ids", ids_in, code1, code2, K);
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
  const draw::Simd level = draw_level();
  std::atomic<int64_t> bad_scores{-1};
  parallel_chunks(B, 16, [&](ChunkQueue& queue) {
    draw::Scratch ws(ix, 0, level);  // the same preparation as sampling: log Q agree exactly
    for (int64_t b0, b1; queue.next(b0, b1);)
    for (int64_t b = b0; b < b1; ++b) {
      const float* q1 = s1p + b * K;
      const float* q2 = s2p + b * K;
      if (!finite_scores(q1, q2, K, b, bad_scores)) continue;
      const float log_z = ws.prepare(ix, q1, q2);
      for (int64_t l = 0; l < L; ++l)
        op[b * L + l] = imi::class_log_q(ix, ws.t1.data(), ws.t2.data(), idp[b * L + l], log_z);
    }
  });
  check_scores_were_finite("midx_log_prob", bad_scores);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(imi_softmax, CPU, m) {
  m.impl("midx_sample", &midx_sample_cpu);
  m.impl("midx_sample_seeded", &midx_sample_seeded_cpu);
  m.impl("midx_log_prob", &midx_log_prob_cpu);
}

}  // namespace imi_softmax
