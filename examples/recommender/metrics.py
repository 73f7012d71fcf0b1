"""Top-k ranking metrics over the whole catalogue (pure functions, torch or numpy inputs).

Conventions (those of the VAE-CF / MIDX papers):
- ``scores`` [U, N]: one row of item scores per user; items the user saw in training must already be
  excluded (set to -inf, see :func:`mask_scores`), so they never take a top-k slot.
- ``heldout_mask`` [U, N] bool: the user's held-out (test) items.
- Recall@k = hits in the top k / min(k, n_heldout)   (so a perfect ranking scores 1.0).
- NDCG@k  = sum_{r<k} rel_r / log2(r+2)  /  sum_{r<min(k, n_heldout)} 1 / log2(r+2).
Functions return one value per user (float64 tensor [U]); users with no held-out item give NaN, so
average with ``torch.nanmean`` (or skip them before scoring, as :func:`evaluate` does).
The recall/NDCG math is :mod:`imi_softmax.metrics` (the one implementation); this module keeps the
example's [U, N] mask interface and its truncated-recall convention.
"""
from __future__ import annotations

from typing import Dict, Iterable

import numpy as np
import torch
from torch import Tensor

from imi_softmax import metrics as _pkg


def _t(x) -> Tensor:
    return x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))


def mask_scores(scores, train_mask) -> Tensor:
    """scores with the training items (train_mask True) set to -inf."""
    return _t(scores).masked_fill(_t(train_mask).bool(), float("-inf"))


def topk_hits(scores, heldout_mask, k: int) -> Tensor:
    """[U, k] bool: whether the r-th ranked item is held out (ties broken by torch.topk)."""
    scores, heldout_mask = _t(scores), _t(heldout_mask).bool()
    if scores.shape != heldout_mask.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and heldout_mask {tuple(heldout_mask.shape)} differ")
    k = min(int(k), scores.shape[-1])
    idx = scores.topk(k, dim=-1).indices
    return heldout_mask.gather(-1, idx)


def recall_from_hits(hits, n_relevant, k: int) -> Tensor:
    """hits / min(k, n_relevant): :func:`imi_softmax.metrics.recall_from_hits` with ``truncated=True``."""
    return _pkg.recall_from_hits(_t(hits), _t(n_relevant), k, truncated=True)


def ndcg_from_hits(hits, n_relevant, k: int) -> Tensor:
    """:func:`imi_softmax.metrics.ndcg_from_hits` (same formula as this module's docstring)."""
    return _pkg.ndcg_from_hits(_t(hits), _t(n_relevant), k)


def recall_at_k(scores, heldout_mask, k: int) -> Tensor:
    """Per-user Recall@k = |top-k ∩ held-out| / min(k, |held-out|)."""
    heldout_mask = _t(heldout_mask).bool()
    return recall_from_hits(topk_hits(scores, heldout_mask, k), heldout_mask.sum(-1), k)


def ndcg_at_k(scores, heldout_mask, k: int) -> Tensor:
    """Per-user NDCG@k with binary relevance (ideal DCG over min(k, |held-out|) positions)."""
    heldout_mask = _t(heldout_mask).bool()
    return ndcg_from_hits(topk_hits(scores, heldout_mask, k), heldout_mask.sum(-1), k)


def metrics_from_hits(hits, n_relevant, recall_ks: Iterable[int] = (20, 50), ndcg_ks: Iterable[int] = (10, 50)) -> Dict[str, Tensor]:
    out = {}
    for k in recall_ks:
        out[f"recall@{k}"] = recall_from_hits(hits, n_relevant, k)
    for k in ndcg_ks:
        out[f"ndcg@{k}"] = ndcg_from_hits(hits, n_relevant, k)
    return out


def random_recall_at_k(k: int, n_relevant, num_candidates) -> Tensor:
    """Expected per-user Recall@k of a uniformly random ranking of ``num_candidates`` unmasked items
    of which ``n_relevant`` are held out: E[hits] = k * n / C, so Recall = max(k, n) / C (capped at 1)."""
    n = _t(n_relevant).to(torch.float64)
    c = _t(num_candidates).to(torch.float64)
    return torch.clamp(torch.maximum(n, torch.full_like(n, float(k))) / c, max=1.0)


__all__ = ["mask_scores", "topk_hits", "recall_at_k", "ndcg_at_k", "recall_from_hits", "ndcg_from_hits",
           "metrics_from_hits", "random_recall_at_k"]
