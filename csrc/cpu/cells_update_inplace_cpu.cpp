// Incremental index update on CPU, in place (update_cells_): the same result as update_cells, bit
// for bit, written over the old index's arrays, so a refresh never holds two snapshots (at N = 20M
// the copy op's new arrays and scratch are ~0.6 GiB beside the old ones).
//
// The CSR cells shift when their sizes change. The cells are rewritten in ascending order; before a
// cell's new slice is written, the old data still unread under it (old positions past the cell's
// own old slice, which later cells read) is saved to a staging queue. That queue never holds more
// than the largest positive shift of a cell boundary, which is at most the number of changed rows:
// no [N] buffer. A cell that is rebuilt (merge + alias tables, the copy op's arithmetic) first
// copies its old slice to a per-thread buffer; an unaffected cell is moved with memmove when none of
// its old data sits in the queue.
//
// Threads: the cell range is cut at boundary cells b; a boundary whose offset moves (new offset !=
// old offset) makes one side overwrite old data the other side still reads. That band (|shift| <=
// number of changed rows) is saved before the threads start, and each side reads it from there.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
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
#include "imi_softmax/cells.h"
#include "parallel_chunks.h"

namespace imi_softmax {
namespace {

constexpr const char* kOp = "update_cells_";

// The per-class CSR arrays that move with their cell (prob/alias/bcsr null without a bias).
struct Csr {
  int32_t* ids;
  float* prob;
  int32_t* alias;
  float* bcsr;
};

// Old values of the positions [lo, hi) of the four arrays, stored from buffer index base.
class Saved {
 public:
  int64_t lo = 0, hi = 0;

  explicit Saved(bool has_beta) : has_beta_(has_beta) {}

  bool holds(int64_t q) const { return q >= lo && q < hi; }

  // Appends the old values of [from, to) read from the arrays (from == hi unless empty).
  void append(const Csr& a, int64_t from, int64_t to) {
    if (to <= from) return;
    if (lo == hi) lo = hi = base_ = from;
    TORCH_CHECK(from == hi, kOp, ": internal error: staging is not contiguous (", from, " != ", hi, ")");
    if (to - base_ > static_cast<int64_t>(ids_.size())) {
      compact();
      const int64_t need = to - base_;
      if (need > static_cast<int64_t>(ids_.size())) resize(std::max<int64_t>(need, 2 * ids_.size()));
    }
    const int64_t at = from - base_, n = to - from;
    std::memcpy(ids_.data() + at, a.ids + from, n * sizeof(int32_t));
    if (has_beta_) {
      std::memcpy(prob_.data() + at, a.prob + from, n * sizeof(float));
      std::memcpy(alias_.data() + at, a.alias + from, n * sizeof(int32_t));
      std::memcpy(bcsr_.data() + at, a.bcsr + from, n * sizeof(float));
    }
    hi = to;
  }

  // Forgets the positions below q (consumed).
  void drop_below(int64_t q) {
    lo = std::min(std::max(lo, q), hi);
  }

  // Copies the saved positions [q0, q1) (inside [lo, hi)) to dst + offset; null dst arrays skipped.
  void read(int64_t q0, int64_t q1, const Csr& dst, int64_t offset) const {
    const int64_t at = q0 - base_, n = q1 - q0;
    std::memcpy(dst.ids + offset, ids_.data() + at, n * sizeof(int32_t));
    if (!has_beta_) return;
    if (dst.prob) std::memcpy(dst.prob + offset, prob_.data() + at, n * sizeof(float));
    if (dst.alias) std::memcpy(dst.alias + offset, alias_.data() + at, n * sizeof(int32_t));
    if (dst.bcsr) std::memcpy(dst.bcsr + offset, bcsr_.data() + at, n * sizeof(float));
  }

 private:
  void compact() {
    const int64_t shift = lo - base_, n = hi - lo;
    if (shift == 0) return;
    std::memmove(ids_.data(), ids_.data() + shift, n * sizeof(int32_t));
    if (has_beta_) {
      std::memmove(prob_.data(), prob_.data() + shift, n * sizeof(float));
      std::memmove(alias_.data(), alias_.data() + shift, n * sizeof(int32_t));
      std::memmove(bcsr_.data(), bcsr_.data() + shift, n * sizeof(float));
    }
    base_ = lo;
  }
  void resize(int64_t n) {
    ids_.resize(n);
    if (has_beta_) {
      prob_.resize(n);
      alias_.resize(n);
      bcsr_.resize(n);
    }
  }

  bool has_beta_;
  int64_t base_ = 0;
  std::vector<int32_t> ids_, alias_;
  std::vector<float> prob_, bcsr_;
};

template <typename T>
void grow(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(n);
}

struct Shared {
  const CellUpdatePlan& plan;
  const std::vector<int64_t>& old_off;  // a copy: the offsets tensor is rewritten at the end
  Csr csr;
  bool has_beta;
  const int64_t* ch;
  const float* nbeta;  // new bias snapshot by position in changed
  const float* beta;   // non-null with a bias (the alias body only tests it: beta_csr is filled)
  float* ln;
  std::atomic<int64_t>* bad_cell;
};

// Rewrites the cells [c0, c1) in ascending order. Their old data is read from [old_off[c0],
// old_off[c1]) and their new data written to [new_off[c0], new_off[c1]); left / right: the bands
// saved at c0 / c1 (old positions of this range that the neighbouring ranges overwrite).
void rewrite_cells(const Shared& s, int64_t c0, int64_t c1, const Saved& left, const Saved& right) {
  const auto& oo = s.old_off;
  const auto& no = s.plan.new_off;
  const Csr& a = s.csr;
  const bool hb = s.has_beta;
  Saved stage(hb);
  // Old positions below this were overwritten by the left range (they are in `left`).
  const int64_t left_hi = std::max(oo[c0], no[c0]);
  const int64_t read_end = oo[c1];

  // Copies the old values of positions [q0, q1) of this range to dst + (q - q0).
  auto gather = [&](int64_t q0, int64_t q1, const Csr& dst) {
    for (int64_t q = q0; q < q1;) {
      const Saved* from = left.holds(q) ? &left : right.holds(q) ? &right : stage.holds(q) ? &stage : nullptr;
      if (from != nullptr) {
        const int64_t e = std::min(q1, from->hi);
        from->read(q, e, dst, q - q0);
        q = e;
        continue;
      }
      int64_t e = q1;  // unsaved: the array still holds the old value, up to the next saved span
      for (const Saved* sv : {&left, &right, static_cast<const Saved*>(&stage)})
        if (sv->lo < sv->hi && sv->lo > q) e = std::min(e, sv->lo);
      const int64_t n = e - q;
      std::memcpy(dst.ids + (q - q0), a.ids + q, n * sizeof(int32_t));
      if (hb) {
        if (dst.prob) std::memcpy(dst.prob + (q - q0), a.prob + q, n * sizeof(float));
        if (dst.alias) std::memcpy(dst.alias + (q - q0), a.alias + q, n * sizeof(int32_t));
        if (dst.bcsr) std::memcpy(dst.bcsr + (q - q0), a.bcsr + q, n * sizeof(float));
      }
      q = e;
    }
  };
  // Before cell c's new slice [no[c], no[c+1]) is written: save the old data there that later
  // cells of this range still read (cell c's own old slice is already consumed or moved by memmove).
  auto protect = [&](int64_t c) {
    const int64_t from = std::max({stage.hi, oo[c + 1], left_hi}), to = std::min(no[c + 1], read_end);
    if (to > from) stage.append(a, from, to);
  };

  std::vector<int32_t> t_ids, t_alias, work;
  std::vector<float> t_prob, t_bcsr;
  std::vector<double> exps;
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t ob = oo[c], oe = oo[c + 1], nb = no[c], ne = no[c + 1], n_old = oe - ob;
    const bool clean = !(left.lo < left.hi && left.hi > ob) && !(right.lo < right.hi && right.lo < oe) &&
                       !(stage.lo < stage.hi && stage.hi > ob && stage.lo < oe);
    if (!s.plan.affected[c]) {
      if (clean) {
        // old slice intact in the arrays: save what the move overwrites past it, then move
        protect(c);
        stage.drop_below(oe);
        if (nb != ob) {
          std::memmove(a.ids + nb, a.ids + ob, n_old * sizeof(int32_t));
          if (hb) {
            std::memmove(a.prob + nb, a.prob + ob, n_old * sizeof(float));
            std::memmove(a.bcsr + nb, a.bcsr + ob, n_old * sizeof(float));
            // positions < N < 2^31: the shifted alias of a valid table fits (as in update_cells)
            const uint32_t shift = static_cast<uint32_t>(static_cast<int32_t>(nb - ob));
            if (nb > ob) {
              for (int64_t p = n_old - 1; p >= 0; --p)
                a.alias[nb + p] = static_cast<int32_t>(static_cast<uint32_t>(a.alias[ob + p]) + shift);
            } else {
              for (int64_t p = 0; p < n_old; ++p)
                a.alias[nb + p] = static_cast<int32_t>(static_cast<uint32_t>(a.alias[ob + p]) + shift);
            }
          }
        }
        continue;
      }
      grow(t_ids, n_old);
      if (hb) {
        grow(t_prob, n_old);
        grow(t_alias, n_old);
        grow(t_bcsr, n_old);
      }
      gather(ob, oe, Csr{t_ids.data(), t_prob.data(), t_alias.data(), t_bcsr.data()});
      stage.drop_below(oe);
      protect(c);
      if (n_old == 0) continue;  // t_ids may be empty (null data()): memcpy's arguments must not be null
      std::memcpy(a.ids + nb, t_ids.data(), n_old * sizeof(int32_t));
      if (hb) {
        std::memcpy(a.prob + nb, t_prob.data(), n_old * sizeof(float));
        std::memcpy(a.bcsr + nb, t_bcsr.data(), n_old * sizeof(float));
        const uint32_t shift = static_cast<uint32_t>(static_cast<int32_t>(nb - ob));
        for (int64_t p = 0; p < n_old; ++p)
          a.alias[nb + p] = static_cast<int32_t>(static_cast<uint32_t>(t_alias[p]) + shift);
      }
      continue;
    }
    // Rebuilt cell: its old ids (and betas) to the thread's buffer, then the copy op's merge into
    // the new slice, then the shared mass/alias body on it.
    grow(t_ids, n_old);
    if (hb) grow(t_bcsr, n_old);
    gather(ob, oe, Csr{t_ids.data(), nullptr, nullptr, hb ? t_bcsr.data() : nullptr});
    stage.drop_below(oe);
    protect(c);
    const bool ok = merge_cell(s.plan, c, s.ch, hb, s.nbeta, t_ids.data(), hb ? t_bcsr.data() : nullptr, n_old,
                               a.ids, a.bcsr, nb, ne);
    if (!ok) {
      int64_t expected = -1;
      s.bad_cell->compare_exchange_strong(expected, c);
      s.ln[c] = imi::neg_inf<float>();
      continue;
    }
    if (hb) {
      grow(exps, ne - nb);
      grow(work, ne - nb);
    }
    s.ln[c] = imi::cell_log_mass_and_alias(a.ids, nb, ne, s.beta, a.bcsr, a.prob, a.alias, work.data(), exps.data(),
                                           /*beta_csr_filled=*/true, /*scratch_local=*/true);
  }
}

// Cut points of the cell range for up to `max_ranges` ranges of about equal work, such that the
// band of each cut (between its old and new offset) lies between the neighbouring cuts' bands.
constexpr int kRangesPerThread = 4;

std::vector<int64_t> cut_cells(const CellUpdatePlan& plan, const std::vector<int64_t>& oo, int64_t KK,
                               int max_ranges) {
  const auto& no = plan.new_off;
  std::vector<double> work(KK + 1, 0.0);  // prefix sums
  for (int64_t c = 0; c < KK; ++c) {
    const double size = static_cast<double>(no[c + 1] - no[c]);
    // a rebuilt cell: merge + alias tables; a moved one: a copy; a cell that stays: nothing
    const double w = plan.affected[c] ? 4.0 * size + 16.0 : (no[c] != oo[c] ? size : 0.0) + 1.0;
    work[c + 1] = work[c] + w;
  }
  for (int t = std::max(max_ranges, 1); t > 1; --t) {
    std::vector<int64_t> cuts{0};
    for (int i = 1; i < t; ++i) {
      const double goal = work[KK] * i / t;
      const int64_t c = std::lower_bound(work.begin(), work.end(), goal) - work.begin();
      if (c > cuts.back() && c < KK) cuts.push_back(c);
    }
    cuts.push_back(KK);
    bool ok = cuts.size() > 2;
    for (size_t i = 0; ok && i + 1 < cuts.size(); ++i) {
      const int64_t b0 = cuts[i], b1 = cuts[i + 1];
      ok = std::max(oo[b0], no[b0]) <= std::min(oo[b1], no[b1]);
    }
    if (ok) return cuts;
  }
  return {0, KK};
}

void update_cells_inplace_cpu(const at::Tensor& offsets, const at::Tensor& class_ids,
                              const std::optional<at::Tensor>& alias_prob, const std::optional<at::Tensor>& alias_pos,
                              const std::optional<at::Tensor>& beta_csr, const at::Tensor& log_n,
                              const at::Tensor& cell_mass, const at::Tensor& log_n_max, const at::Tensor& code1,
                              const at::Tensor& code2, const std::optional<at::Tensor>& beta,
                              const at::Tensor& changed, const at::Tensor& new_code1, const at::Tensor& new_code2,
                              const std::optional<at::Tensor>& new_beta, int64_t K) {
  const bool has_beta = update_cells_inputs(kOp, K, offsets, class_ids, alias_prob, alias_pos, beta_csr, log_n,
                                            cell_mass, log_n_max, code1, code2, beta, changed, new_code1,
                                            new_code2, new_beta);
  TORCH_CHECK(log_n_max.is_contiguous(), kOp, ": log_n_max must be contiguous");
  {  // written in place: no two arguments may share memory (one write would change another's input)
    const std::vector<std::pair<const char*, const at::Tensor*>> all{
        {"offsets", &offsets},     {"class_ids", &class_ids}, {"alias_prob", present(alias_prob) ? &*alias_prob : nullptr},
        {"alias_pos", present(alias_pos) ? &*alias_pos : nullptr}, {"beta_csr", present(beta_csr) ? &*beta_csr : nullptr},
        {"log_n", &log_n},         {"cell_mass", &cell_mass}, {"log_n_max", &log_n_max},
        {"code1", &code1},         {"code2", &code2},         {"beta", present(beta) ? &*beta : nullptr},
        {"changed", &changed},     {"new_code1", &new_code1}, {"new_code2", &new_code2},
        {"new_beta", present(new_beta) ? &*new_beta : nullptr}};
    for (size_t i = 0; i < all.size(); ++i)
      for (size_t j = i + 1; j < all.size(); ++j) {
        if (all[i].second == nullptr || all[j].second == nullptr) continue;
        if (all[i].second->numel() == 0 || all[j].second->numel() == 0) continue;
        TORCH_CHECK(at::get_overlap_status(*all[i].second, *all[j].second) == at::MemOverlapStatus::No, kOp, ": ",
                    all[i].first, " and ", all[j].first, " share memory; the op writes the index in place, so ",
                    "each argument must be its own tensor (pass the index's own arrays and fresh changed/new_* tensors)");
      }
  }
  const int64_t N = code1.numel(), C = changed.numel(), KK = K * K;
  const int64_t* ch = changed.data_ptr<int64_t>();
  const int32_t* nc1 = new_code1.data_ptr<int32_t>();
  const int32_t* nc2 = new_code2.data_ptr<int32_t>();
  int32_t* c1 = code1.data_ptr<int32_t>();
  int32_t* c2 = code2.data_ptr<int32_t>();
  int64_t* off_out = offsets.data_ptr<int64_t>();
  const std::vector<int64_t> old_off(off_out, off_out + KK + 1);
  const CellUpdatePlan plan = plan_cell_update(kOp, K, old_off.data(), N, c1, c2, ch, C, nc1, nc2);
  Csr csr{class_ids.data_ptr<int32_t>(), has_beta ? alias_prob->data_ptr<float>() : nullptr,
          has_beta ? alias_pos->data_ptr<int32_t>() : nullptr, has_beta ? beta_csr->data_ptr<float>() : nullptr};
  // Every leaver must sit in the old slice of its old cell (ids ascending within a cell): checked
  // here, before any write, so a mismatched index is refused intact.
  for (int64_t c = 0; c < KK; ++c)
    for (int64_t l = plan.leave_off[c]; l < plan.leave_off[c + 1]; ++l)
      TORCH_CHECK(std::binary_search(csr.ids + old_off[c], csr.ids + old_off[c + 1], static_cast<int32_t>(plan.leavers[l])),
                  kOp, ": class ", plan.leavers[l], " is not in the cell of its old code (cell ", c, ") of the old ",
                  "index (or that cell's ids are not ascending): pass the index's own offsets/class_ids/code1/code2; ",
                  "the index was not modified");
  if (C == 0) return;  // nothing changes (the copy op's result equals its input then, too)

  const float old_lmax = log_n_max.data_ptr<float>()[0];
  float* ln = log_n.data_ptr<float>();
  std::atomic<int64_t> bad_cell{-1};
  const Shared shared{plan, old_off, csr, has_beta, ch, has_beta ? new_beta->data_ptr<float>() : nullptr,
                      has_beta ? beta->data_ptr<float>() : nullptr, ln, &bad_cell};
  // several ranges per thread, claimed as the threads come: beside a busy process a thread that is
  // off its core holds up one small range, not half of the cells
  const std::vector<int64_t> cuts = cut_cells(plan, old_off, KK, kRangesPerThread * kernel_threads());
  const int64_t ranges = static_cast<int64_t>(cuts.size()) - 1;
  // bands[i]: old data of the positions between the old and new offset of cut i, saved before any
  // range writes (the range that reads them finds them here; the other one overwrites them)
  std::vector<Saved> bands(cuts.size(), Saved(has_beta));
  for (size_t i = 1; i + 1 < cuts.size(); ++i) {
    const int64_t b = cuts[i];
    bands[i].append(csr, std::min(old_off[b], plan.new_off[b]), std::max(old_off[b], plan.new_off[b]));
  }
  parallel_chunks(ranges, 1, [&](ChunkQueue& queue) {
    for (int64_t b, e; queue.next(b, e);)
      for (int64_t r = b; r < e; ++r) rewrite_cells(shared, cuts[r], cuts[r + 1], bands[r], bands[r + 1]);
  });
  // a cell whose old slice, leavers and arrivals do not add up (its ids not ascending: not caught by
  // the search above in every case) leaves a half-written index
  const int64_t bad = bad_cell.load();
  TORCH_CHECK(bad < 0, kOp, ": cell ", bad, " of the old index does not match its codes (ids not ascending within ",
              "the cell, or a changed class missing from it); the index is now invalid: rebuild it (build_cells)");

  std::copy(plan.new_off.begin(), plan.new_off.end(), off_out);
  {
    float* b = has_beta ? beta->data_ptr<float>() : nullptr;
    const float* nb = has_beta ? new_beta->data_ptr<float>() : nullptr;
    for (int64_t j = 0; j < C; ++j) {
      c1[ch[j]] = nc1[j];
      c2[ch[j]] = nc2[j];
      if (has_beta) b[ch[j]] = nb[j];
    }
  }
  // Finite max, as build_cells; the scaled masses of untouched cells stay valid while it is unchanged.
  const float lmax = log_n.masked_fill(log_n.isneginf(), -FLT_MAX).max().item<float>();
  log_n_max.data_ptr<float>()[0] = lmax;
  const bool same_max = lmax == old_lmax;
  float* cm = cell_mass.data_ptr<float>();
  const int64_t* off = plan.new_off.data();
  const float* bcsr = csr.bcsr;
  parallel_chunks(KK, 64, [&](ChunkQueue& queue) {
    for (int64_t b, e; queue.next(b, e);)
      for (int64_t c = b; c < e; ++c)
        if (!(same_max && !plan.affected[c])) cm[c] = imi::cell_scaled_mass(bcsr, off[c], off[c + 1], lmax);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(imi_softmax, CPU, m) { m.impl("update_cells_", &update_cells_inplace_cpu); }

}  // namespace imi_softmax
