"""Fused sampled softmax and its weight gradients in pure PyTorch (csrc/include/imi_softmax/sampled_loss.h).

Column 0 of ids/log_q [B, 1+M] is the target; u_j = x.w_id + b_id - log_q_j, accidental hits
(j > 0 and ids[b, j] == ids[b, 0]) are -inf when removed, loss = logsumexp(u) - u_0. Rows whose
target is ignore_index give loss 0, lse 0 and zero coefficients. Accumulation in float32 (float64
for float64 inputs), as the kernels do.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from ._checks import (acc_dtype, check, check_backward_inputs, check_loss_inputs, check_no_bad_position,
                      check_same_device, checked_size_product, in_range)

_ROWS_PER_CHUNK_ELEMS = 1 << 24  # bound on the gathered [rows, 1+M, d] block


def _check_ids(op: str, ids: Tensor, n: int, ignore_index: int) -> None:
    """imi::valid_column_id: every id in [0, N), or ignore_index in column 0 (the target)."""
    ok = in_range(ids, n)
    ok[:, 0] |= ids[:, 0] == ignore_index
    check_no_bad_position(op, "ids", ids, ~ok, f"[0, {n}) (column 0: or ignore_index = {ignore_index})")


def _corrected_logits(x, weight, bias, ids, log_q, remove_accidental_hits, ignore_index):
    """(u [B, 1+M] in the accumulation dtype with masked columns at -inf, ignored-row mask [B], safe ids)."""
    acc = acc_dtype(x.dtype)
    ignored = ids[:, 0] == ignore_index
    # ignore_index may lie outside [0, N): an ignored row reads class 0 (its outputs are zeroed)
    safe = torch.where(in_range(ids, weight.shape[0]), ids, torch.zeros_like(ids))
    rows = max(1, _ROWS_PER_CHUNK_ELEMS // max(1, ids.shape[1] * x.shape[1]))
    parts = []
    for start in range(0, x.shape[0], rows):
        w = weight[safe[start:start + rows]].to(acc)                     # [b, 1+M, d]
        parts.append(torch.einsum("bd,bmd->bm", x[start:start + rows].to(acc), w))
    o = torch.cat(parts) if parts else torch.zeros(ids.shape, dtype=acc, device=x.device)
    if bias is not None:
        o = o + bias[safe].to(acc)
    u = o - log_q
    if remove_accidental_hits:
        hit = ids == ids[:, :1]
        hit[:, 0] = False
        u = u.masked_fill(hit, float("-inf"))
    return u, ignored, safe


def sampled_softmax_forward(x, weight, bias, ids, log_q, remove_accidental_hits: bool, ignore_index: int,
                            sparse_grad: bool) -> Tuple[Tensor, Tensor]:
    """(loss [B], lse [B]) in the accumulation dtype."""
    check_loss_inputs(x, weight, bias, ids, log_q)
    _check_ids("sampled_softmax_forward", ids, weight.shape[0], ignore_index)
    u, ignored, _ = _corrected_logits(x, weight, bias, ids, log_q, remove_accidental_hits, ignore_index)
    lse = torch.logsumexp(u, dim=1)
    loss = lse - u[:, 0]
    zero = torch.zeros_like(lse)
    return torch.where(ignored, zero, loss), torch.where(ignored, zero, lse)


def sampled_softmax_train(x, weight, bias, ids, log_q, remove_accidental_hits: bool, ignore_index: int,
                          sparse_grad: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss [B], lse [B], coef [B, 1+M], grad_x [B, d]), all in the accumulation dtype: the forward and
    its gradients for grad_loss = 1 (coef = d loss_b / d u_bj, grad_x = sum_j coef_bj w_{ids_bj})."""
    check_loss_inputs(x, weight, bias, ids, log_q)
    _check_ids("sampled_softmax_train", ids, weight.shape[0], ignore_index)
    acc = acc_dtype(x.dtype)
    u, ignored, safe = _corrected_logits(x, weight, bias, ids, log_q, remove_accidental_hits, ignore_index)
    lse = torch.logsumexp(u, dim=1)
    loss = lse - u[:, 0]
    zero = torch.zeros_like(lse)
    loss, lse = torch.where(ignored, zero, loss), torch.where(ignored, zero, lse)
    coef = torch.exp(u - lse[:, None])  # exp(-inf) = 0 for masked columns
    coef[:, 0] -= 1
    coef = torch.where(ignored[:, None], torch.zeros_like(coef), coef)
    grad_x = torch.einsum("bm,bmd->bd", coef, weight[safe].to(acc))
    return loss, lse, coef, grad_x


def sampled_softmax_backward(grad_loss, x, weight, bias, ids, log_q, lse, remove_accidental_hits: bool,
                             ignore_index: int) -> Tuple[Tensor, Tensor]:
    """(grad_x [B, d] in x's dtype, coef [B, 1+M] = d loss_b / d u_bj * grad_loss_b)."""
    check_loss_inputs(x, weight, bias, ids, log_q)
    B = x.shape[0]
    check(grad_loss.numel() == B and lse.numel() == B, f"sampled_softmax_backward: grad_loss and lse must be [B] = "
                                                       f"[{B}], got {list(grad_loss.shape)} and {list(lse.shape)}")
    check_backward_inputs("sampled_softmax_backward", grad_loss, lse, x)
    _check_ids("sampled_softmax_backward", ids, weight.shape[0], ignore_index)
    acc = acc_dtype(x.dtype)
    u, ignored, safe = _corrected_logits(x, weight, bias, ids, log_q, remove_accidental_hits, ignore_index)
    p = torch.exp(u - lse.reshape(-1, 1).to(acc))  # exp(-inf) = 0 for masked columns
    p[:, 0] -= 1
    coef = p * grad_loss.reshape(-1, 1).to(acc)
    coef = torch.where(ignored[:, None], torch.zeros_like(coef), coef)
    grad_x = torch.einsum("bm,bmd->bd", coef, weight[safe].to(acc))
    return grad_x.to(x.dtype), coef


def _weight_grad_inputs(op: str, coef: Tensor, ids: Tensor, x: Tensor, num_classes: int) -> Tensor:
    """The entries that add to a class's gradient (imi::weight_grad_entry): ids in [0, num_classes).
    -1 (the ignore marker, also padding) and any id whose coef is exactly 0 (an ignored row, whatever
    its marker) are skipped; any other id raises."""
    check(ids.dim() == 2 and coef.shape == ids.shape and ids.dtype == torch.int64,
          f"{op}: coef and ids must be [B, 1+M], ids int64")
    check(x.dim() == 2 and x.shape[0] == ids.shape[0], f"{op}: x must be [B, d]")
    check(coef.dtype == acc_dtype(x.dtype), f"{op}: coef dtype must be the accumulation dtype of x")
    check(num_classes >= 0, f"{op}: num_classes must be >= 0, got {num_classes}")
    checked_size_product(op, "num_classes * d", num_classes, x.shape[1])
    check_same_device(op, x=x, coef=coef, ids=ids)
    keep = in_range(ids, num_classes)
    bad = ~keep & (ids != -1) & (coef != 0)
    check_no_bad_position(op, "ids", ids, bad, f"[0, num_classes = {num_classes}) (-1, or any id with coef 0, is "
                                               f"skipped)")
    return keep


def _class_sums(coef, ids, x, num_classes, keep):
    """Per-class sums of coef * x_b and of coef, over the entries kept, in position order."""
    acc = coef.dtype
    flat_ids = ids[keep]
    rows = keep.nonzero()[:, 0]
    c = coef[keep]
    gw = torch.zeros(num_classes, x.shape[1], dtype=acc, device=x.device)
    gw.index_add_(0, flat_ids, c[:, None] * x[rows].to(acc))
    gb = torch.zeros(num_classes, dtype=acc, device=x.device).index_add_(0, flat_ids, c)
    return gw, gb


def dense_weight_grad(coef, ids, x, num_classes: int) -> Tuple[Tensor, Tensor]:
    """(grad_weight [N, d], grad_bias [N]) in x's dtype."""
    keep = _weight_grad_inputs("dense_weight_grad", coef, ids, x, num_classes)
    gw, gb = _class_sums(coef, ids, x, num_classes, keep)
    return gw.to(x.dtype), gb.to(x.dtype)


def sparse_weight_grad(coef, ids, x, num_classes: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(sorted unique touched ids [U], their weight-grad rows [U, d], bias grads [U])."""
    keep = _weight_grad_inputs("sparse_weight_grad", coef, ids, x, num_classes)
    uniq, inverse = torch.unique(ids[keep], sorted=True, return_inverse=True)
    rows = keep.nonzero()[:, 0]
    c = coef[keep]
    gw = torch.zeros(uniq.shape[0], x.shape[1], dtype=coef.dtype, device=x.device)
    gw.index_add_(0, inverse, c[:, None] * x[rows].to(coef.dtype))
    gb = torch.zeros(uniq.shape[0], dtype=coef.dtype, device=x.device).index_add_(0, inverse, c)
    return uniq, gw.to(x.dtype), gb.to(x.dtype)
