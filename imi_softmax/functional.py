"""Functional form of the fused sampled-softmax loss."""
from typing import Optional

import torch
from torch import Tensor

from ._ops import acc_dtype, ops
from ._validation import (FLOAT_DTYPES, check_class_ids, check_finite, check_flag, check_ignore_index, check_linear_inputs,
                          check_log_q, check_same_device, check_samples, check_tensor)

REDUCTIONS = ("mean", "sum", "none")


def sampled_softmax_loss(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    target: Tensor,
    sample_ids: Tensor,
    sample_log_q: Tensor,
    target_log_q: Tensor,
    *,
    remove_accidental_hits: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
    sparse_grad: bool = False,
) -> Tensor:
    """Bias-corrected sampled softmax cross-entropy (DESIGN.md, "Loss").

    Per row with target y and samples s_j drawn from Q(.|x):
    ``u_0 = x.w_y + b_y - log Q(y)``, ``u_j = x.w_sj + b_sj - log Q(s_j)`` (-inf for accidental hits
    when removed), ``loss = logsumexp(u) - u_0``. Gradients reach x and the rows of weight/bias that
    were used; log Q is a constant.

    Shapes: x [*, d], weight [N, d], bias [N] or None, target [*] int64 (ignore_index rows skipped),
    sample_ids [*, M] int64, sample_log_q [*, M], target_log_q [*].
    Returns a scalar ("mean" over non-ignored rows, NaN when there are none, as F.cross_entropy;
    or "sum") or per-row losses [*] ("none"). M = 0 is allowed: the loss over the target alone (0).
    ``sparse_grad=True`` makes weight.grad (and bias.grad) sparse COO tensors over the touched rows.
    """
    n = check_linear_inputs(x, weight, bias)
    batch_shape = x.shape[:-1]
    check_tensor("target", target)
    if target.shape != batch_shape:
        raise ValueError(f"target must have shape {tuple(batch_shape)} (x without its last dim), got {tuple(target.shape)}")
    check_samples(sample_ids, sample_log_q, batch_shape)
    check_tensor("target_log_q", target_log_q, dtypes=FLOAT_DTYPES)
    if target_log_q.shape != batch_shape:
        raise ValueError(f"target_log_q must have shape {tuple(batch_shape)}, got {tuple(target_log_q.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    check_ignore_index(ignore_index)  # a bool is refused: ignore_index=True would skip every target 1
    remove_accidental_hits = check_flag("remove_accidental_hits", remove_accidental_hits)
    sparse_grad = check_flag("sparse_grad", sparse_grad)
    check_same_device(x=x, weight=weight, bias=bias, target=target, sample_ids=sample_ids,
                      sample_log_q=sample_log_q, target_log_q=target_log_q)
    check_class_ids("target", target, n, ignore_index=ignore_index)
    check_class_ids("sample_ids", sample_ids, n)
    check_finite("x", x)
    check_log_q("sample_log_q", sample_log_q)
    check_log_q("target_log_q", torch.where(target == ignore_index, 0.0, target_log_q))  # ignored rows: unused
    return _sampled_softmax_loss(x, weight, bias, target, sample_ids, sample_log_q, target_log_q,
                                 remove_accidental_hits=remove_accidental_hits, ignore_index=ignore_index,
                                 reduction=reduction, sparse_grad=sparse_grad)


def _sampled_softmax_loss(x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, sample_ids: Tensor,
                          sample_log_q: Tensor, target_log_q: Tensor, *, remove_accidental_hits: bool,
                          ignore_index: int, reduction: str, sparse_grad: bool) -> Tensor:
    """sampled_softmax_loss after its checks. IMISoftmax calls it directly: it has checked x and the
    targets itself and its sampler made the samples, so the checks are not paid twice per step (each
    one is a parallel region, which waits for every thread on a busy machine). The kernels still
    check every id they read with."""
    n, d = weight.shape
    batch_shape = x.shape[:-1]
    m = sample_ids.shape[-1]
    acc = acc_dtype(x.dtype)
    flat_target = target.reshape(-1)
    rows = flat_target.shape[0]  # explicit: reshape(-1, m) is ambiguous when B = 0 or M = 0
    ignored = flat_target == ignore_index
    # Ignored rows are marked -1 for the kernels, so any ignore_index value works (even a valid id).
    kernel_target = torch.where(ignored, torch.full_like(flat_target, -1), flat_target)
    ids = torch.cat([kernel_target.unsqueeze(1), sample_ids.reshape(rows, m)], dim=1)
    tlq = torch.where(ignored, torch.zeros((), dtype=acc, device=x.device), target_log_q.reshape(-1).to(acc))
    log_q = torch.cat([tlq.unsqueeze(1), sample_log_q.reshape(rows, m).to(acc)], dim=1)
    args = (x.reshape(rows, d), weight, bias, ids, log_q, bool(remove_accidental_hits), -1, bool(sparse_grad))
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        # Training: the forward also computes the gradients for grad_loss = 1 while the weight rows
        # are in cache, so the backward never gathers the weight again.
        loss = ops.sampled_softmax_train(*args)[0]
    else:
        loss, _ = ops.sampled_softmax_forward(*args)
    if reduction == "none":
        return loss.reshape(batch_shape).to(x.dtype)
    total = loss.sum()
    if reduction == "sum":
        return total.to(x.dtype)
    return (total / (~ignored).sum().to(total.dtype)).to(x.dtype)


from .multilabel import multilabel_sampled_softmax_loss  # noqa: E402,F401  (public: IF.multilabel_sampled_softmax_loss)
