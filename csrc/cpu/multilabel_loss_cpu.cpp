// Fused multi-label sampled softmax on CPU: the shared row bodies of imi_softmax/multilabel_loss.h,
// one query row per iteration. Each row's ids are checked just before the row reads weight rows with
// them (imi::first_invalid_multilabel_column); a bad row is skipped and its position recorded, and
// the op raises after the loop.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "../tensor_views.h"
#include "checked_rows.h"
#include "imi_softmax/multilabel_loss.h"

namespace imi_softmax {
namespace {

std::tuple<at::Tensor, at::Tensor> multilabel_softmax_forward_cpu(
    const at::Tensor& x_in, const at::Tensor& weight_in, const std::optional<at::Tensor>& bias_in,
    const at::Tensor& ids_in, const at::Tensor& log_q_in, int64_t num_positives, bool remove_accidental_hits,
    bool /*sparse_grad: used by autograd only*/) {
  check_multilabel_inputs("multilabel_softmax_forward", x_in, weight_in, bias_in, ids_in, log_q_in, num_positives);
  const LossTensors in = contiguous_loss_inputs(x_in, weight_in, bias_in, ids_in, log_q_in);
  const at::Tensor &x = in.x, &weight = in.weight, &ids = in.ids;  // log_q, bias: via in.pointers
  const int64_t B = x.size(0), d = x.size(1), LM = ids.size(1), N = weight.size(0), L = num_positives;
  const auto acc_opts = x.options().dtype(acc_scalar_type(x.scalar_type()));
  auto loss = at::empty({B, L}, acc_opts);
  auto lse = at::empty({B, L}, acc_opts);
  int64_t first_bad = IMI_NO_BAD_POSITION;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "multilabel_softmax_forward_cpu", [&] {
    using acc_t = typename imi::acc_type<scalar_t>::type;
    const auto [xp, wp, bp, idp, lqp] = in.pointers<scalar_t, acc_t>();
    const auto first_bad_column = [&](int64_t b) { return imi::first_invalid_multilabel_column(idp + b * LM, L, LM, N); };
    acc_t* lp = loss.data_ptr<acc_t>();
    acc_t* sp = lse.data_ptr<acc_t>();
    for_each_checked_row(
        B, LM, &first_bad, NoScratch{}, first_bad_column,
        [&](int64_t b) {
          std::fill(lp + b * L, lp + (b + 1) * L, std::numeric_limits<acc_t>::quiet_NaN());
          std::fill(sp + b * L, sp + (b + 1) * L, std::numeric_limits<acc_t>::quiet_NaN());
        },
        [&](int64_t b, NoScratch&) {
          imi::multilabel_row_forward<scalar_t, acc_t>(xp + b * d, wp, bp, d, idp + b * LM, lqp + b * LM, L, LM,
                                                       remove_accidental_hits, lp + b * L, sp + b * L);
        });
  });
  check_no_bad_position("multilabel_softmax_forward", "ids", first_bad, ids, multilabel_ids_allowed(N));
  return {loss, lse};
}

// Forward for training with the reduction's positive weights: also the coefficients and the query
// gradient of row_loss, computed while each row's weight rows are in cache
// (imi::multilabel_row_forward_grad; the backward only scales them).
std::tuple<at::Tensor, at::Tensor, at::Tensor> multilabel_softmax_train_cpu(
    const at::Tensor& x_in, const at::Tensor& weight_in, const std::optional<at::Tensor>& bias_in,
    const at::Tensor& ids_in, const at::Tensor& log_q_in, const at::Tensor& pos_weight_in, int64_t num_positives,
    bool remove_accidental_hits, bool /*sparse_grad: used by autograd only*/) {
  check_multilabel_inputs("multilabel_softmax_train", x_in, weight_in, bias_in, ids_in, log_q_in, num_positives);
  check_multilabel_pos_weight(pos_weight_in, x_in, num_positives);
  const LossTensors in = contiguous_loss_inputs(x_in, weight_in, bias_in, ids_in, log_q_in);
  const at::Tensor &x = in.x, &weight = in.weight, &ids = in.ids;  // log_q, bias: via in.pointers
  const at::Tensor pos_weight = pos_weight_in.contiguous();
  const int64_t B = x.size(0), d = x.size(1), LM = ids.size(1), N = weight.size(0), L = num_positives;
  const auto acc_opts = x.options().dtype(acc_scalar_type(x.scalar_type()));
  auto row_loss = at::empty({B}, acc_opts);
  auto coef = at::empty({B, LM}, acc_opts);
  auto grad_x = at::empty({B, d}, acc_opts);
  int64_t first_bad = IMI_NO_BAD_POSITION;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "multilabel_softmax_train_cpu", [&] {
    using acc_t = typename imi::acc_type<scalar_t>::type;
    const auto [xp, wp, bp, idp, lqp] = in.pointers<scalar_t, acc_t>();
    const auto first_bad_column = [&](int64_t b) { return imi::first_invalid_multilabel_column(idp + b * LM, L, LM, N); };
    const acc_t* pwp = pos_weight.data_ptr<acc_t>();
    acc_t* lp = row_loss.data_ptr<acc_t>();
    acc_t* cp = coef.data_ptr<acc_t>();
    acc_t* gxp = grad_x.data_ptr<acc_t>();
    for_each_checked_row(
        B, LM, &first_bad, std::vector<acc_t>(L), first_bad_column,
        [&](int64_t b) {
          lp[b] = std::numeric_limits<acc_t>::quiet_NaN();
          std::fill(cp + b * LM, cp + (b + 1) * LM, acc_t(0));
          std::fill(gxp + b * d, gxp + (b + 1) * d, acc_t(0));
        },
        [&](int64_t b, std::vector<acc_t>& lse_row) {
          imi::multilabel_row_forward_grad<scalar_t, acc_t>(xp + b * d, wp, bp, d, idp + b * LM, lqp + b * LM, L,
                                                            LM, remove_accidental_hits, pwp + b * L, lp + b,
                                                            lse_row.data(), cp + b * LM, gxp + b * d);
        });
  });
  check_no_bad_position("multilabel_softmax_train", "ids", first_bad, ids, multilabel_ids_allowed(N));
  return {row_loss, coef, grad_x};
}

std::tuple<at::Tensor, at::Tensor> multilabel_softmax_backward_cpu(
    const at::Tensor& grad_loss_in, const at::Tensor& x_in, const at::Tensor& weight_in,
    const std::optional<at::Tensor>& bias_in, const at::Tensor& ids_in, const at::Tensor& log_q_in,
    const at::Tensor& lse_in, int64_t num_positives, bool remove_accidental_hits) {
  check_multilabel_inputs("multilabel_softmax_backward", x_in, weight_in, bias_in, ids_in, log_q_in, num_positives);
  check_multilabel_backward_inputs(grad_loss_in, lse_in, x_in, num_positives);
  const LossTensors in = contiguous_loss_inputs(x_in, weight_in, bias_in, ids_in, log_q_in);
  const at::Tensor &x = in.x, &weight = in.weight, &ids = in.ids;  // log_q, bias: via in.pointers
  const int64_t B = x.size(0), d = x.size(1), LM = ids.size(1), N = weight.size(0), L = num_positives;
  // Named locals: the kernel reads through their pointers, so they must outlive the loop.
  auto [grad_loss, lse, grad_x, coef] = loss_backward_tensors(grad_loss_in, lse_in, x, LM);
  int64_t first_bad = IMI_NO_BAD_POSITION;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "multilabel_softmax_backward_cpu", [&] {
    using acc_t = typename imi::acc_type<scalar_t>::type;
    const auto [xp, wp, bp, idp, lqp] = in.pointers<scalar_t, acc_t>();
    const auto first_bad_column = [&](int64_t b) { return imi::first_invalid_multilabel_column(idp + b * LM, L, LM, N); };
    const acc_t* gp = grad_loss.data_ptr<acc_t>();
    const acc_t* sp = lse.data_ptr<acc_t>();
    acc_t* cp = coef.data_ptr<acc_t>();
    scalar_t* gxp = grad_x.data_ptr<scalar_t>();
    for_each_checked_row(
        B, LM, &first_bad, std::vector<acc_t>(d), first_bad_column,
        [&](int64_t b) {
          std::fill(cp + b * LM, cp + (b + 1) * LM, acc_t(0));
          std::fill(gxp + b * d, gxp + (b + 1) * d, scalar_t(0));
        },
        [&](int64_t b, std::vector<acc_t>& gx_acc) {
          imi::multilabel_row_backward<scalar_t, acc_t>(xp + b * d, wp, bp, d, idp + b * LM, lqp + b * LM, L, LM,
                                                        remove_accidental_hits, gp + b * L, sp + b * L, cp + b * LM,
                                                        gx_acc.data(), gxp + b * d);
        });
  });
  check_no_bad_position("multilabel_softmax_backward", "ids", first_bad, ids, multilabel_ids_allowed(N));
  return {grad_x, coef};
}

}  // namespace

TORCH_LIBRARY_IMPL(imi_softmax, CPU, m) {
  m.impl("multilabel_softmax_forward", &multilabel_softmax_forward_cpu);
  m.impl("multilabel_softmax_train", &multilabel_softmax_train_cpu);
  m.impl("multilabel_softmax_backward", &multilabel_softmax_backward_cpu);
}

}  // namespace imi_softmax
