"""Fused multi-label sampled softmax in pure PyTorch (csrc/include/imi_softmax/multilabel_loss.h).

ids/log_q [B, L+M]: columns [0, L) are the row's positives (-1 = padding), then M negatives.
u_c = x.w_c + b_c - log_q_c; a negative equal to any positive of its row is -inf when
remove_accidental_hits; S = logsumexp of the negatives; lse_p = logaddexp(u_p, S),
loss_p = lse_p - u_p (0 at pads). Accumulation in float32 (float64 for float64 inputs).
"""
from typing import Tuple

import torch
from torch import Tensor

from .loss import acc_dtype


def _check(op: str, x: Tensor, weight: Tensor, bias, ids: Tensor, log_q: Tensor, num_positives: int) -> None:
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise RuntimeError(f"{op}: x must be [B, d] and weight [N, d], got {tuple(x.shape)} and {tuple(weight.shape)}")
    if ids.dim() != 2 or ids.shape[0] != x.shape[0] or ids.dtype != torch.int64 or ids.shape[1] < 1:
        raise RuntimeError(f"{op}: ids must be int64 [B, L+M] with B = {x.shape[0]}, got {tuple(ids.shape)}")
    if log_q.shape != ids.shape or log_q.dtype != acc_dtype(x.dtype):
        raise RuntimeError(f"{op}: log_q must be {acc_dtype(x.dtype)} {tuple(ids.shape)}")
    if weight.dtype != x.dtype or (bias is not None and (bias.dtype != x.dtype or bias.shape != (weight.shape[0],))):
        raise RuntimeError(f"{op}: weight and bias must have x's dtype and bias be [N]")
    if not 0 <= num_positives <= ids.shape[1]:
        raise RuntimeError(f"{op}: num_positives must be in [0, {ids.shape[1]}], got {num_positives}")
    n = weight.shape[0]
    ok = (ids >= 0) & (ids < n)
    ok[:, :num_positives] |= ids[:, :num_positives] == -1
    if not bool(ok.all()):
        raise RuntimeError(f"{op}: ids holds {int(ids[~ok][0])}, outside [0, {n}) (positives may be -1, padding)")


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
    _check("multilabel_softmax_backward", x, weight, bias, ids, log_q, num_positives)
    want = (x.shape[0], num_positives)
    if tuple(grad_loss.shape) != want or tuple(lse.shape) != want:
        raise RuntimeError(f"multilabel_softmax_backward: grad_loss and lse must be [B, L] = {list(want)}")
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
    _check("multilabel_softmax_train", x, weight, bias, ids, log_q, num_positives)
    acc = acc_dtype(x.dtype)
    if tuple(pos_weight.shape) != (x.shape[0], num_positives) or pos_weight.dtype != acc:
        raise RuntimeError(f"multilabel_softmax_train: pos_weight must be {acc} [B, L] = "
                           f"{[x.shape[0], num_positives]}, got {pos_weight.dtype} {tuple(pos_weight.shape)}")
    loss, lse = multilabel_softmax_forward(x, weight, bias, ids, log_q, num_positives, remove_accidental_hits,
                                           sparse_grad)
    grad_x, coef = _coef_and_grad_x(x, weight, bias, ids, log_q, num_positives, remove_accidental_hits,
                                    pos_weight, lse)
    return (loss * pos_weight).sum(1), coef, grad_x
