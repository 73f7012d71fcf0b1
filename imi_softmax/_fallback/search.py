"""Retrieval in pure PyTorch: the cells of csrc/include/imi_softmax/search.h in the same order and
the same exact rerank, vectorized per query.

The kernels pop cells from a heap in the total order (s1[k1] + s2[k2] descending, then the rank of
k1, then the rank of k2, ranks by score descending and codeword ascending); here every cell of every
query is sorted by that key at once (stable sorts, least significant key first). The cell score is
one float32 addition, as in the kernels.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from ._checks import (check, check_finite_scores, check_no_bad_position, check_offsets, check_query_scores,
                      check_same_device, contiguous, in_range)


def _ranks(s: Tensor) -> Tensor:
    """Rank of each codeword of each row of s [B, K] (score descending, codeword ascending on ties)."""
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    return ranks.scatter_(1, order, torch.arange(s.shape[1], device=s.device).expand_as(order).contiguous())


def _visit(s1: Tensor, s2: Tensor, offsets: Tensor, budget: int) -> Tuple[Tensor, Tensor]:
    """Visited non-empty cells of every query, in order ([B, min(K*K, budget)], -1 after the last),
    and the classes they hold [B]: all rows at once (TopCellsSampler calls this every step)."""
    b, k = s1.shape
    width = min(k * k, budget)
    r1, r2 = _ranks(s1), _ranks(s2)
    tie = (r1.unsqueeze(2) * k + r2.unsqueeze(1)).reshape(b, k * k)  # the ranks, i major
    score = (s1.unsqueeze(2) + s2.unsqueeze(1)).reshape(b, k * k)
    by_tie = torch.argsort(tie, dim=1)
    order = by_tie.gather(1, torch.sort(score.gather(1, by_tie), dim=1, descending=True, stable=True).indices)
    sizes = (offsets[1:] - offsets[:-1])[order]
    # the non-empty cells first, in visit order (a stable sort on "is empty")
    front = torch.sort((sizes == 0).to(torch.int8), dim=1, stable=True).indices
    order, sizes = order.gather(1, front), sizes.gather(1, front)
    before = torch.cumsum(sizes, 1) - sizes  # classes collected before each cell
    take = (before < budget) & (sizes > 0)   # <= min(K*K, budget) cells: each holds >= 1 class
    cells = torch.where(take, order, -1)[:, :width].contiguous()
    return cells, (sizes * take).sum(1)


def _visited(s1: Tensor, s2: Tensor, offsets: Tensor, budget: int) -> Tuple[Tensor, int]:
    """Visited non-empty cells of one query (in order) and the classes they hold."""
    cells, count = _visit(s1.unsqueeze(0), s2.unsqueeze(0), offsets, budget)
    return cells[0][cells[0] >= 0], int(count[0])


def _check_cells_inputs(op: str, s1: Tensor, s2: Tensor, offsets: Tensor, n: int, budget: int) -> None:
    """check_search_cells_inputs: the query scores, budget >= 1 and the offsets over n classes."""
    check_query_scores(s1, s2)
    check(budget >= 1, f"{op}: budget (candidates to collect per query) must be >= 1, got {budget}")
    check_same_device(op, s1=s1, s2=s2, offsets=offsets)
    check_offsets(op, s1.shape[1], offsets, n)
    check_finite_scores(op, s1, s2)


def midx_search_cells(s1: Tensor, s2: Tensor, offsets: Tensor, budget: int) -> Tuple[Tensor, Tensor]:
    op = "midx_search_cells"
    check_query_scores(s1, s2)
    kk = s1.shape[1] ** 2
    check(offsets.dtype == torch.int64 and offsets.dim() == 1 and offsets.numel() == kk + 1,
          f"{op}: offsets must be int64 [K*K+1] = [{kk + 1}], got {offsets.dtype} {list(offsets.shape)}")
    _check_cells_inputs(op, s1, s2, offsets, int(offsets[kk]), budget)  # the class count: offsets' last entry
    return _visit(s1, s2, offsets, budget)


def midx_search(query: Tensor, weight: Tensor, bias: Optional[Tensor], s1: Tensor, s2: Tensor, offsets: Tensor,
                class_ids: Tensor, k: int, budget: int, rerank: str = "auto") -> Tuple[Tensor, Tensor]:
    # rerank (the compiled CPU op's loop order) does not change the result: checked, then unused
    op = "midx_search"
    check(rerank in ("auto", "query", "cell"), f"{op}: rerank must be 'auto', 'query' or 'cell', got '{rerank}'")
    # check_search_inputs
    check(query.dim() == 2 and weight.dim() == 2 and query.shape[1] == weight.shape[1],
          f"{op}: query [B, d] and weight [N, d] expected, got {list(query.shape)} and {list(weight.shape)}")
    n = weight.shape[0]
    check(query.dtype == weight.dtype,
          f"{op}: query is {query.dtype} but weight is {weight.dtype}; cast the query to the weight's dtype")
    check(weight.is_floating_point(), f"{op}: weight must be floating point, got {weight.dtype}")
    if bias is not None:
        check(bias.dim() == 1 and bias.shape[0] == n and bias.dtype == weight.dtype,
              f"{op}: bias must be [N] = [{n}] with weight's dtype, got {bias.dtype} {list(bias.shape)}")
    check(s1.dim() == 2 and s1.shape[0] == query.shape[0],
          f"{op}: s1/s2 must have one row per query (B = {query.shape[0]}), got {list(s1.shape)}")
    check(class_ids.dtype in (torch.int64, torch.int32) and class_ids.dim() == 1 and contiguous(class_ids),
          f"{op}: class_ids must be contiguous int64 or int32 [N], got {class_ids.dtype} {list(class_ids.shape)}")
    check(class_ids.numel() == n, f"{op}: the index holds {class_ids.numel()} classes but weight has {n} rows; "
                                  f"rebuild the index from this weight")
    check(0 <= k <= n, f"{op}: k must lie in [0, N = {n}], got {k}")
    check(budget >= k, f"{op}: budget ({budget}) must be >= k ({k})")
    check_same_device(op, query=query, weight=weight, bias=bias, s1=s1, s2=s2, offsets=offsets, class_ids=class_ids)
    _check_cells_inputs(op, s1, s2, offsets, n, max(budget, 1))
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    b = query.shape[0]
    ids = torch.empty((b, k), dtype=torch.int64, device=query.device)
    scores = torch.empty((b, k), dtype=acc, device=query.device)
    if k == 0:
        return ids, scores
    cls = class_ids.long()
    check_no_bad_position(op, "class_ids", cls, ~in_range(cls, n), f"[0, N = {n})")
    for row in range(b):
        visited, _ = _visited(s1[row], s2[row], offsets, budget)
        cand = torch.cat([cls[int(offsets[c]):int(offsets[c + 1])] for c in visited.tolist()])
        cand = cand.sort().values  # ties go to the smaller id (the stable sort below keeps this order)
        logit = weight[cand].to(acc) @ query[row].to(acc)
        if bias is not None:
            logit = logit + bias[cand].to(acc)
        best = torch.sort(logit, descending=True, stable=True).indices[:k]
        ids[row], scores[row] = cand[best], logit[best]
    return ids, scores
