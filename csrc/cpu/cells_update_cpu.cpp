// Incremental index update on CPU: the rows `changed` get new codes (and bias snapshot); only the
// cells they leave or join are rebuilt (merge of the cell's staying classes with its arrivals, then
// the shared mass/alias body); every other cell is copied from the old index, its alias positions
// shifted to the cell's new place. The result equals build_cells on the new codes and beta bit for
// bit: same ascending-id order within a cell, same per-cell arithmetic (the alias body only depends
// on positions relative to the cell's start).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../tensor_views.h"
#include "cells_update_plan.h"
#include "fresh_zeros.h"
#include "parallel_chunks.h"
#include "imi_softmax/cells.h"

namespace imi_softmax {
namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                           at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

constexpr const char* kOp = "update_cells";
// The outputs are 4 KiB-paged (~150k first-touch faults at N = 20M, about 0.3 s of system time,
// the same every refresh) rather than 2 MiB-paged: a refresh allocates half a GiB while the weights
// and optimizer state hold most of memory, and where the kernel compacts memory synchronously for
// madvised huge pages (transparent_hugepage/defrag = madvise, a common default) those ~1,000 faults
// took 0.2-1.8 s of system time from one refresh to the next (N = 20M, 1% of the rows changed:
// update_cells 0.40-1.64 s with huge pages, 0.54-0.63 s without).
constexpr bool kHugePages = false;

Outputs update_cells_cpu(const at::Tensor& offsets, const at::Tensor& class_ids,
                         const std::optional<at::Tensor>& alias_prob, const std::optional<at::Tensor>& alias_pos,
                         const std::optional<at::Tensor>& beta_csr, const at::Tensor& log_n,
                         const at::Tensor& cell_mass, const at::Tensor& log_n_max, const at::Tensor& code1,
                         const at::Tensor& code2, const std::optional<at::Tensor>& beta, const at::Tensor& changed,
                         const at::Tensor& new_code1, const at::Tensor& new_code2,
                         const std::optional<at::Tensor>& new_beta, int64_t K) {
  const bool has_beta = update_cells_inputs(kOp, K, offsets, class_ids, alias_prob, alias_pos, beta_csr, log_n,
                                            cell_mass, log_n_max, code1, code2, beta, changed, new_code1,
                                            new_code2, new_beta);
  const int64_t N = code1.numel(), C = changed.numel(), KK = K * K;
  const int64_t* ch = changed.data_ptr<int64_t>();
  const int32_t* nc1 = new_code1.data_ptr<int32_t>();
  const int32_t* nc2 = new_code2.data_ptr<int32_t>();
  const int32_t* oc1 = code1.data_ptr<int32_t>();
  const int32_t* oc2 = code2.data_ptr<int32_t>();
  const int64_t* old_off = offsets.data_ptr<int64_t>();
  // checks every changed row and the new counts before anything is allocated
  CellUpdatePlan plan = plan_cell_update(kOp, K, old_off, N, oc1, oc2, ch, C, nc1, nc2);

  // The new per-class arrays: the old ones with the changed rows overwritten.
  // Every large output comes from fresh_zeros (no fill pass), without huge pages (kHugePages).
  auto out_code1 = fresh_zeros({N}, code1.options(), kHugePages).copy_(code1);
  auto out_code2 = fresh_zeros({N}, code2.options(), kHugePages).copy_(code2);
  auto out_beta = has_beta ? fresh_zeros({N}, beta->options(), kHugePages).copy_(*beta)
                           : at::empty({0}, code1.options().dtype(at::kFloat));
  {
    int32_t* o1 = out_code1.data_ptr<int32_t>();
    int32_t* o2 = out_code2.data_ptr<int32_t>();
    float* ob = has_beta ? out_beta.data_ptr<float>() : nullptr;
    const float* nb = has_beta ? new_beta->data_ptr<float>() : nullptr;
    for (int64_t j = 0; j < C; ++j) {
      o1[ch[j]] = nc1[j];
      o2[ch[j]] = nc2[j];
      if (has_beta) ob[ch[j]] = nb[j];
    }
  }

  // Cells that lose or gain a class, or whose class changed its bias: rebuilt (merge_cell).
  const std::vector<uint8_t>& affected = plan.affected;
  const float* nbeta = has_beta ? new_beta->data_ptr<float>() : nullptr;

  auto out_offsets = at::empty({KK + 1}, offsets.options());
  int64_t* off = out_offsets.data_ptr<int64_t>();
  std::copy(plan.new_off.begin(), plan.new_off.end(), off);

  const auto int_opts = code1.options();  // int32, like every per-class index array
  const auto float_opts = code1.options().dtype(at::kFloat);
  const int64_t per_class = has_beta ? N : 0;
  auto out_ids = fresh_zeros({N}, int_opts, kHugePages);
  auto out_prob = fresh_zeros({per_class}, float_opts, kHugePages);
  auto out_alias = fresh_zeros({per_class}, int_opts, kHugePages);
  auto out_bcsr = fresh_zeros({per_class}, float_opts, kHugePages);
  auto out_log_n = at::empty({K, K}, float_opts);
  const int32_t* old_ids = class_ids.data_ptr<int32_t>();
  const float* old_prob = has_beta ? alias_prob->data_ptr<float>() : nullptr;
  const int32_t* old_alias = has_beta ? alias_pos->data_ptr<int32_t>() : nullptr;
  const float* old_bcsr = has_beta ? beta_csr->data_ptr<float>() : nullptr;
  const float* old_ln = log_n.data_ptr<float>();
  int32_t* ids = out_ids.data_ptr<int32_t>();
  float* prob = has_beta ? out_prob.data_ptr<float>() : nullptr;
  int32_t* alias = has_beta ? out_alias.data_ptr<int32_t>() : nullptr;
  float* bcsr = has_beta ? out_bcsr.data_ptr<float>() : nullptr;
  const float* bp = has_beta ? out_beta.data_ptr<float>() : nullptr;
  float* ln = out_log_n.data_ptr<float>();
  // A cell whose old slice, leavers and arrivals do not add up (a leaver missing from its old
  // slice, a count off) comes from an inconsistent old index: recorded here, raised after the loop.
  std::atomic<int64_t> bad_cell{-1};

  // cells differ in size by orders of magnitude: small chunks claimed as the threads come
  parallel_chunks(KK, 16, [&](ChunkQueue& queue) {
    std::vector<double> exps;  // each exp once per class
    std::vector<int32_t> work;  // the alias construction's stack, per thread (no [N] scratch array)
    for (int64_t b, e; queue.next(b, e);)
    for (int64_t c = b; c < e; ++c) {
      const int64_t ob = old_off[c], oe = old_off[c + 1], nb = off[c], ne = off[c + 1];
      if (!affected[c]) {
        const int64_t n = oe - ob;
        std::memcpy(ids + nb, old_ids + ob, n * sizeof(int32_t));
        if (has_beta) {
          std::memcpy(prob + nb, old_prob + ob, n * sizeof(float));
          std::memcpy(bcsr + nb, old_bcsr + ob, n * sizeof(float));
          // positions < N < 2^31: the shifted alias of a valid table fits (a corrupt one is caught
          // where the draws read it, like any alias outside its cell)
          const int32_t shift = static_cast<int32_t>(nb - ob);
          for (int64_t p = 0; p < n; ++p) alias[nb + p] = static_cast<int32_t>(static_cast<uint32_t>(old_alias[ob + p]) + static_cast<uint32_t>(shift));
        }
        ln[c] = old_ln[c];
        continue;
      }
      // Merge (all ascending): the old classes minus the leavers, and the arrivals; with a bias
      // the beta of each position is written here too (old beta_csr or the new snapshot).
      const bool ok = merge_cell(plan, c, ch, has_beta, nbeta, old_ids + ob, has_beta ? old_bcsr + ob : nullptr,
                                 oe - ob, ids, bcsr, nb, ne);
      if (!ok) {
        int64_t expected = -1;
        bad_cell.compare_exchange_strong(expected, c);
        ln[c] = imi::neg_inf<float>();
        continue;
      }
      if (has_beta && static_cast<int64_t>(exps.size()) < ne - nb) {
        exps.resize(ne - nb);
        work.resize(ne - nb);
      }
      ln[c] = imi::cell_log_mass_and_alias(ids, nb, ne, bp, bcsr, prob, alias, work.data(), exps.data(),
                                           /*beta_csr_filled=*/true, /*scratch_local=*/true);
    }
  });
  const int64_t bad = bad_cell.load();
  TORCH_CHECK(bad < 0, kOp, ": cell ", bad, " of the old index does not match its codes (a changed class ",
              "missing from the cell of its old code, or ids not ascending within a cell): pass the index's own ",
              "offsets/class_ids/code1/code2");

  // Finite max, as build_cells; the scaled masses of untouched cells stay valid while it is unchanged.
  auto out_log_n_max = out_log_n.masked_fill(out_log_n.isneginf(), -FLT_MAX).max().reshape({1});
  const float lmax = out_log_n_max.item<float>();
  const bool same_max = lmax == log_n_max.item<float>();
  auto out_cell_mass = at::empty({K, K}, float_opts);
  float* cm = out_cell_mass.data_ptr<float>();
  const float* old_cm = cell_mass.data_ptr<float>();
  parallel_chunks(KK, 64, [&](ChunkQueue& queue) {
    for (int64_t b, e; queue.next(b, e);)
      for (int64_t c = b; c < e; ++c)
        cm[c] = (same_max && !affected[c]) ? old_cm[c] : imi::cell_scaled_mass(bcsr, off[c], off[c + 1], lmax);
  });
  return {out_code1, out_code2,  out_beta,  out_offsets,   out_ids,      out_prob,
          out_alias, out_bcsr,   out_log_n, out_cell_mass, out_log_n_max};
}

}  // namespace

TORCH_LIBRARY_IMPL(imi_softmax, CPU, m) { m.impl("update_cells", &update_cells_cpu); }

}  // namespace imi_softmax
