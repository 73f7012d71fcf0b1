"""Fused multi-label sampled softmax in pure PyTorch (csrc/include/imi_softmax/multilabel_loss.h).

ids/log_q [B, L+M]: columns [0, L) are the row's positives (-1 = padding), then M negatives.
u_c = x.w_c + b_c - log_q_c; a negative equal to any positive of its row is -inf when
remove_accidental_hits; S = logsumexp of the negatives; lse_p = logaddexp(u_p, S),
loss_p = lse_p - u_p (0 at pads). Accumulation in float32 (float64 for float64 inputs).
"""
from typing import Tuple

import torch
from torch import Tensor

from ._checks import (acc_dtype, check, check_backward_inputs, check_loss_inputs, check_no_bad_position,
                      check_same_device, in_range)


def _check(op: str, x: Tensor, weight: Tensor, bias, ids: Tensor, log_q: Tensor, num_positives: int) -> None:
    """check_multilabel_inputs: the loss ops' shapes and dtypes, then num_positives in [0, L+M]."""
    check_loss_inputs(x, weight, bias, ids, log_q)
    check(0 <= num_positives <= ids.shape[1], f"{op}: num_positives must be in [0, {ids.shape[1]}] (ids is "
                                              f"[B, L+M] with L = num_positives), got {num_positives}")


def _check_ids(op: str, ids: Tensor, n: int, num_positives: int) -> None:
    """imi::valid_multilabel_id: every id in [0, N), or -1 (padding) in the positive columns."""
    ok = in_range(ids, n)
    ok[:, :num_positives] |= ids[:, :num_positives] == -1
    check_no_bad_position(op, "ids", ids, ~ok, f"[0, {n}) (the positive columns: or -1, padding)")


def _logits(x, weight, bias, ids, log_q, num_positives, remove_accidental_hits):
    """(u [B, L+M] with pads and masked negatives at -inf, pad mask [B, L], safe ids)."""
    acc = acc_dtype(x.dtype)
    safe = ids.clamp_min(0)
    o = torch.einsum("bd,bcd->bc", x.to(acc), weight[safe].to(acc))
    if bias is not None:
        o = o + bias[safe].to(acc)
    u = o - log_q
    pos = ids[:, :num_positives]
    pad = pos < 0
    masked = torch.zeros_like(ids, dtype=torch.bool)
    masked[:, :num_positives] = pad
    if remove_accidental_hits and num_positives:
        neg = ids[:, num_positives:]
        masked[:, num_positives:] = (neg.unsqueeze(2) == pos.unsqueeze(1)).any(2)
    return u.masked_fill(masked, float("-inf")), pad, safe


def multilabel_softmax_forward(x, weight, bias, ids, log_q, num_positives: int, remove_accidental_hits: bool,
                               sparse_grad: bool) -> Tuple[Tensor, Tensor]:
    """(loss [B, L], lse [B, L]) in the accumulation dtype, 0 at pads."""
    _check("multilabel_softmax_forward", x, weight, bias, ids, log_q, num_positives)
    _check_ids("multilabel_softmax_forward", ids, weight.shape[0], num_positives)
    u, pad, _ = _logits(x, weight, bias, ids, log_q, num_positives, remove_accidental_hits)
    s = torch.logsumexp(u[:, num_positives:], dim=1, keepdim=True) if ids.shape[1] > num_positives else \
        torch.full((ids.shape[0], 1), float("-inf"), dtype=u.dtype, device=u.device)
    up = u[:, :num_positives]
    lse = torch.logaddexp(up, s.expand_as(up))
    zero = torch.zeros_like(lse)
    return torch.where(pad, zero, lse - up), torch.where(pad, zero, lse)


def multilabel_softmax_backward(grad_loss, x, weight, bias, ids, log_q, lse, num_positives: int,
                                remove_accidental_hits: bool) -> Tuple[Tensor, Tensor]:
    """(grad_x [B, d] in x's dtype, coef [B, L+M] = sum_p grad_loss_p d loss_p / d u_c)."""
    op = "multilabel_softmax_backward"
    _check(op, x, weight, bias, ids, log_q, num_positives)
    want = (x.shape[0], num_positives)
    check(grad_loss.shape == want and lse.shape == want, f"{op}: grad_loss and lse must be [B, L] = {list(want)}, got "
                                                         f"{list(grad_loss.shape)} and {list(lse.shape)}")
    check_backward_inputs(op, grad_loss, lse, x)
    _check_ids(op, ids, weight.shape[0], num_positives)
    grad_x, coef = _coef_and_grad_x(x, weight, bias, ids, log_q, num_positives, remove_accidental_hits,
                                    grad_loss, lse)
    return grad_x.to(x.dtype), coef


def _coef_and_grad_x(x, weight, bias, ids, log_q, num_positives, remove_accidental_hits, grad_loss, lse):
    """(grad_x [B, d], coef [B, L+M]) in the accumulation dtype for the upstream gradient grad_loss [B, L]."""
    acc = acc_dtype(x.dtype)
    u, pad, safe = _logits(x, weight, bias, ids, log_q, num_positives, remove_accidental_hits)
    g = torch.where(pad, torch.zeros((), dtype=acc, device=x.device), grad_loss.to(acc))
    lse = torch.where(pad, torch.zeros((), dtype=acc, device=x.device), lse.to(acc))
    up = u[:, :num_positives]
    pos_coef = torch.where(pad, torch.zeros_like(up), g * (torch.exp(up - lse) - 1))
    un = u[:, num_positives:]
    terms = g.unsqueeze(1) * torch.exp(un.unsqueeze(2) - lse.unsqueeze(1))  # [B, M, L]; exp(-inf) = 0 when masked
    neg_coef = torch.where(pad.unsqueeze(1), torch.zeros_like(terms), terms).sum(2)
    coef = torch.cat([pos_coef, neg_coef], dim=1)
    return torch.einsum("bc,bcd->bd", coef, weight[safe].to(acc)), coef


def multilabel_softmax_train(x, weight, bias, ids, log_q, pos_weight, num_positives: int,
                             remove_accidental_hits: bool, sparse_grad: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """(row_loss [B] = sum_p pos_weight_p loss_p, coef [B, L+M] and grad_x [B, d] of row_loss), all in the
    accumulation dtype: the forward, then the backward with grad_loss = pos_weight."""
    op = "multilabel_softmax_train"
    _check(op, x, weight, bias, ids, log_q, num_positives)
    acc = acc_dtype(x.dtype)
    want = (x.shape[0], num_positives)
    check(pos_weight.shape == want, f"{op}: pos_weight must be [B, L] = {list(want)}, got {list(pos_weight.shape)}")
    check(pos_weight.dtype == acc, f"{op}: pos_weight must have the accumulation dtype of x ({acc}), got "
                                   f"{pos_weight.dtype}")
    check_same_device(op, x=x, pos_weight=pos_weight)
    _check_ids(op, ids, weight.shape[0], num_positives)
    loss, lse = multilabel_softmax_forward(x, weight, bias, ids, log_q, num_positives, remove_accidental_hits,
                                           sparse_grad)
    grad_x, coef = _coef_and_grad_x(x, weight, bias, ids, log_q, num_positives, remove_accidental_hits,
                                    pos_weight, lse)
    return (loss * pos_weight).sum(1), coef, grad_x
