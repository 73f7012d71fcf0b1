// Fused sampled-softmax loss on CPU: the shared row bodies, one query row per iteration.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../tensor_views.h"
#include "imi_softmax/sampled_loss.h"

namespace imi_softmax {
namespace {

std::tuple<at::Tensor, at::Tensor> sampled_softmax_forward_cpu(
    const at::Tensor& x_in, const at::Tensor& weight_in, const std::optional<at::Tensor>& bias_in,
    const at::Tensor& ids_in, const at::Tensor& log_q_in, bool remove_accidental_hits,
    int64_t ignore_index, bool /*sparse_grad: used by autograd only*/) {
  check_loss_inputs(x_in, weight_in, bias_in, ids_in, log_q_in);
  const auto x = x_in.contiguous();
  const auto weight = weight_in.contiguous();
  const auto ids = ids_in.contiguous();
  const auto log_q = log_q_in.contiguous();
  const at::Tensor bias = bias_in.has_value() && bias_in->defined() ? bias_in->contiguous() : at::Tensor();
  const int64_t B = x.size(0), d = x.size(1), M1 = ids.size(1);
  const auto acc_opts = x.options().dtype(acc_scalar_type(x.scalar_type()));
  auto loss = at::empty({B}, acc_opts);
  auto lse = at::empty({B}, acc_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sampled_softmax_forward_cpu", [&] {
    using acc_t = typename imi::acc_type<scalar_t>::type;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    const scalar_t* bp = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
    const int64_t* idp = ids.data_ptr<int64_t>();
    const acc_t* lqp = log_q.data_ptr<acc_t>();
    acc_t* lp = loss.data_ptr<acc_t>();
    acc_t* sp = lse.data_ptr<acc_t>();
    at::parallel_for(0, B, 8, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        imi::sampled_row_forward<scalar_t, acc_t>(xp + b * d, wp, bp, d, idp + b * M1, lqp + b * M1, M1,
                                                  remove_accidental_hits, ignore_index, lp + b, sp + b);
    });
  });
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor> sampled_softmax_backward_cpu(
    const at::Tensor& grad_loss_in, const at::Tensor& x_in, const at::Tensor& weight_in,
    const std::optional<at::Tensor>& bias_in, const at::Tensor& ids_in, const at::Tensor& log_q_in,
    const at::Tensor& lse_in, bool remove_accidental_hits, int64_t ignore_index) {
  check_loss_inputs(x_in, weight_in, bias_in, ids_in, log_q_in);
  const auto x = x_in.contiguous();
  const auto weight = weight_in.contiguous();
  const auto ids = ids_in.contiguous();
  const auto log_q = log_q_in.contiguous();
  const auto lse = lse_in.contiguous();
  const auto grad_loss = grad_loss_in.contiguous();
  TORCH_CHECK(grad_loss.numel() == x.size(0) && lse.numel() == x.size(0),
              "sampled_softmax_backward: grad_loss and lse must be [B]");
  const at::Tensor bias = bias_in.has_value() && bias_in->defined() ? bias_in->contiguous() : at::Tensor();
  const int64_t B = x.size(0), d = x.size(1), M1 = ids.size(1);
  auto grad_x = at::empty_like(x);
  auto coef = at::empty({B, M1}, x.options().dtype(acc_scalar_type(x.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sampled_softmax_backward_cpu", [&] {
    using acc_t = typename imi::acc_type<scalar_t>::type;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    const scalar_t* bp = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
    const int64_t* idp = ids.data_ptr<int64_t>();
    const acc_t* lqp = log_q.data_ptr<acc_t>();
    const acc_t* gp = grad_loss.to(coef.scalar_type()).contiguous().data_ptr<acc_t>();
    const acc_t* sp = lse.to(coef.scalar_type()).contiguous().data_ptr<acc_t>();
    acc_t* cp = coef.data_ptr<acc_t>();
    scalar_t* gxp = grad_x.data_ptr<scalar_t>();
    at::parallel_for(0, B, 8, [&](int64_t b0, int64_t b1) {
      std::vector<acc_t> gx_acc(d);
      for (int64_t b = b0; b < b1; ++b)
        imi::sampled_row_backward<scalar_t, acc_t>(xp + b * d, wp, bp, d, idp + b * M1, lqp + b * M1, M1,
                                                   remove_accidental_hits, ignore_index, gp[b], sp[b],
                                                   cp + b * M1, gx_acc.data(), gxp + b * d);
    });
  });
  return {grad_x, coef};
}

}  // namespace

TORCH_LIBRARY_IMPL(imi_softmax, CPU, m) {
  m.impl("sampled_softmax_forward", &sampled_softmax_forward_cpu);
  m.impl("sampled_softmax_backward", &sampled_softmax_backward_cpu);
}

}  // namespace imi_softmax
