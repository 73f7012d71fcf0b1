"""Exact cross-entropy and top-k over class chunks: no [B, N] logit matrix at any time.

The loss is an online logsumexp (running max and sum of exponentials) over chunks of classes plus
the target's logit, taken from the chunk that holds it; the backward recomputes each chunk's
logits from the saved per-row logsumexp. Memory is O(B * chunk) besides the gradients themselves.
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._differentiable_once import differentiable_once, keep_anchors
from .samplers.base import no_autocast

# A [B, chunk] float32 logit block of about 32 MiB when the chunk size is chosen automatically.
AUTO_CHUNK_BYTES = 32 << 20
MIN_AUTO_CHUNK = 1024


def auto_chunk_size(rows: int, num_classes: int) -> int:
    """Classes per chunk so that a [rows, chunk] float32 block is about AUTO_CHUNK_BYTES."""
    chunk = AUTO_CHUNK_BYTES // (4 * max(rows, 1))
    return int(min(max(chunk, MIN_AUTO_CHUNK), num_classes))


def logit_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype F.linear(x, weight) computes in: autocast's when it is on, else the weight's."""
    dev = x.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev) and weight.dtype in (
            torch.float32, torch.float16, torch.bfloat16):
        return torch.get_autocast_dtype(dev)
    return weight.dtype


def _acc_dtype(weight: Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _chunk_logits(x: Tensor, weight: Tensor, bias: Optional[Tensor], start: int, stop: int,
                  lin: torch.dtype, acc: torch.dtype) -> Tensor:
    """[B, stop - start] logits in the accumulation dtype, rounded as F.linear in ``lin`` rounds them."""
    w = weight[start:stop].to(lin)
    b = None if bias is None else bias[start:stop].to(lin)
    with no_autocast(x.device):
        return F.linear(x.to(lin), w, b).to(acc)


def _grad_buffers(x: Tensor, weight: Tensor, bias: Optional[Tensor], acc: torch.dtype, need_x: bool,
                  need_w: bool, need_b: bool):
    """(x in ``acc``, grad_x zeros or None, grad_w, grad_b buffers or None) for a chunked backward:
    grad_x accumulates over chunks, grad_w / grad_b are written chunk by chunk."""
    xa = x.to(acc)
    grad_x = torch.zeros_like(xa) if need_x else None
    grad_w = torch.empty_like(weight) if need_w else None
    grad_b = torch.empty_like(bias) if need_b and bias is not None else None
    return xa, grad_x, grad_w, grad_b


def _add_chunk_grads(coef: Tensor, xa: Tensor, weight: Tensor, bias: Optional[Tensor], start: int, stop: int,
                     grad_x: Optional[Tensor], grad_w: Optional[Tensor], grad_b: Optional[Tensor]) -> None:
    """Adds chunk [start, stop)'s share to grad_x and writes its rows of grad_w / grad_b (those not None),
    given coef = d loss / d logits of the chunk [B, stop - start] in the accumulation dtype."""
    if grad_x is not None:
        grad_x.addmm_(coef, weight[start:stop].to(xa.dtype))
    if grad_w is not None:
        grad_w[start:stop] = (coef.T @ xa).to(weight.dtype)
    if grad_b is not None:
        grad_b[start:stop] = coef.sum(0).to(bias.dtype)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """mean over rows with target != ignore_index of logsumexp_j(o_bj) - o_b,target."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                ignore_index: int, chunk: int, lin: torch.dtype) -> Tensor:
        n = weight.shape[0]
        acc = _acc_dtype(weight)
        rows = x.shape[0]
        run_max = torch.full((rows,), -math.inf, dtype=acc, device=x.device)
        run_sum = torch.zeros(rows, dtype=acc, device=x.device)
        tgt = torch.zeros(rows, dtype=acc, device=x.device)
        valid = target != ignore_index
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            logits = _chunk_logits(x, weight, bias, start, stop, lin, acc)
            inside = (target >= start) & (target < stop)
            local = (target - start).clamp(0, stop - start - 1).unsqueeze(1)
            tgt = torch.where(inside, logits.gather(1, local).squeeze(1), tgt)
            new_max = torch.maximum(run_max, logits.amax(1))
            # a row whose max is still -inf has sum 0: exp(-inf - -inf) would be NaN
            shift = torch.where(new_max.isneginf(), torch.zeros_like(new_max), new_max)
            # in place: one [B, chunk] buffer per chunk
            run_sum = run_sum * torch.exp(run_max - shift) + logits.sub_(shift.unsqueeze(1)).exp_().sum(1)
            run_max = new_max
        lse = run_max + torch.log(run_sum)
        count = valid.sum()
        loss = torch.where(valid, lse - tgt, torch.zeros_like(lse)).sum() / count.to(acc)
        ctx.save_for_backward(x, weight, bias, target, lse, count)
        keep_anchors(ctx, x, weight, bias)
        ctx.ignore_index, ctx.chunk, ctx.lin = ignore_index, chunk, lin
        return loss.to(torch.float32) if acc == torch.float32 else loss

    @staticmethod
    @differentiable_once("chunked_cross_entropy")
    def backward(ctx, grad_loss: Tensor):
        x, weight, bias, target, lse, count = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        acc = _acc_dtype(weight)
        n = weight.shape[0]
        valid = target != ctx.ignore_index
        # d loss / d o_bj = (softmax_bj - [j = t_b]) * g / count on valid rows, 0 on ignored ones
        scale = torch.where(valid, grad_loss.to(acc) / count.to(acc), torch.zeros_like(lse))
        xa, grad_x, grad_w, grad_b = _grad_buffers(x, weight, bias, acc, need_x, need_w, need_b)
        with no_autocast(x.device):
            for start in range(0, n, ctx.chunk):
                stop = min(start + ctx.chunk, n)
                logits = _chunk_logits(x, weight, bias, start, stop, ctx.lin, acc)
                coef = logits.sub_(lse.unsqueeze(1)).exp_()
                inside = (target >= start) & (target < stop)
                local = (target - start).clamp(0, stop - start - 1).unsqueeze(1)
                coef.scatter_add_(1, local, -inside.to(acc).unsqueeze(1))
                coef.mul_(scale.unsqueeze(1))
                _add_chunk_grads(coef, xa, weight, bias, start, stop, grad_x, grad_w, grad_b)
        if grad_x is not None:
            grad_x = grad_x.to(x.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None


def chunked_cross_entropy(x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, *,
                          ignore_index: int = -100, chunk_size: Optional[int] = None) -> Tensor:
    """``F.cross_entropy(F.linear(x, weight, bias), target, ignore_index=ignore_index)`` (mean)
    computed over chunks of ``chunk_size`` classes. x [B, d], weight [N, d], bias [N] or None,
    target [B] int64 (checked by the caller). Differentiable in x, weight and bias; NaN when every
    target is ignored (as F.cross_entropy). Under autocast the logits are rounded as autocast's
    F.linear rounds them and the logsumexp runs in float32 (as autocast's cross_entropy)."""
    n = weight.shape[0]
    chunk = auto_chunk_size(x.shape[0], n) if chunk_size is None else int(chunk_size)
    lin = logit_dtype(x, weight)
    if chunk >= n:  # one chunk: the plain formula is the reference itself, in O(B * chunk)
        return F.cross_entropy(F.linear(x, weight, bias), target, ignore_index=ignore_index)
    return _ChunkedCrossEntropy.apply(x, weight, bias, target, ignore_index, chunk, lin)


@torch.no_grad()
def chunked_topk(x: Tensor, weight: Tensor, bias: Optional[Tensor], k: int, chunk: int) -> Tuple[Tensor, Tensor]:
    """(values, indices) [B, k] of the k largest logits of x [B, d], over chunks of classes: each
    chunk's top min(k, chunk) merged into a running [B, <= k] best (O(B * (chunk + k)) memory)."""
    n = weight.shape[0]
    best_v = best_i = None
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        b = None if bias is None else bias[start:stop]
        v, i = F.linear(x, weight[start:stop], b).topk(min(k, stop - start), dim=-1)
        i = i + start
        if best_v is not None:
            v, i = torch.cat([best_v, v], 1), torch.cat([best_i, i], 1)
            if v.shape[1] >= k:  # also sorts a merge of exactly k columns
                v, j = v.topk(k, dim=-1)
                i = i.gather(1, j)
        best_v, best_i = v, i
    return best_v, best_i


class _ChunkedNegativeLogSumExp(torch.autograd.Function):
    """S_b = logsumexp over the classes that are not a positive of row b (-inf when every class is),
    over chunks of classes; positives [B, L] int64 with -1 pads."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], positives: Tensor, chunk: int,
                lin: torch.dtype) -> Tensor:
        n = weight.shape[0]
        acc = _acc_dtype(weight)
        rows = x.shape[0]
        run_max = torch.full((rows,), -math.inf, dtype=acc, device=x.device)
        run_sum = torch.zeros(rows, dtype=acc, device=x.device)
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            logits = _mask_positives(_chunk_logits(x, weight, bias, start, stop, lin, acc), positives, start, stop)
            new_max = torch.maximum(run_max, logits.amax(1))
            shift = torch.where(new_max.isneginf(), torch.zeros_like(new_max), new_max)
            run_sum = run_sum * torch.exp(run_max - shift) + logits.sub_(shift.unsqueeze(1)).exp_().sum(1)
            run_max = new_max
        lse = run_max + torch.log(run_sum)  # -inf + log 0 = -inf for a row with no negative class
        ctx.save_for_backward(x, weight, bias, positives, lse)
        keep_anchors(ctx, x, weight, bias)
        ctx.chunk, ctx.lin = chunk, lin
        return lse

    @staticmethod
    @differentiable_once("chunked_multilabel_loss")
    def backward(ctx, grad_lse: Tensor):
        x, weight, bias, positives, lse = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        acc = _acc_dtype(weight)
        n = weight.shape[0]
        # d S_b / d o_bj = exp(o_bj - S_b) for the negatives j; rows with S = -inf have none
        live = ~lse.isneginf()
        g = torch.where(live, grad_lse.to(acc), torch.zeros_like(lse))
        shift = torch.where(live, lse, torch.zeros_like(lse))
        xa, grad_x, grad_w, grad_b = _grad_buffers(x, weight, bias, acc, need_x, need_w, need_b)
        with no_autocast(x.device):
            for start in range(0, n, ctx.chunk):
                stop = min(start + ctx.chunk, n)
                logits = _mask_positives(_chunk_logits(x, weight, bias, start, stop, ctx.lin, acc), positives,
                                         start, stop)
                coef = logits.sub_(shift.unsqueeze(1)).exp_().mul_(g.unsqueeze(1))
                _add_chunk_grads(coef, xa, weight, bias, start, stop, grad_x, grad_w, grad_b)
        if grad_x is not None:
            grad_x = grad_x.to(x.dtype)
        return grad_x, grad_w, grad_b, None, None, None


def _mask_positives(logits: Tensor, positives: Tensor, start: int, stop: int) -> Tensor:
    """-inf (in place) at the columns of [B, stop - start] logits that are a positive of their row."""
    inside = (positives >= start) & (positives < stop)
    local = torch.where(inside, positives - start, torch.zeros_like(positives))
    hit = torch.zeros(logits.shape, dtype=torch.int32, device=logits.device).scatter_add_(
        1, local, inside.to(torch.int32)).bool()  # a sum: pads (inside False) add 0 at column 0
    return logits.masked_fill_(hit, -math.inf)


def chunked_multilabel_loss(x: Tensor, weight: Tensor, bias: Optional[Tensor], positives: Tensor, *,
                            reduction: str = "mean", chunk_size: Optional[int] = None) -> Tensor:
    """Exact multi-label softmax loss over chunks of ``chunk_size`` classes (no [B, N] tensor):
    per positive p of row b, ``loss_bp = log(exp(o_bp) + sum_{j not a positive of b} exp(o_bj)) - o_bp``,
    the full-softmax counterpart of the sampled multi-label loss (imi_softmax/multilabel.py).
    x [B, d], weight [N, d], bias [N] or None, positives [B, L] int64 with -1 pads (checked by the
    caller). Reductions as the sampled loss: "mean" (over each row's positives, then over rows with
    at least one; NaN when none has), "sum", "none" ([B, L], 0 at pads). Differentiable in x, weight
    and bias."""
    n = weight.shape[0]
    chunk = auto_chunk_size(x.shape[0], n) if chunk_size is None else int(chunk_size)
    lin = logit_dtype(x, weight)
    acc = _acc_dtype(weight)
    s = _ChunkedNegativeLogSumExp.apply(x, weight, bias, positives, chunk, lin)
    pad = positives < 0
    safe = positives.clamp_min(0)
    with no_autocast(x.device):
        w = weight[safe].to(lin)
        o = torch.einsum("bd,bld->bl", x.to(lin), w).to(acc)  # the positives' logits, differentiable
        if bias is not None:
            o = o + bias[safe].to(lin).to(acc)
    loss = torch.logaddexp(o, s.unsqueeze(1).expand_as(o)) - o
    loss = torch.where(pad, torch.zeros_like(loss), loss)
    out_dtype = torch.float32 if acc == torch.float32 else acc
    if reduction == "none":
        return loss.to(out_dtype)
    if reduction == "sum":
        return loss.sum().to(out_dtype)
    count = (~pad).sum(1)
    per_row = loss.sum(1) / count.clamp_min(1).to(acc)
    return (per_row.sum() / (count > 0).sum().to(acc)).to(out_dtype)
