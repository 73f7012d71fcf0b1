// Weight/bias gradients from the per-column coefficients: grad_w[id] += coef * x_b.
// Entries are grouped by class with a radix sort; then each touched row is computed once, in
// parallel over rows, by one thread: no atomics, deterministic, and the sparse output needs no
// zero fill.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "../tensor_views.h"
#include "fresh_zeros.h"
#include "parallel_chunks.h"
#include "recycled_rows.h"
#include "imi_softmax/sampled_loss.h"

namespace imi_softmax {
namespace {

// Entries (flat positions in ids) grouped by class: classes[u] is the u-th touched class in
// ascending order, its entries are order[start[u] .. start[u+1]) in increasing position (so sums
// run in a fixed order). Entries are used, skipped or rejected by imi::weight_grad_entry (the
// first rejected position is returned in first_bad). An LSD radix sort of the E entries by class
// id, 11 bits a pass: its memory is O(E), never O(num_classes), so nothing of size N is allocated,
// zeroed or page-faulted per step.
struct ClassGroups {
  std::vector<int64_t> classes, start, order;
  int64_t first_bad = IMI_NO_BAD_POSITION;
};

template <typename acc_t>
ClassGroups group_by_class(const at::Tensor& ids, const at::Tensor& coef, int64_t num_classes) {
  const int64_t* idp = ids.data_ptr<int64_t>();
  const acc_t* cp = coef.data_ptr<acc_t>();
  const int64_t E = ids.numel();
  ClassGroups g;
  std::vector<int64_t> order, next;
  order.reserve(E);
  for (int64_t e = 0; e < E; ++e) {
    const imi::Entry use = imi::weight_grad_entry(idp[e], cp[e], num_classes);
    if (use == imi::Entry::kUse) {
      order.push_back(e);
    } else if (use == imi::Entry::kBad) {
      g.first_bad = e;
      return g;
    }
  }
  const int64_t n = static_cast<int64_t>(order.size());
  next.resize(n);
  constexpr int kBits = 11;
  constexpr int64_t kBuckets = int64_t(1) << kBits;
  std::vector<int64_t> count(kBuckets + 1);
  for (int shift = 0; shift < 63 && (num_classes - 1) >> shift > 0; shift += kBits) {
    std::fill(count.begin(), count.end(), 0);
    for (int64_t k = 0; k < n; ++k) ++count[((idp[order[k]] >> shift) & (kBuckets - 1)) + 1];
    for (int64_t b = 0; b < kBuckets; ++b) count[b + 1] += count[b];
    for (int64_t k = 0; k < n; ++k) next[count[(idp[order[k]] >> shift) & (kBuckets - 1)]++] = order[k];
    order.swap(next);
  }
  for (int64_t k = 0; k < n; ++k) {
    const int64_t id = idp[order[k]];
    if (g.classes.empty() || g.classes.back() != id) {
      g.classes.push_back(id);
      g.start.push_back(k);
    }
  }
  g.start.push_back(n);
  g.order = std::move(order);
  return g;
}

ClassGroups checked_groups(const char* op, const at::Tensor& ids, const at::Tensor& coef, int64_t num_classes) {
  ClassGroups g;
  AT_DISPATCH_FLOATING_TYPES(coef.scalar_type(), "weight_grad_groups", [&] { g = group_by_class<scalar_t>(ids, coef, num_classes); });
  check_no_bad_position(op, "ids", g.first_bad, ids, weight_grad_ids_allowed(num_classes));
  return g;
}

// Row u of the output (at out_w + row_of(u) * d, bias at out_b[row_of(u)]) = sum over the
// entries of class u of coef * x_b.
template <typename scalar_t, typename acc_t, typename RowOf>
void reduce_groups(const ClassGroups& g, const at::Tensor& coef, const at::Tensor& x, int64_t M1,
                   scalar_t* out_w, scalar_t* out_b, RowOf row_of) {
  const int64_t d = x.size(1), U = static_cast<int64_t>(g.classes.size());
  const acc_t* cp = coef.data_ptr<acc_t>();
  const scalar_t* xp = x.data_ptr<scalar_t>();
  parallel_chunks(U, 256, [&](ChunkQueue& queue) {
    std::vector<acc_t> acc(d);
    for (int64_t u0, u1; queue.next(u0, u1);)
    for (int64_t u = u0; u < u1; ++u) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      acc_t bias = acc_t(0);
      for (int64_t k = g.start[u]; k < g.start[u + 1]; ++k) {
        const int64_t e = g.order[k];
        const acc_t c = cp[e];
        const scalar_t* xr = xp + (e / M1) * d;
        for (int64_t i = 0; i < d; ++i) acc[i] += imi::weight_grad_term<scalar_t, acc_t>(c, xr[i]);
        bias += c;
      }
      const int64_t row = row_of(u);
      scalar_t* w = out_w + row * d;
      for (int64_t i = 0; i < d; ++i) w[i] = static_cast<scalar_t>(acc[i]);
      out_b[row] = static_cast<scalar_t>(bias);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> dense_weight_grad_cpu(const at::Tensor& coef_in,
                                                         const at::Tensor& ids_in,
                                                         const at::Tensor& x_in, int64_t num_classes) {
  at::Tensor coef, ids, x;
  std::tie(coef, ids, x) = weight_grad_inputs("dense_weight_grad", coef_in, ids_in, x_in, num_classes);
  const ClassGroups g = checked_groups("dense_weight_grad", ids, coef, num_classes);
  auto grad_w = fresh_zeros({num_classes, x.size(1)}, x.options());  // untouched rows stay zero
  // zeroed by this thread: at::zeros would fill N entries in a parallel region of its own
  auto grad_b = at::empty({num_classes}, x.options());
  std::memset(grad_b.data_ptr(), 0, grad_b.nbytes());  // all-zero bits are +0 in every float type
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dense_weight_grad_cpu", [&] {
    using acc_t = typename imi::acc_type<scalar_t>::type;
    const int64_t* classes = g.classes.data();
    reduce_groups<scalar_t, acc_t>(g, coef, x, ids.size(1), grad_w.data_ptr<scalar_t>(),
                                   grad_b.data_ptr<scalar_t>(), [classes](int64_t u) { return classes[u]; });
  });
  return {grad_w, grad_b};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_weight_grad_cpu(const at::Tensor& coef_in,
                                                                      const at::Tensor& ids_in,
                                                                      const at::Tensor& x_in,
                                                                      int64_t num_classes) {
  at::Tensor coef, ids, x;
  std::tie(coef, ids, x) = weight_grad_inputs("sparse_weight_grad", coef_in, ids_in, x_in, num_classes);
  const ClassGroups g = checked_groups("sparse_weight_grad", ids, coef, num_classes);
  const int64_t U = static_cast<int64_t>(g.classes.size());
  auto unique_ids = at::empty({U}, ids.options());
  std::copy(g.classes.begin(), g.classes.end(), unique_ids.data_ptr<int64_t>());
  // every row is written once: a mapping an earlier step's gradient handed back (no page faults)
  auto rows = recycled_empty({U, x.size(1)}, x.options());
  auto bias_rows = at::empty({U}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sparse_weight_grad_cpu", [&] {
    using acc_t = typename imi::acc_type<scalar_t>::type;
    reduce_groups<scalar_t, acc_t>(g, coef, x, ids.size(1), rows.data_ptr<scalar_t>(),
                                   bias_rows.data_ptr<scalar_t>(), [](int64_t u) { return u; });
  });
  return {unique_ids, rows, bias_rows};
}

}  // namespace

TORCH_LIBRARY_IMPL(imi_softmax, CPU, m) {
  m.impl("dense_weight_grad", &dense_weight_grad_cpu);
  m.impl("sparse_weight_grad", &sparse_weight_grad_cpu);
}

}  // namespace imi_softmax
