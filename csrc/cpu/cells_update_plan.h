// What an incremental index update changes, shared by update_cells (new arrays) and update_cells_
// (in place): the changed rows checked, bucketed by the cell they leave and the cell they join
// (ascending within a bucket, as changed is ascending), the affected cells and the new offsets.
// Everything here is checked before either op writes anything.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "../tensor_views.h"
#include "imi_softmax/cells.h"

namespace imi_softmax {

struct CellUpdatePlan {
  std::vector<int64_t> new_off;                 // [K*K + 1] offsets after the update
  std::vector<uint8_t> affected;                // [K*K] cell loses, gains or re-weights a class
  std::vector<int64_t> arrive_off, leave_off;   // [K*K + 1] CSR over the buckets below
  std::vector<int64_t> arrivals;                // [C] positions j in changed, by the cell they join
  std::vector<int64_t> leavers;                 // [C] class ids, by the cell they leave
};

inline CellUpdatePlan plan_cell_update(const char* op, int64_t K, const int64_t* old_off, int64_t N,
                                       const int32_t* oc1, const int32_t* oc2, const int64_t* ch, int64_t C,
                                       const int32_t* nc1, const int32_t* nc2) {
  for (int64_t j = 0; j < C; ++j) {
    TORCH_CHECK(imi::in_range(ch[j], N), op, ": changed[", j, "] = ", ch[j], " is not a class id in [0, ", N, ")");
    TORCH_CHECK(j == 0 || ch[j] > ch[j - 1], op, ": changed must be strictly ascending (sorted, no repeats); ",
                "changed[", j - 1, "] = ", ch[j - 1], ", changed[", j, "] = ", ch[j], " (use torch.unique)");
    TORCH_CHECK(imi::in_range(nc1[j], K) && imi::in_range(nc2[j], K), op, ": new code of changed[", j, "] ",
                code_range_error(K), ": (", nc1[j], ", ", nc2[j], ")");
    TORCH_CHECK(imi::in_range(oc1[ch[j]], K) && imi::in_range(oc2[ch[j]], K), op, ": old code of class ", ch[j],
                " ", code_range_error(K), ": (", oc1[ch[j]], ", ", oc2[ch[j]], ")");
  }
  const int64_t KK = K * K;
  CellUpdatePlan plan;
  std::vector<int64_t> count(KK);
  for (int64_t c = 0; c < KK; ++c) count[c] = old_off[c + 1] - old_off[c];
  plan.affected.assign(KK, 0);
  plan.arrive_off.assign(KK + 1, 0);
  plan.leave_off.assign(KK + 1, 0);
  for (int64_t j = 0; j < C; ++j) {
    const int64_t from = imi::cell_of(oc1, oc2, ch[j], K), to = imi::cell_of(nc1, nc2, j, K);
    --count[from];
    ++count[to];
    plan.affected[from] = plan.affected[to] = 1;
    ++plan.arrive_off[to + 1];
    ++plan.leave_off[from + 1];
  }
  for (int64_t c = 0; c < KK; ++c) {
    plan.arrive_off[c + 1] += plan.arrive_off[c];
    plan.leave_off[c + 1] += plan.leave_off[c];
  }
  plan.arrivals.resize(C);
  plan.leavers.resize(C);
  {
    std::vector<int64_t> to_cursor(plan.arrive_off.begin(), plan.arrive_off.end() - 1);
    std::vector<int64_t> from_cursor(plan.leave_off.begin(), plan.leave_off.end() - 1);
    for (int64_t j = 0; j < C; ++j) {
      plan.arrivals[to_cursor[imi::cell_of(nc1, nc2, j, K)]++] = j;
      plan.leavers[from_cursor[imi::cell_of(oc1, oc2, ch[j], K)]++] = ch[j];
    }
  }
  plan.new_off.resize(KK + 1);
  plan.new_off[0] = 0;
  for (int64_t c = 0; c < KK; ++c) {
    TORCH_CHECK(count[c] >= 0, op, ": cell ", c, " would hold ", count[c], " classes: the old codes of the ",
                "changed rows do not match the old index's cells (pass the index's own code1/code2)");
    plan.new_off[c + 1] = plan.new_off[c] + count[c];
  }
  return plan;
}

// A rebuilt cell's classes after the update, ascending, into ids[nb, ne): its old classes
// old_ids[0, n_old) (ascending) minus its leavers, merged with its arrivals; with a bias, each
// position's beta into bcsr too (old_bcsr for a class that stays, the new snapshot nbeta for an
// arrival). False when the old slice, leavers and arrivals do not add up to the cell's new size (an
// old index inconsistent with its codes). One sequential merge: no random reads over the N classes.
inline bool merge_cell(const CellUpdatePlan& plan, int64_t c, const int64_t* ch, bool has_beta, const float* nbeta,
                       const int32_t* old_ids, const float* old_bcsr, int64_t n_old, int32_t* ids, float* bcsr,
                       int64_t nb, int64_t ne) {
  int64_t p = nb, a = plan.arrive_off[c], l = plan.leave_off[c];
  const int64_t ae = plan.arrive_off[c + 1], le = plan.leave_off[c + 1];
  auto put_arrivals_before = [&](int64_t limit) {
    for (; a < ae && ch[plan.arrivals[a]] < limit && p < ne; ++a, ++p) {
      ids[p] = static_cast<int32_t>(ch[plan.arrivals[a]]);
      if (has_beta) bcsr[p] = nbeta[plan.arrivals[a]];
    }
  };
  for (int64_t q = 0; q < n_old; ++q) {
    const int64_t i = old_ids[q];
    if (l < le && plan.leavers[l] == i) {
      ++l;
      continue;
    }
    put_arrivals_before(i);
    if (p >= ne) return false;
    ids[p] = static_cast<int32_t>(i);
    if (has_beta) bcsr[p] = old_bcsr[q];
    ++p;
  }
  put_arrivals_before(INT64_MAX);
  return p == ne && a == ae && l == le;
}

}  // namespace imi_softmax
