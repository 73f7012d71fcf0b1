// Index build on CPU: counting sort of classes by cell (stable: ascending id within a cell), then
// per-cell masses and alias tables from the shared body.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../tensor_views.h"
#include "fresh_zeros.h"
#include "imi_softmax/cells.h"
#include "parallel_chunks.h"

namespace imi_softmax {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
build_cells_cpu(
    const at::Tensor& code1_in, const at::Tensor& code2_in, const std::optional<at::Tensor>& beta_in,
    int64_t K) {
  at::Tensor code1, code2, beta;
  std::tie(code1, code2, beta) = build_cells_inputs(code1_in, code2_in, beta_in, K);
  const int64_t N = code1.size(0), KK = K * K;
  const bool has_beta = beta.defined();
  const int32_t* c1 = code1.data_ptr<int32_t>();
  const int32_t* c2 = code2.data_ptr<int32_t>();
  const auto long_opts = code1.options().dtype(at::kLong);
  const auto int_opts = code1.options().dtype(at::kInt);
  const auto float_opts = code1.options().dtype(at::kFloat);

  auto offsets = at::zeros({KK + 1}, long_opts);
  int64_t* off = offsets.data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK(imi::in_range(c1[i], K) && imi::in_range(c2[i], K), "build_cells: code of class ", i, " ",
                code_range_error(K), ": (", c1[i], ", ", c2[i], ")");
    ++off[imi::cell_of(c1, c2, i, K) + 1];
  }
  for (int64_t c = 0; c < KK; ++c) off[c + 1] += off[c];
  auto class_ids = fresh_zeros({N}, int_opts);  // 2 MiB pages: far fewer first-touch faults
  int32_t* ids = class_ids.data_ptr<int32_t>();
  std::vector<int64_t> cursor(off, off + KK);
  for (int64_t i = 0; i < N; ++i) ids[cursor[imi::cell_of(c1, c2, i, K)]++] = static_cast<int32_t>(i);

  const int64_t per_class = has_beta ? N : 0;
  auto alias_prob = fresh_zeros({per_class}, float_opts);
  auto alias_pos = fresh_zeros({per_class}, int_opts);
  auto beta_csr = fresh_zeros({per_class}, float_opts);
  auto log_n = at::empty({K, K}, float_opts);
  const float* bp = has_beta ? beta.data_ptr<float>() : nullptr;
  float* prob = has_beta ? alias_prob.data_ptr<float>() : nullptr;
  int32_t* alias = has_beta ? alias_pos.data_ptr<int32_t>() : nullptr;
  float* bcsr = has_beta ? beta_csr.data_ptr<float>() : nullptr;
  float* ln = log_n.data_ptr<float>();
  // cells differ in size by orders of magnitude: small chunks claimed as the threads come
  parallel_chunks(KK, 16, [&](ChunkQueue& queue) {
    std::vector<double> exps;  // each exp once per class
    std::vector<int32_t> work;  // the alias construction's stack, per thread (no [N] scratch array)
    for (int64_t b, e; queue.next(b, e);)
      for (int64_t c = b; c < e; ++c) {
        if (has_beta && static_cast<int64_t>(exps.size()) < off[c + 1] - off[c]) {
          exps.resize(off[c + 1] - off[c]);
          work.resize(off[c + 1] - off[c]);
        }
        ln[c] = imi::cell_log_mass_and_alias(ids, off[c], off[c + 1], bp, bcsr, prob, alias, work.data(), exps.data(),
                                             /*beta_csr_filled=*/false, /*scratch_local=*/true);
      }
  });
  // Finite max: empty cells are -inf and N >= 1 guarantees one finite entry.
  auto log_n_max = log_n.masked_fill(log_n.isneginf(), -FLT_MAX).max().reshape({1});
  auto cell_mass = at::empty({K, K}, float_opts);
  float* cm = cell_mass.data_ptr<float>();
  const float lmax = log_n_max.item<float>();
  parallel_chunks(KK, 16, [&](ChunkQueue& queue) {
    for (int64_t b, e; queue.next(b, e);)
      for (int64_t c = b; c < e; ++c) cm[c] = imi::cell_scaled_mass(bcsr, off[c], off[c + 1], lmax);
  });
  return {offsets, class_ids, alias_prob, alias_pos, beta_csr, log_n, cell_mass, log_n_max};
}

}  // namespace

TORCH_LIBRARY_IMPL(imi_softmax, CPU, m) { m.impl("build_cells", &build_cells_cpu); }

}  // namespace imi_softmax
