// Weight/bias gradients from the per-column coefficients: grad_w[id] += coef * x_b.
// Threads split the feature dimension, not the entries, so no two threads write the same
// address: no atomics, and the result is deterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <memory>
#include <vector>

#include "../tensor_views.h"

namespace imi_softmax {
namespace {

void check_grad_inputs(const at::Tensor& coef, const at::Tensor& ids, const at::Tensor& x) {
  TORCH_CHECK(ids.dim() == 2 && coef.sizes() == ids.sizes() && ids.scalar_type() == at::kLong,
              "weight_grad: coef and ids must be [B, 1+M], ids int64");
  TORCH_CHECK(x.dim() == 2 && x.size(0) == ids.size(0), "weight_grad: x must be [B, d]");
  TORCH_CHECK(coef.scalar_type() == acc_scalar_type(x.scalar_type()),
              "weight_grad: coef dtype must be the accumulation dtype of x");
}

void check_ids_below(const at::Tensor& ids, int64_t num_classes) {
  const int64_t* p = ids.data_ptr<int64_t>();
  for (int64_t e = 0; e < ids.numel(); ++e)
    TORCH_CHECK(p[e] < num_classes, "weight_grad: class id ", p[e], " >= num_classes ", num_classes);
}

// rows_of(id) maps a class id to its output row (identity for dense, slot for sparse).
template <typename scalar_t, typename acc_t, typename RowOf>
void accumulate_rows(const at::Tensor& coef, const at::Tensor& ids, const at::Tensor& x,
                     acc_t* grad_w, acc_t* grad_b, RowOf rows_of) {
  const int64_t B = ids.size(0), M1 = ids.size(1), d = x.size(1);
  const acc_t* cp = coef.data_ptr<acc_t>();
  const int64_t* idp = ids.data_ptr<int64_t>();
  const scalar_t* xp = x.data_ptr<scalar_t>();
  at::parallel_for(0, d, 16, [&](int64_t d0, int64_t d1) {
    for (int64_t b = 0; b < B; ++b) {
      const scalar_t* xr = xp + b * d;
      for (int64_t j = 0; j < M1; ++j) {
        const int64_t id = idp[b * M1 + j];
        const acc_t c = cp[b * M1 + j];
        if (id < 0 || c == acc_t(0)) continue;
        acc_t* g = grad_w + rows_of(id) * d;
        for (int64_t i = d0; i < d1; ++i) g[i] += c * static_cast<acc_t>(xr[i]);
        if (d0 == 0) grad_b[rows_of(id)] += c;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> dense_weight_grad_cpu(const at::Tensor& coef_in,
                                                         const at::Tensor& ids_in,
                                                         const at::Tensor& x_in, int64_t num_classes) {
  check_grad_inputs(coef_in, ids_in, x_in);
  const auto coef = coef_in.contiguous();
  const auto ids = ids_in.contiguous();
  const auto x = x_in.contiguous();
  check_ids_below(ids, num_classes);
  const auto acc = coef.scalar_type();
  auto grad_w = at::zeros({num_classes, x.size(1)}, x.options().dtype(acc));
  auto grad_b = at::zeros({num_classes}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dense_weight_grad_cpu", [&] {
    using acc_t = typename imi::acc_type<scalar_t>::type;
    accumulate_rows<scalar_t, acc_t>(coef, ids, x, grad_w.data_ptr<acc_t>(), grad_b.data_ptr<acc_t>(),
                                     [](int64_t id) { return id; });
  });
  return {grad_w.to(x.scalar_type()), grad_b.to(x.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_weight_grad_cpu(const at::Tensor& coef_in,
                                                                      const at::Tensor& ids_in,
                                                                      const at::Tensor& x_in,
                                                                      int64_t num_classes) {
  check_grad_inputs(coef_in, ids_in, x_in);
  const auto coef = coef_in.contiguous();
  const auto ids = ids_in.contiguous();
  const auto x = x_in.contiguous();
  check_ids_below(ids, num_classes);
  const int64_t E = ids.numel();
  const int64_t* idp = ids.data_ptr<int64_t>();
  // Presence flags then an ordered scan give sorted unique ids without a sort.
  std::vector<uint8_t> present(num_classes, 0);
  for (int64_t e = 0; e < E; ++e)
    if (idp[e] >= 0) present[idp[e]] = 1;
  std::unique_ptr<int64_t[]> slot(new int64_t[num_classes]);
  std::vector<int64_t> unique;
  for (int64_t c = 0; c < num_classes; ++c)
    if (present[c]) { slot[c] = static_cast<int64_t>(unique.size()); unique.push_back(c); }
  const int64_t U = static_cast<int64_t>(unique.size());
  auto unique_ids = at::empty({U}, ids.options());
  std::copy(unique.begin(), unique.end(), unique_ids.data_ptr<int64_t>());
  const auto acc = coef.scalar_type();
  auto rows = at::zeros({U, x.size(1)}, x.options().dtype(acc));
  auto bias_rows = at::zeros({U}, x.options().dtype(acc));
  const int64_t* sp = slot.get();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sparse_weight_grad_cpu", [&] {
    using acc_t = typename imi::acc_type<scalar_t>::type;
    accumulate_rows<scalar_t, acc_t>(coef, ids, x, rows.data_ptr<acc_t>(), bias_rows.data_ptr<acc_t>(),
                                     [sp](int64_t id) { return sp[id]; });
  });
  return {unique_ids, rows.to(x.scalar_type()), bias_rows.to(x.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(imi_softmax, CPU, m) {
  m.impl("dense_weight_grad", &dense_weight_grad_cpu);
  m.impl("sparse_weight_grad", &sparse_weight_grad_cpu);
}

}  // namespace imi_softmax
