"""Exact evaluation over a class-sharded head: the cross-entropy and the top-k, each rank over its
own classes in chunks (no [B, N] or [B, N / P] tensor exists), combined across ranks."""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .._ops import acc_dtype
from .collectives import Collectives
from .loss import GatheredBatch, combine_logsumexp


def default_chunk(rows: int, budget: int = 1 << 22) -> int:
    """Classes per chunk so that one chunk's [rows, chunk] logits hold about ``budget`` numbers."""
    return max(1, budget // max(1, rows))


def _chunks(n: int, chunk: int):
    for start in range(0, n, chunk):
        yield start, min(start + chunk, n)


@torch.no_grad()
def exact_row_losses(comm: Collectives, batch: GatheredBatch, weight: Tensor, bias: Optional[Tensor],
                     class_start: int, chunk: int) -> Tensor:
    """Exact cross-entropy of this rank's rows [B_r] (0 on ignored rows): logsumexp over every class
    of every shard, minus the target's logit (from its owner)."""
    acc = acc_dtype(weight.dtype)
    n = weight.shape[0]
    x = batch.x.to(weight.dtype)
    lse = torch.full((x.shape[0],), -math.inf, dtype=acc, device=x.device)
    for lo, hi in _chunks(n, chunk):
        logits = F.linear(x, weight[lo:hi], None if bias is None else bias[lo:hi]).to(acc)
        lse = torch.logaddexp(lse, torch.logsumexp(logits, 1))
    t_local = batch.target - class_start
    own = batch.valid & (t_local >= 0) & (t_local < n)
    safe = torch.where(own, t_local, torch.zeros_like(t_local))
    target_logit = (x.to(acc) * weight[safe].to(acc)).sum(1)
    if bias is not None:
        target_logit = target_logit + bias[safe].to(acc)
    target_logit = torch.where(own, target_logit, torch.zeros_like(target_logit))
    total, target_all = combine_logsumexp(comm, lse, target_logit)
    rows = torch.where(batch.valid, total - target_all, torch.zeros_like(total))
    start = comm.rank * batch.rows_per_rank
    return rows[start:start + batch.local_rows]


@torch.no_grad()
def sharded_topk(comm: Collectives, batch: GatheredBatch, weight: Tensor, bias: Optional[Tensor],
                 class_start: int, k: int, chunk: int) -> Tuple[Tensor, Tensor]:
    """(values, global class ids) [B_r, k] of this rank's rows: each rank's top-k over its classes
    (in chunks) for every gathered row, sent to the rows' ranks (all-to-all: P * B_r * k values and
    ids per rank), merged per row."""
    n = weight.shape[0]
    x = batch.x.to(weight.dtype)
    best_v = x.new_full((x.shape[0], 0), -math.inf)
    best_i = torch.empty((x.shape[0], 0), dtype=torch.int64, device=x.device)
    for lo, hi in _chunks(n, chunk):
        logits = F.linear(x, weight[lo:hi], None if bias is None else bias[lo:hi])
        v, i = logits.topk(min(k, hi - lo), dim=1)
        v, j = torch.cat([best_v, v], 1), torch.cat([best_i, i + lo], 1)
        keep = min(k, v.shape[1])
        best_v, pos = v.topk(keep, dim=1)
        best_i = j.gather(1, pos)
    if best_v.shape[1] < k:  # a shard smaller than k: pad with -inf, never chosen over a real class
        pad = k - best_v.shape[1]
        best_v = torch.cat([best_v, best_v.new_full((x.shape[0], pad), -math.inf)], 1)
        best_i = torch.cat([best_i, best_i.new_full((x.shape[0], pad), -1 - class_start)], 1)
    # each rank's candidates for rank q's rows go to rank q only: P * B_r * k values and ids arrive
    all_v = comm.all_to_all_rows(best_v, "topk_values").view(comm.world, batch.rows_per_rank, k)
    all_i = comm.all_to_all_rows(best_i + class_start, "topk_ids").view(comm.world, batch.rows_per_rank, k)
    mine = slice(0, batch.local_rows)
    v = all_v[:, mine].permute(1, 0, 2).reshape(batch.local_rows, comm.world * k)
    i = all_i[:, mine].permute(1, 0, 2).reshape(batch.local_rows, comm.world * k)
    values, pos = v.topk(k, dim=1)
    return values, i.gather(1, pos)
