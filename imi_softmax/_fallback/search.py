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


def _check_offsets(offsets: Tensor, kk: int, n: Optional[int]) -> int:
    if offsets.dtype != torch.int64 or offsets.dim() != 1 or offsets.numel() != kk + 1:
        raise RuntimeError(f"midx_search: offsets must be int64 [K*K+1] = [{kk + 1}], got {offsets.dtype} "
                           f"{tuple(offsets.shape)}")
    last = int(offsets[-1]) if n is None else n
    if int(offsets[0]) != 0 or int(offsets[-1]) != last or bool((offsets[1:] < offsets[:-1]).any()):
        raise RuntimeError(f"midx_search: offsets must start at 0, never decrease and end at len(class_ids) = {last}")
    return last


def _check_scores(s1: Tensor, s2: Tensor, budget: int) -> None:
    if s1.dim() != 2 or s1.shape != s2.shape:
        raise RuntimeError(f"imi_softmax: s1 and s2 must both be [B, K], got {tuple(s1.shape)} and {tuple(s2.shape)}")
    if s1.dtype != torch.float32 or s2.dtype != torch.float32:
        raise RuntimeError("imi_softmax: query scores must be float32")
    if budget < 1:
        raise RuntimeError(f"midx_search: budget (candidates to collect per query) must be >= 1, got {budget}")


def midx_search_cells(s1: Tensor, s2: Tensor, offsets: Tensor, budget: int) -> Tuple[Tensor, Tensor]:
    _check_scores(s1, s2, budget)
    _check_offsets(offsets, s1.shape[1] ** 2, None)
    return _visit(s1, s2, offsets, budget)


def midx_search(query: Tensor, weight: Tensor, bias: Optional[Tensor], s1: Tensor, s2: Tensor, offsets: Tensor,
                class_ids: Tensor, k: int, budget: int, rerank: str = "auto") -> Tuple[Tensor, Tensor]:
    # rerank (the compiled CPU op's loop order) does not change the result: checked, then unused
    n = weight.shape[0]
    if rerank not in ("auto", "query", "cell"):
        raise RuntimeError(f"midx_search: rerank must be 'auto', 'query' or 'cell', got '{rerank}'")
    # the compiled op's checks and messages (csrc/tensor_views.h, check_search_inputs)
    if query.dim() != 2 or weight.dim() != 2 or query.shape[1] != weight.shape[1]:
        raise RuntimeError(f"midx_search: query [B, d] and weight [N, d] expected, got {tuple(query.shape)} and "
                           f"{tuple(weight.shape)}")
    if query.dtype != weight.dtype:
        raise RuntimeError(f"midx_search: query is {query.dtype} but weight is {weight.dtype}; cast the query to "
                           f"the weight's dtype")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != n or bias.dtype != weight.dtype):
        raise RuntimeError(f"midx_search: bias must be [N] = [{n}] with weight's dtype")
    if s1.dim() != 2 or s1.shape[0] != query.shape[0]:
        raise RuntimeError(f"midx_search: s1/s2 must have one row per query (B = {query.shape[0]}), got "
                           f"{tuple(s1.shape)}")
    if class_ids.dim() != 1 or class_ids.dtype not in (torch.int64, torch.int32):
        raise RuntimeError(f"midx_search: class_ids must be contiguous int64 or int32 [N], got {class_ids.dtype} "
                           f"{tuple(class_ids.shape)}")
    if class_ids.numel() != n:
        raise RuntimeError(f"midx_search: the index holds {class_ids.numel()} classes but weight has {n} rows; "
                           f"rebuild the index from this weight")
    if not 0 <= k <= n:
        raise RuntimeError(f"midx_search: k must lie in [0, N = {n}], got {k}")
    if budget < k:
        raise RuntimeError(f"midx_search: budget ({budget}) must be >= k ({k})")
    _check_scores(s1, s2, max(budget, 1))
    _check_offsets(offsets, s1.shape[1] ** 2, n)
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    b = query.shape[0]
    ids = torch.empty((b, k), dtype=torch.int64, device=query.device)
    scores = torch.empty((b, k), dtype=acc, device=query.device)
    if k == 0:
        return ids, scores
    cls = class_ids.long()
    bad = (cls < 0) | (cls >= n)
    if bool(bad.any()):
        pos = int(bad.nonzero()[0, 0])
        raise RuntimeError(f"midx_search: class_ids has class id {int(cls[pos])} at [{pos}] outside [0, N = {n})")
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
