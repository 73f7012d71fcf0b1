// Fused sampled-softmax loss on CPU: the shared row bodies, one query row per iteration. Each row's
// ids are checked just before the row reads weight rows with them (imi::first_invalid_column); a
// bad row is skipped and its position recorded, and the op raises after the loop.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "../tensor_views.h"
#include "checked_rows.h"
#include "imi_softmax/sampled_loss.h"

namespace imi_softmax {
namespace {

std::tuple<at::Tensor, at::Tensor> sampled_softmax_forward_cpu(
    const at::Tensor& x_in, const at::Tensor& weight_in, const std::optional<at::Tensor>& bias_in,
    const at::Tensor& ids_in, const at::Tensor& log_q_in, bool remove_accidental_hits,
    int64_t ignore_index, bool /*sparse_grad: used by autograd only*/) {
  check_loss_inputs(x_in, weight_in, bias_in, ids_in, log_q_in);
  const LossTensors in = contiguous_loss_inputs(x_in, weight_in, bias_in, ids_in, log_q_in);
  const at::Tensor &x = in.x, &weight = in.weight, &ids = in.ids;  // log_q, bias: via in.pointers
  const int64_t B = x.size(0), d = x.size(1), M1 = ids.size(1), N = weight.size(0);
  const auto acc_opts = x.options().dtype(acc_scalar_type(x.scalar_type()));
  auto loss = at::empty({B}, acc_opts);
  auto lse = at::empty({B}, acc_opts);
  int64_t first_bad = IMI_NO_BAD_POSITION;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sampled_softmax_forward_cpu", [&] {
    using acc_t = typename imi::acc_type<scalar_t>::type;
    const auto [xp, wp, bp, idp, lqp] = in.pointers<scalar_t, acc_t>();
    const auto first_bad_column = [&](int64_t b) { return imi::first_invalid_column(idp + b * M1, M1, N, ignore_index); };
    acc_t* lp = loss.data_ptr<acc_t>();
    acc_t* sp = lse.data_ptr<acc_t>();
    for_each_checked_row(
        B, M1, &first_bad, NoScratch{}, first_bad_column,
        [&](int64_t b) { lp[b] = sp[b] = std::numeric_limits<acc_t>::quiet_NaN(); },
        [&](int64_t b, NoScratch&) {
          imi::sampled_row_forward<scalar_t, acc_t>(xp + b * d, wp, bp, d, idp + b * M1, lqp + b * M1, M1,
                                                    remove_accidental_hits, ignore_index, lp + b, sp + b);
        });
  });
  check_no_bad_position("sampled_softmax_forward", "ids", first_bad, ids, loss_ids_allowed(N, ignore_index));
  return {loss, lse};
}

// Forward for training: also the coefficients and the query gradient for grad_loss = 1, computed while
// each row's weight rows are in cache (the backward only scales them; imi::sampled_row_forward_grad).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sampled_softmax_train_cpu(
    const at::Tensor& x_in, const at::Tensor& weight_in, const std::optional<at::Tensor>& bias_in,
    const at::Tensor& ids_in, const at::Tensor& log_q_in, bool remove_accidental_hits,
    int64_t ignore_index, bool /*sparse_grad: used by autograd only*/) {
  check_loss_inputs(x_in, weight_in, bias_in, ids_in, log_q_in);
  const LossTensors in = contiguous_loss_inputs(x_in, weight_in, bias_in, ids_in, log_q_in);
  const at::Tensor &x = in.x, &weight = in.weight, &ids = in.ids;  // log_q, bias: via in.pointers
  const int64_t B = x.size(0), d = x.size(1), M1 = ids.size(1), N = weight.size(0);
  const auto acc_opts = x.options().dtype(acc_scalar_type(x.scalar_type()));
  auto loss = at::empty({B}, acc_opts);
  auto lse = at::empty({B}, acc_opts);
  auto coef = at::empty({B, M1}, acc_opts);
  auto grad_x = at::empty({B, d}, acc_opts);
  int64_t first_bad = IMI_NO_BAD_POSITION;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sampled_softmax_train_cpu", [&] {
    using acc_t = typename imi::acc_type<scalar_t>::type;
    const auto [xp, wp, bp, idp, lqp] = in.pointers<scalar_t, acc_t>();
    const auto first_bad_column = [&](int64_t b) { return imi::first_invalid_column(idp + b * M1, M1, N, ignore_index); };
    acc_t* lp = loss.data_ptr<acc_t>();
    acc_t* sp = lse.data_ptr<acc_t>();
    acc_t* cp = coef.data_ptr<acc_t>();
    acc_t* gxp = grad_x.data_ptr<acc_t>();
    for_each_checked_row(
        B, M1, &first_bad, NoScratch{}, first_bad_column,
        [&](int64_t b) {
          lp[b] = sp[b] = std::numeric_limits<acc_t>::quiet_NaN();
          std::fill(cp + b * M1, cp + (b + 1) * M1, acc_t(0));
          std::fill(gxp + b * d, gxp + (b + 1) * d, acc_t(0));
        },
        [&](int64_t b, NoScratch&) {
          imi::sampled_row_forward_grad<scalar_t, acc_t>(xp + b * d, wp, bp, d, idp + b * M1, lqp + b * M1, M1,
                                                         remove_accidental_hits, ignore_index, lp + b, sp + b,
                                                         cp + b * M1, gxp + b * d);
        });
  });
  check_no_bad_position("sampled_softmax_train", "ids", first_bad, ids, loss_ids_allowed(N, ignore_index));
  return {loss, lse, coef, grad_x};
}

std::tuple<at::Tensor, at::Tensor> sampled_softmax_backward_cpu(
    const at::Tensor& grad_loss_in, const at::Tensor& x_in, const at::Tensor& weight_in,
    const std::optional<at::Tensor>& bias_in, const at::Tensor& ids_in, const at::Tensor& log_q_in,
    const at::Tensor& lse_in, bool remove_accidental_hits, int64_t ignore_index) {
  check_loss_inputs(x_in, weight_in, bias_in, ids_in, log_q_in);
  check_loss_backward_inputs(grad_loss_in, lse_in, x_in);
  const LossTensors in = contiguous_loss_inputs(x_in, weight_in, bias_in, ids_in, log_q_in);
  const at::Tensor &x = in.x, &weight = in.weight, &ids = in.ids;  // log_q, bias: via in.pointers
  const int64_t B = x.size(0), d = x.size(1), M1 = ids.size(1), N = weight.size(0);
  // Named locals: the kernel reads through their pointers, so they must outlive the loop.
  auto [grad_loss, lse, grad_x, coef] = loss_backward_tensors(grad_loss_in, lse_in, x, M1);
  int64_t first_bad = IMI_NO_BAD_POSITION;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sampled_softmax_backward_cpu", [&] {
    using acc_t = typename imi::acc_type<scalar_t>::type;
    const auto [xp, wp, bp, idp, lqp] = in.pointers<scalar_t, acc_t>();
    const auto first_bad_column = [&](int64_t b) { return imi::first_invalid_column(idp + b * M1, M1, N, ignore_index); };
    const acc_t* gp = grad_loss.data_ptr<acc_t>();
    const acc_t* sp = lse.data_ptr<acc_t>();
    acc_t* cp = coef.data_ptr<acc_t>();
    scalar_t* gxp = grad_x.data_ptr<scalar_t>();
    for_each_checked_row(
        B, M1, &first_bad, std::vector<acc_t>(d), first_bad_column,
        [&](int64_t b) {
          std::fill(cp + b * M1, cp + (b + 1) * M1, acc_t(0));
          std::fill(gxp + b * d, gxp + (b + 1) * d, scalar_t(0));
        },
        [&](int64_t b, std::vector<acc_t>& gx_acc) {
          imi::sampled_row_backward<scalar_t, acc_t>(xp + b * d, wp, bp, d, idp + b * M1, lqp + b * M1, M1,
                                                     remove_accidental_hits, ignore_index, gp[b], sp[b],
                                                     cp + b * M1, gx_acc.data(), gxp + b * d);
        });
  });
  check_no_bad_position("sampled_softmax_backward", "ids", first_bad, ids, loss_ids_allowed(N, ignore_index));
  return {grad_x, coef};
}

}  // namespace

TORCH_LIBRARY_IMPL(imi_softmax, CPU, m) {
  m.impl("sampled_softmax_forward", &sampled_softmax_forward_cpu);
  m.impl("sampled_softmax_train", &sampled_softmax_train_cpu);
  m.impl("sampled_softmax_backward", &sampled_softmax_backward_cpu);
}

}  // namespace imi_softmax
