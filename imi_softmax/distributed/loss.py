r"""The class-sharded sampled softmax: stratified importance sampling over shards.

Rank p owns the classes S_p = [lo_p, hi_p) and draws M_p negatives per query from its own
proposal Q_p (a distribution over S_p only; log Q_p exact, as for the single head). Every class
belongs to exactly one stratum, so the partition function splits as Z = sum_p Z_p with
Z_p = sum_{i in S_p} exp(o_i), and

    Z_hat = sum_p (1 / M_p) sum_{j=1..M_p} exp(o_{s_pj}) / Q_p(s_pj) = sum_p sum_j exp(u_pj),
    u_pj = o_{s_pj} - log(M_p * Q_p(s_pj))

is unbiased for Z (each inner average is unbiased for its Z_p; the strata are drawn
independently). M_p * Q_p(i) is the expected number of times class i appears among all the
step's draws, so u is the logit minus the log expected count, the same correction the single head
applies (there M is the same for every column and cancels). The target y, owned by shard p(y),
gets the same correction: u_0 = o_y - log(M_{p(y)} * Q_{p(y)}(y)); with one shard this is
exactly IMISoftmax's loss. The row loss is

    loss = logsumexp(u_0, all u_pj) - u_0,

where the logsumexp is combined across ranks from the ranks' partial ones (all-reduce of the max,
then of the sum of exponentials) and u_0 comes from the owner. With remove_accidental_hits the
owner's draws equal to y are dropped (-inf), as in the single head: the limit for large M is then
the softmax over the classes other than y (the single head's known behaviour; tests of
convergence to the full-softmax gradient keep the hits). With an exact per-shard proposal
(Q_p = softmax over S_p), every u_pj equals log(Z_p / M_p) and Z_hat = Z exactly.

Gradients: d loss / d u_c = softmax_c(u) - [c = 0], a per-entry coefficient each rank computes for
its own columns from the combined logsumexp; grad x sums coef * w over every rank's columns (a
reduce-scatter of the gathered rows' partial grads back to each query's rank); grad w and grad b of
a class are computed on the rank that owns it and stay there (the fused weight-gradient kernels,
dense or sparse).

The per-row partial statistics are a Python composition over the gathered [R, 1 + M_p, d] weight
rows (index_select, bmm): the fused loss op assumes every row's target is local.
"""
import math
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .._differentiable_once import differentiable_once, keep_anchors
from .._ops import acc_dtype, ops
from .collectives import Collectives


class GatheredBatch(NamedTuple):
    """Every rank's rows, padded to the longest local batch (R = P * rows_per_rank)."""

    x: Tensor              # [R, d] queries (detached), zeros in padding rows
    target: Tensor         # [R] int64 global class ids; ignore_index or padding -> -1
    valid: Tensor          # [R] bool: a real row whose target is not ignored
    rows_per_rank: int
    local_rows: int        # this rank's B_r


class StepDraws(NamedTuple):
    """One shard's negatives for a gathered batch (local class ids, i.e. id - class_start)."""

    ids: Tensor            # [R, M_p] int64 in [0, num_local_classes)
    log_q: Tensor          # [R, M_p] float32, exact log Q_p(ids | query)
    target_log_q: Tensor   # [R] float32, log Q_p(target) on rows whose target this shard owns (else any value)


def gather_batch(comm: Collectives, x: Tensor, target: Optional[Tensor], ignore_index: int) -> GatheredBatch:
    """All-gathers queries [B_r, d] and targets [B_r] (None: queries only, every row valid); local
    batch sizes may differ by rank."""
    b = x.shape[0]
    sizes = comm.all_gather(torch.tensor([b], dtype=torch.int64, device=x.device), "batch_sizes")
    refused = (sizes < 0).nonzero().flatten().tolist()
    if refused:
        raise RuntimeError(f"rank(s) {refused} of the process group rejected their input (their own error says "
                           f"why); this rank stops too, so that no rank waits in a collective")
    longest = int(sizes.max()) if sizes.numel() else 0
    pad = longest - b
    xp = torch.cat([x.detach(), x.new_zeros((pad, x.shape[1]))]) if pad else x.detach()
    gx = comm.all_gather(xp, "queries")
    rows = torch.arange(longest, device=x.device).repeat(comm.world) < sizes.repeat_interleave(longest)
    if target is None:
        return GatheredBatch(gx, torch.where(rows, 0, -1), rows, longest, b)
    t = torch.where(target == ignore_index, torch.full_like(target, -1), target)
    tp = torch.cat([t, t.new_full((pad,), -1)]) if pad else t
    gt = comm.all_gather(tp, "targets")
    return GatheredBatch(gx, gt, gt >= 0, longest, b)


def combine_logsumexp(comm: Collectives, local_lse: Tensor, owner_term: Tensor) -> Tuple[Tensor, Tensor]:
    """Global logsumexp from each rank's partial logsumexp [R] (-inf where a rank has no term),
    and the sum over ranks of ``owner_term`` [R] (non-zero on one rank per row: the target's
    logit or corrected logit). Two all-reduces: the max, then the sum of exponentials together
    with owner_term."""
    m = comm.all_reduce(local_lse.clone(), "lse_max", torch.distributed.ReduceOp.MAX)
    if bool(torch.isposinf(m).any()):  # finite logits never give +inf: a rank failed (signal_failure)
        raise RuntimeError("another rank of the process group failed after the queries were gathered (its own "
                           "error says why, e.g. while drawing its negatives); this rank stops too, so that no "
                           "rank waits in a collective")
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # rows with no term at all
    packed = torch.stack([torch.exp(local_lse - m), owner_term])
    comm.all_reduce(packed, "lse_sum")
    return m + torch.log(packed[0]), packed[1]


def signal_failure(comm: Collectives, batch: GatheredBatch, dtype: torch.dtype) -> None:
    """A rank that fails between gathering the batch and combining the logsumexp joins the max
    all-reduce with +inf rows: every other rank raises there (combine_logsumexp) instead of waiting."""
    comm.all_reduce(torch.full((batch.x.shape[0],), math.inf, dtype=dtype, device=batch.x.device), "lse_max",
                    torch.distributed.ReduceOp.MAX)


def _gathered_rows(weight: Tensor, bias: Optional[Tensor], ids: Tensor, acc) -> Tuple[Tensor, Optional[Tensor]]:
    safe = ids.clamp_min(0).flatten()  # -1 (no target here) reads row 0; its column is masked
    # index_select: several times faster than advanced indexing with a 2-D index on CPU
    w = weight.detach().index_select(0, safe).view(ids.shape + (weight.shape[1],)).to(acc)
    b = None if bias is None else bias.detach().index_select(0, safe).view(ids.shape).to(acc)
    return w, b


class ShardedSampledSoftmax(torch.autograd.Function):
    """Row losses [B_r] of this rank's rows (see the module docstring); every rank of the group must
    call it, and later call backward, together."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], comm: Collectives, batch: GatheredBatch,
                draws: StepDraws, class_start: int, samples: int, remove_accidental_hits: bool,
                weight_grad_scale: float, sparse_grad: bool) -> Tensor:
        acc = acc_dtype(weight.dtype)
        n = weight.shape[0]
        t_local = batch.target - class_start
        own = batch.valid & (t_local >= 0) & (t_local < n)
        ids = torch.cat([torch.where(own, t_local, torch.full_like(t_local, -1)).unsqueeze(1), draws.ids], 1)
        log_count = math.log(samples) if samples > 0 else 0.0
        corr = torch.cat([draws.target_log_q.unsqueeze(1), draws.log_q], 1).to(acc) + log_count
        w, b = _gathered_rows(weight, bias, ids, acc)
        x_all = batch.x.to(acc)
        u = torch.bmm(w, x_all.unsqueeze(2)).squeeze(2)
        if b is not None:
            u = u + b
        u = u - corr
        masked = torch.zeros_like(ids, dtype=torch.bool)
        masked[:, 0] = ~own
        if remove_accidental_hits:
            masked[:, 1:] = draws.ids == ids[:, :1]  # only owner rows can match (ids[:, 0] = -1 elsewhere)
        u = u.masked_fill(masked, -math.inf)
        local_lse = torch.logsumexp(u, 1) if u.shape[1] else u.new_full((u.shape[0],), -math.inf)
        u0 = torch.where(own, u[:, 0], torch.zeros_like(u[:, 0]))
        lse, u0_all = combine_logsumexp(comm, local_lse, u0)
        rows = torch.where(batch.valid, lse - u0_all, torch.zeros_like(lse))
        ctx.comm, ctx.batch, ctx.n = comm, batch, n
        ctx.weight_grad_scale, ctx.sparse_grad = weight_grad_scale, sparse_grad
        ctx.has_bias = bias is not None
        ctx.weight_shape, ctx.weight_dtype, ctx.x_dtype = weight.shape, weight.dtype, x.dtype
        ctx.save_for_backward(w, ids, u, lse, own)
        keep_anchors(ctx, x, weight, bias)
        start = comm.rank * batch.rows_per_rank
        return rows[start:start + batch.local_rows].to(x.dtype)

    @staticmethod
    @differentiable_once("ShardedIMISoftmax's loss")
    def backward(ctx, grad_rows: Tensor):
        w, ids, u, lse, own = ctx.saved_tensors
        comm, batch = ctx.comm, ctx.batch
        acc = u.dtype
        g = grad_rows.to(acc)
        pad = batch.rows_per_rank - batch.local_rows
        if pad:
            g = torch.cat([g, g.new_zeros(pad)])
        g_all = comm.all_gather(g.contiguous(), "grad_rows")
        # ignored and padding rows get nothing, whatever the upstream gradient says there (a mean over
        # zero rows sends inf to them)
        g_all = torch.where(batch.valid, g_all, torch.zeros_like(g_all))
        coef = torch.exp(u - lse.unsqueeze(1)) * g_all.unsqueeze(1)
        coef[:, 0] -= torch.where(own, g_all, torch.zeros_like(g_all))
        # every rank runs the reduce-scatter, whether or not its x needs a gradient: a collective
        # skipped on one rank would hang the others
        partial = torch.bmm(coef.unsqueeze(1), w).squeeze(1)
        grad_x = comm.reduce_scatter_rows(partial, "grad_queries")[:batch.local_rows].to(ctx.x_dtype)
        grad_w = grad_b = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            wcoef = coef * ctx.weight_grad_scale
            x_all = batch.x.to(ctx.weight_dtype)
            wcoef = wcoef.to(acc_dtype(ctx.weight_dtype))
            if ctx.sparse_grad:
                uniq, rows, bias_rows = ops.sparse_weight_grad(wcoef, ids, x_all, ctx.n)
                index = uniq.unsqueeze(0)
                grad_w = torch.sparse_coo_tensor(index, rows, ctx.weight_shape, is_coalesced=True,
                                                 check_invariants=False)
                if ctx.has_bias:
                    grad_b = torch.sparse_coo_tensor(index, bias_rows, (ctx.n,), is_coalesced=True,
                                                     check_invariants=False)
            else:
                grad_w, grad_b = ops.dense_weight_grad(wcoef, ids, x_all, ctx.n)
                if not ctx.has_bias:
                    grad_b = None
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None, None
