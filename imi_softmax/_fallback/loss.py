"""Fused sampled softmax and its weight gradients in pure PyTorch (csrc/include/imi_softmax/sampled_loss.h).

Column 0 of ids/log_q [B, 1+M] is the target; u_j = x.w_id + b_id - log_q_j, accidental hits
(j > 0 and ids[b, j] == ids[b, 0]) are -inf when removed, loss = logsumexp(u) - u_0. Rows whose
target is ignore_index give loss 0, lse 0 and zero coefficients. Accumulation in float32 (float64
for float64 inputs), as the kernels do.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

_ROWS_PER_CHUNK_ELEMS = 1 << 24  # bound on the gathered [rows, 1+M, d] block


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_loss_inputs(op: str, x: Tensor, weight: Tensor, bias: Optional[Tensor], ids: Tensor, log_q: Tensor,
                       ignore_index: int) -> None:
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise RuntimeError(f"{op}: x must be [B, d] and weight [N, d], got {tuple(x.shape)} and {tuple(weight.shape)}")
    if ids.dim() != 2 or ids.shape[0] != x.shape[0] or ids.dtype != torch.int64 or ids.shape[1] < 1:
        raise RuntimeError(f"{op}: ids must be int64 [B, 1+M] with B = {x.shape[0]}, got {tuple(ids.shape)}")
    if log_q.shape != ids.shape or log_q.dtype != acc_dtype(x.dtype):
        raise RuntimeError(f"{op}: log_q must be {acc_dtype(x.dtype)} {tuple(ids.shape)}")
    if weight.dtype != x.dtype or (bias is not None and (bias.dtype != x.dtype or bias.shape != (weight.shape[0],))):
        raise RuntimeError(f"{op}: weight and bias must have x's dtype and bias be [N]")
    n = weight.shape[0]
    ok = (ids >= 0) & (ids < n)
    ok[:, 0] |= ids[:, 0] == ignore_index
    if not bool(ok.all()):
        raise RuntimeError(f"{op}: ids holds {int(ids[~ok][0])}, outside [0, {n}) (targets may be ignore_index)")


def _corrected_logits(x, weight, bias, ids, log_q, remove_accidental_hits, ignore_index):
    """(u [B, 1+M] in the accumulation dtype with masked columns at -inf, ignored-row mask [B], safe ids)."""
    acc = acc_dtype(x.dtype)
    ignored = ids[:, 0] == ignore_index
    safe = torch.where(ids < 0, torch.zeros_like(ids), ids)
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
    _check_loss_inputs("sampled_softmax_forward", x, weight, bias, ids, log_q, ignore_index)
    u, ignored, _ = _corrected_logits(x, weight, bias, ids, log_q, remove_accidental_hits, ignore_index)
    lse = torch.logsumexp(u, dim=1)
    loss = lse - u[:, 0]
    zero = torch.zeros_like(lse)
    return torch.where(ignored, zero, loss), torch.where(ignored, zero, lse)


def sampled_softmax_train(x, weight, bias, ids, log_q, remove_accidental_hits: bool, ignore_index: int,
                          sparse_grad: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss [B], lse [B], coef [B, 1+M], grad_x [B, d]), all in the accumulation dtype: the forward and
    its gradients for grad_loss = 1 (coef = d loss_b / d u_bj, grad_x = sum_j coef_bj w_{ids_bj})."""
    _check_loss_inputs("sampled_softmax_train", x, weight, bias, ids, log_q, ignore_index)
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
    _check_loss_inputs("sampled_softmax_backward", x, weight, bias, ids, log_q, ignore_index)
    if grad_loss.numel() != x.shape[0] or lse.numel() != x.shape[0]:
        raise RuntimeError("sampled_softmax_backward: grad_loss and lse must be [B]")
    acc = acc_dtype(x.dtype)
    u, ignored, safe = _corrected_logits(x, weight, bias, ids, log_q, remove_accidental_hits, ignore_index)
    p = torch.exp(u - lse.reshape(-1, 1).to(acc))  # exp(-inf) = 0 for masked columns
    p[:, 0] -= 1
    coef = p * grad_loss.reshape(-1, 1).to(acc)
    coef = torch.where(ignored[:, None], torch.zeros_like(coef), coef)
    grad_x = torch.einsum("bm,bmd->bd", coef, weight[safe].to(acc))
    return grad_x.to(x.dtype), coef


def _weight_grad_inputs(op: str, coef: Tensor, ids: Tensor, x: Tensor, num_classes: int) -> Tensor:
    if ids.dim() != 2 or coef.shape != ids.shape or ids.dtype != torch.int64:
        raise RuntimeError(f"{op}: coef and ids must be [B, 1+M], ids int64")
    if x.dim() != 2 or x.shape[0] != ids.shape[0]:
        raise RuntimeError(f"{op}: x must be [B, d]")
    if coef.dtype != acc_dtype(x.dtype):
        raise RuntimeError(f"{op}: coef dtype must be the accumulation dtype of x")
    if num_classes < 0:
        raise RuntimeError(f"{op}: num_classes must be >= 0, got {num_classes}")
    if ids.numel() and int(ids.max()) >= num_classes:
        raise RuntimeError(f"{op}: class id {int(ids.max())} >= num_classes {num_classes}")
    return ids >= 0  # negative ids (ignored targets) carry no gradient


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
