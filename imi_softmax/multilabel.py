"""Multi-label targets for the sampled softmax: target normalization (padded or CSR) and the fused
multi-label loss behind ``IMISoftmax(x, target_padded)`` / ``head(x, (offsets, labels))``.

Per row b with positives P_b (pads dropped; a label listed twice counts twice) and negatives s_1..s_M
drawn from Q(.|x_b): ``u_c = x_b.w_c + b_c - log Q(c|x_b)``; every negative equal to ANY positive of
the row is removed (when ``remove_accidental_hits``); ``S_b = logsumexp_j u_j`` over the remaining
negatives and, per positive p, ``loss_bp = logaddexp(u_p, S_b) - u_p``: the sampled softmax over {p}
and the row's negatives. Reductions: "mean" = mean over rows with at least one positive of the mean
over that row's positives (NaN when no row has one, as F.cross_entropy); "sum" = sum over every
(row, positive); "none" = the per-positive losses in the padded layout [*, L] (0 at pads).
"""
from typing import Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from ._ops import acc_dtype, ops
from ._targets import csr_to_padded
from ._validation import (FLOAT_DTYPES, check_class_ids, check_finite, check_flag, check_ignore_index, check_linear_inputs,
                          check_log_q, check_same_device, check_samples, check_tensor)

MultiLabelTarget = Union[Tensor, Tuple[Tensor, Tensor]]
REDUCTIONS = ("mean", "sum", "none")


def is_multilabel_target(x: Tensor, target) -> bool:
    """A CSR pair, or an int tensor with one more dimension than x's batch dims ([*, L] for x [*, d])."""
    if isinstance(target, (tuple, list)):
        return True
    # a non-tensor x is the single-label checks' to reject, with their message
    return isinstance(target, Tensor) and isinstance(x, Tensor) and target.dim() == x.dim()


def padded_positives(target: MultiLabelTarget, batch_shape: torch.Size, num_classes: int,
                     ignore_index: int) -> Tensor:
    """The positives as [B, L] int64 with -1 pads (B = prod(batch_shape), L >= 1), after checking the
    target: a padded ``[*batch_shape, L]`` int64 tensor (pad = ``ignore_index``) or a CSR pair
    ``(offsets [B+1], labels [nnz])`` int64. Labels outside [0, num_classes) raise IndexError."""
    rows = 1
    for s in batch_shape:
        rows *= s
    if isinstance(target, (tuple, list)):
        if not all(isinstance(t, (Tensor, np.ndarray)) for t in target):
            kinds = sorted({type(t).__name__ for t in target})
            raise TypeError(f"target must be an int64 tensor ([*] class ids, or [*, L] padded labels) or a CSR pair "
                            f"(offsets, labels) of int64 tensors; got a {type(target).__name__} of "
                            f"{', '.join(kinds) or 'nothing'}: convert it, e.g. torch.tensor(target)")
        if len(target) != 2:
            raise ValueError(f"a CSR target is a pair (offsets [B+1], labels [nnz]), got {len(target)} items")
        offsets, labels = target
        check_tensor("target offsets", offsets)
        check_tensor("target labels", labels)
        for name, t in (("target offsets", offsets), ("target labels", labels)):
            if t.dtype != torch.int64:
                raise TypeError(f"{name} must be int64 (torch.long), got {t.dtype}")
        padded, labels = csr_to_padded(offsets, labels, rows)
        check_class_ids("target labels", labels, num_classes)
    else:
        check_tensor("target", target)
        if target.dtype != torch.int64:
            raise TypeError(f"target must be int64 (torch.long), got {target.dtype}")
        if target.dim() != len(batch_shape) + 1 or target.shape[:-1] != batch_shape:
            raise ValueError(f"a multi-label target must be [{', '.join(map(str, batch_shape))}, L] (x's batch "
                             f"dims, then L labels padded with ignore_index={ignore_index}), got {tuple(target.shape)}")
        check_class_ids("target", target, num_classes, ignore_index=ignore_index)
        flat = target.reshape(rows, target.shape[-1])
        # pads become -1 for the kernels, so any ignore_index works (even a valid id)
        padded = torch.where(flat == ignore_index, torch.full_like(flat, -1), flat)
    if padded.shape[1] == 0:  # no labels at all: one pad column keeps the kernels' shapes valid
        padded = torch.full((rows, 1), -1, dtype=torch.int64, device=padded.device)
    return padded


def scatter_target_log_q(target: MultiLabelTarget, target_log_q: Tensor, padded: Tensor) -> Tensor:
    """target_log_q in the padded layout [B, L]: given as padded [*, L], or as [nnz] for a CSR target."""
    check_tensor("target_log_q", target_log_q, dtypes=FLOAT_DTYPES)
    if isinstance(target, (tuple, list)):
        labels = target[1]
        if target_log_q.shape != labels.shape:
            raise ValueError(f"target_log_q must be [nnz] = {tuple(labels.shape)} for a CSR target, "
                             f"got {tuple(target_log_q.shape)}")
        out = torch.zeros(padded.shape, dtype=target_log_q.dtype, device=padded.device)
        lengths = target[0][1:] - target[0][:-1]
        row = torch.repeat_interleave(torch.arange(padded.shape[0], device=padded.device), lengths)
        col = torch.arange(labels.numel(), device=padded.device) - target[0][:-1][row]
        out[row, col] = target_log_q
        return out
    if target_log_q.shape != target.shape:
        raise ValueError(f"target_log_q must match the target's shape {tuple(target.shape)}, "
                         f"got {tuple(target_log_q.shape)}")
    if target.shape[-1] == 0:  # no label column at all: padded_positives added one pad column
        return torch.zeros(padded.shape, dtype=target_log_q.dtype, device=padded.device)
    return target_log_q.reshape(padded.shape)


def multilabel_sampled_softmax_loss(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    target: MultiLabelTarget,
    sample_ids: Tensor,
    sample_log_q: Tensor,
    target_log_q: Tensor,
    *,
    remove_accidental_hits: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
    sparse_grad: bool = False,
) -> Tensor:
    """Bias-corrected multi-label sampled softmax (module docstring for the formula and reductions).

    Shapes: x [*, d], weight [N, d], bias [N] or None; target padded [*, L] int64 (pad =
    ignore_index) or CSR (offsets [B+1], labels [nnz]) int64 with B = prod(*); sample_ids [*, M]
    int64, sample_log_q [*, M]; target_log_q: log Q of the positives, [*, L] (padded) or [nnz] (CSR).
    Returns a scalar ("mean", "sum") or [B, L] per-positive losses ("none", 0 at pads).
    """
    n = check_linear_inputs(x, weight, bias)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    check_ignore_index(ignore_index)
    remove_accidental_hits = check_flag("remove_accidental_hits", remove_accidental_hits)
    sparse_grad = check_flag("sparse_grad", sparse_grad)
    batch_shape = x.shape[:-1]
    check_samples(sample_ids, sample_log_q, batch_shape)
    positives = padded_positives(target, batch_shape, n, ignore_index)
    tlq = scatter_target_log_q(target, target_log_q, positives)
    check_same_device(x=x, weight=weight, bias=bias, positives=positives, sample_ids=sample_ids,
                      sample_log_q=sample_log_q, target_log_q=tlq)
    check_class_ids("sample_ids", sample_ids, n)
    check_finite("x", x)
    check_log_q("sample_log_q", sample_log_q)
    check_log_q("target_log_q", torch.where(positives < 0, 0.0, tlq))  # pads: unused
    rows = positives.shape[0]
    return multilabel_loss(x.reshape(rows, x.shape[-1]), weight, bias, positives,
                           sample_ids.reshape(rows, sample_ids.shape[-1]),
                           sample_log_q.reshape(rows, sample_ids.shape[-1]), tlq,
                           remove_accidental_hits=remove_accidental_hits, reduction=reduction, sparse_grad=sparse_grad)


def multilabel_loss(x: Tensor, weight: Tensor, bias: Optional[Tensor], positives: Tensor, sample_ids: Tensor,
                    sample_log_q: Tensor, target_log_q: Tensor, *, remove_accidental_hits: bool, reduction: str,
                    sparse_grad: bool) -> Tensor:
    """The fused op and the reduction, after the checks: x [B, d], positives [B, L] (-1 pads),
    sample_ids / sample_log_q [B, M], target_log_q [B, L]. The kernels still check every id they
    read with."""
    acc = acc_dtype(x.dtype)
    pad = positives < 0
    tlq = torch.where(pad, torch.zeros((), dtype=acc, device=x.device), target_log_q.to(acc))
    ids = torch.cat([positives, sample_ids], dim=1)
    log_q = torch.cat([tlq, sample_log_q.to(acc)], dim=1)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    if needs_grad and reduction != "none":
        # The training forward: the reduction's weight of each positive is known here, so the op returns
        # the gradients of sum_p w_p loss_p with the loss and the backward never reads W again.
        count = (~pad).sum(1, keepdim=True)
        scale = 1.0 / count.clamp_min(1).to(acc) if reduction == "mean" else torch.ones((), dtype=acc,
                                                                                          device=x.device)
        pos_weight = torch.where(pad, torch.zeros((), dtype=acc, device=x.device), scale.expand_as(tlq))
        row_loss, _, _ = ops.multilabel_softmax_train(x, weight, bias, ids, log_q, pos_weight, positives.shape[1],
                                                      bool(remove_accidental_hits), bool(sparse_grad))
        total = row_loss.sum()
        if reduction == "mean":
            total = total / (count > 0).sum().to(acc)
        return total.to(x.dtype)
    loss, _ = ops.multilabel_softmax_forward(x, weight, bias, ids, log_q, positives.shape[1],
                                             bool(remove_accidental_hits), bool(sparse_grad))
    if reduction == "none":
        return loss.to(x.dtype)
    if reduction == "sum":
        return loss.sum().to(x.dtype)
    count = (~pad).sum(1)
    has = count > 0
    per_row = loss.sum(1) / count.clamp_min(1).to(acc)
    return (per_row.sum() / has.sum().to(acc)).to(x.dtype)
