"""Top-k ranking metrics for single- and multi-label targets: precision@k, recall@k, nDCG@k, and the
propensity-scored P@k / nDCG@k of Jain, Prabhu and Varma (KDD 2016).

Predictions (``predictions``):
- scores ``[B, N]`` (floating): ranked by ``torch.topk`` (ties broken by topk); ``k > N`` keeps all N;
- ranked ids ``[B, k']`` (int64, best first, ``k' >= k``): a repeated id counts once, where it first
  appears (later copies are misses).

Targets (``target``), the forms of DESIGN.md's multi-label head plus two conveniences:
- padded ``[B, L]`` int64, pad = ``ignore_index`` (default -100);
- CSR pair ``(offsets [B+1], labels [nnz])`` int64, row b's labels are ``labels[offsets[b]:offsets[b+1]]``;
- ``[B]`` int64: one label per row (``ignore_index`` = no label);
- ``[B, N]`` bool relevance mask.
A label repeated within a row counts once (targets are sets).

Conventions (all functions return one float64 value per row, ``[B]``):
- ``P@k = hits in the top k / k``;
- ``R@k = hits / |labels|`` (``truncated=True``: ``hits / min(k, |labels|)``, the VAE-CF convention, so
  a perfect ranking scores 1 for every k);
- ``nDCG@k = sum_{r<k} hit_r / log2(r+2)  /  sum_{r<min(k,|labels|)} 1 / log2(r+2)``;
- ``PSP@k = (1/k) sum_{r<k} hit_r / p_{pred_r}`` and ``PSnDCG@k = sum_{r<k} hit_r / (p_{pred_r} log2(r+2))
  / sum_{r<min(k,|labels|)} 1 / log2(r+2)``: the paper's definitions (eqs. for PSP@k and PSnDCG@k).
  ``normalize=True`` divides each by the same metric of the best ranking instead (the row's labels
  ordered by decreasing 1/p), the convention of the Extreme Classification Repository's tools
  (pyxclib ``psprecision`` / ``psndcg``), so a perfect ranking scores 1.
- A row with no label: P@k and PSP@k are 0 (no hit is possible, and such rows count in the mean, as
  in the repository's evaluation); R@k, nDCG@k and PSnDCG@k are NaN (0 / 0): average with
  ``torch.nanmean`` to skip them, or drop those rows first.

Propensities: :func:`propensity` ``p_l = 1 / (1 + C (N_l + B)^-A)`` with ``C = (ln N - 1)(B + 1)^A``,
N = training instances, N_l = training instances with label l; A = 0.55, B = 1.5 by default (the
paper's Wikipedia-LSHTC values; Amazon: 0.6, 2.6).
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from ._targets import _as_tensor, csr_to_padded as _csr_to_padded

Target = Union[Tensor, Tuple[Tensor, Tensor]]

__all__ = ["precision_at_k", "recall_at_k", "ndcg_at_k", "psp_at_k", "psndcg_at_k", "propensity",
           "ranked_hits", "precision_from_hits", "recall_from_hits", "ndcg_from_hits", "evaluate"]


def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an int, got {type(k).__name__} ({k!r})")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return int(k)


def _discounts(n: int, device=None) -> Tensor:
    return 1.0 / torch.log2(torch.arange(n, dtype=torch.float64, device=device) + 2.0)


# -- targets ---------------------------------------------------------------------------------
def _check_ids_range(name: str, ids: Tensor, num_classes: Optional[int], fix: str) -> None:
    if ids.numel() == 0:
        return
    lo = int(ids.min())
    if lo < 0:
        raise IndexError(f"{name} holds the id {lo} < 0; {fix}")
    if num_classes is not None:
        hi = int(ids.max())
        if hi >= num_classes:
            raise IndexError(f"{name} holds the id {hi}, outside [0, {num_classes}); {fix}")


def _label_sets(target: Target, batch: int, ignore_index: int, num_classes: Optional[int]) -> Tensor:
    """Each row's distinct labels, sorted ascending, padded on the right with a value above every
    id: [B, L] int64. Validates the target form and its ids."""
    fix = "labels must be class ids in [0, num_classes) (or ignore_index pads in a padded target)"
    if isinstance(target, (tuple, list)):
        if len(target) != 2:
            raise ValueError(f"a CSR target is a pair (offsets, labels), got {len(target)} items")
        padded, labels = _csr_to_padded(target[0], target[1], batch)
        _check_ids_range("target labels", labels, num_classes, fix)
    else:
        target = _as_tensor(target, "target")
        if target.dtype == torch.bool:
            if target.dim() != 2 or target.shape[0] != batch:
                raise ValueError(f"a bool target must be a [B, N] relevance mask with B = {batch}, got {tuple(target.shape)}")
            if num_classes is not None and target.shape[1] != num_classes:
                raise ValueError(f"the relevance mask has {target.shape[1]} columns but there are {num_classes} classes")
            n = target.sum(1)
            width = int(n.max()) if batch else 0
            # stable sort puts the True columns first, in increasing id order
            order = torch.sort(target.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :width]
            padded = torch.where(torch.arange(width, device=target.device) < n.unsqueeze(1), order, -1)
        elif target.dtype in (torch.int64, torch.int32):
            if target.dim() == 1:
                target = target.unsqueeze(1)
            if target.dim() != 2 or target.shape[0] != batch:
                raise ValueError(f"target must be padded [B, L] (or [B]) with B = {batch} (prediction rows), "
                                 f"got {tuple(target.shape)}")
            target = target.long()
            valid = target != ignore_index
            _check_ids_range("target", target[valid], num_classes, fix + f"; pad with ignore_index={ignore_index}")
            padded = torch.where(valid, target, -1)
        else:
            raise TypeError(f"target must be int64 (padded [B, L] or [B]), a bool [B, N] mask or a CSR pair "
                            f"(offsets, labels), got dtype {target.dtype}")
    big = torch.iinfo(torch.int64).max
    s = torch.where(padded < 0, big, padded).sort(dim=1).values
    dup = torch.zeros_like(s, dtype=torch.bool)
    dup[:, 1:] = s[:, 1:] == s[:, :-1]
    return torch.where(dup, big, s).sort(dim=1).values


def _ranked_ids(predictions, k: int, num_classes: Optional[int]) -> Tuple[Tensor, int]:
    predictions = _as_tensor(predictions, "predictions")
    if predictions.dim() != 2:
        raise ValueError(f"predictions must be scores [B, N] or ranked ids [B, k], got shape {tuple(predictions.shape)}")
    if predictions.is_floating_point():
        if num_classes is not None and predictions.shape[1] != num_classes:
            raise ValueError(f"scores have {predictions.shape[1]} columns but there are {num_classes} classes")
        kk = min(k, predictions.shape[1])
        return predictions.topk(kk, dim=1).indices, predictions.shape[1]
    if predictions.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"predictions must be floating scores [B, N] or int64 ranked ids [B, k], got {predictions.dtype}")
    if predictions.shape[1] < k:
        raise ValueError(f"ranked ids have {predictions.shape[1]} columns but k = {k}: pass at least k ids per "
                         f"row (or the scores [B, N])")
    ids = predictions[:, :k].long()
    _check_ids_range("predictions", ids, num_classes, "ranked ids must be class ids in [0, num_classes)")
    return ids, num_classes


def ranked_hits(predictions, target: Target, k: int, *, ignore_index: int = -100,
                num_classes: Optional[int] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """(hits [B, k'] bool, ranked ids [B, k'], labels [B, L] sorted, padded with int64 max) where
    ``hits[b, r]`` says whether the r-th ranked id of row b is one of its labels (first occurrence of
    an id only); ``k' = min(k, N)`` for scores, ``k`` for ids. ``num_classes`` (optional) bounds the ids."""
    k = _check_k(k)
    predictions = _as_tensor(predictions, "predictions")
    if predictions.dim() != 2:
        raise ValueError(f"predictions must be scores [B, N] or ranked ids [B, k], got shape {tuple(predictions.shape)}")
    ids, num_classes = _ranked_ids(predictions, k, num_classes)  # scores [B, N] bound the labels by N
    labels = _label_sets(target, ids.shape[0], ignore_index, num_classes).to(ids.device)
    if labels.shape[1] == 0:
        return torch.zeros_like(ids, dtype=torch.bool), ids, labels
    # ids [:, :k] of wider ranked ids is a strided view: searchsorted would copy it and warn
    pos = torch.searchsorted(labels, ids.contiguous()).clamp(max=labels.shape[1] - 1)
    hits = labels.gather(1, pos) == ids
    if ids.shape[1] > 1:  # a repeated id scores once, at its first rank
        first = ~(ids.unsqueeze(2) == ids.unsqueeze(1)).tril(-1).any(2)
        hits &= first
    return hits, ids, labels


def _num_labels(labels: Tensor) -> Tensor:
    return (labels != torch.iinfo(torch.int64).max).sum(1)


# -- metrics from hits (shared with examples/recommender/metrics.py) ------------------------
def precision_from_hits(hits, k: int) -> Tensor:
    """P@k = hits in the first k ranks / k, [B] float64."""
    k = _check_k(k)
    hits = _as_tensor(hits, "hits").bool()
    return hits[:, :k].sum(-1).to(torch.float64) / k


def recall_from_hits(hits, n_relevant, k: int, *, truncated: bool = False) -> Tensor:
    """R@k = hits / n_relevant (``truncated``: hits / min(k, n_relevant)); NaN where n_relevant = 0."""
    k = _check_k(k)
    hits, n = _as_tensor(hits, "hits").bool(), _as_tensor(n_relevant, "n_relevant").to(torch.float64)
    got = hits[:, :k].sum(-1).to(torch.float64)
    den = torch.clamp(n, max=k) if truncated else n
    return got / den.masked_fill(n == 0, float("nan"))


def ndcg_from_hits(hits, n_relevant, k: int, gains: Optional[Tensor] = None, ideal: Optional[Tensor] = None) -> Tensor:
    """nDCG@k with binary relevance: sum_{r<k} g_r hit_r / log2(r+2) over the ideal DCG
    sum_{r<min(k, n)} 1 / log2(r+2) (``ideal`` [B]: a given normaliser instead); NaN where n = 0.
    ``gains`` [B, k] multiplies each hit (propensity-scored nDCG)."""
    k = _check_k(k)
    hits, n = _as_tensor(hits, "hits").bool(), _as_tensor(n_relevant, "n_relevant").to(torch.long)
    h = hits[:, :k].to(torch.float64)
    disc = _discounts(k, h.device)
    if gains is not None:
        h = h * gains[:, :k]
    dcg = (h * disc[: h.shape[1]]).sum(-1)
    if ideal is None:
        table = torch.cat([torch.zeros(1, dtype=torch.float64, device=h.device), disc.cumsum(0)])
        ideal = table[n.clamp(max=k)]
    return dcg / ideal.masked_fill(n == 0, float("nan"))


# -- public metrics -----------------------------------------------------------------------------
def precision_at_k(predictions, target: Target, k: int, *, ignore_index: int = -100,
                   num_classes: Optional[int] = None) -> Tensor:
    """Per-row P@k [B] float64 (module docstring: input forms and conventions)."""
    hits, _, _ = ranked_hits(predictions, target, k, ignore_index=ignore_index, num_classes=num_classes)
    return precision_from_hits(hits, k)


def recall_at_k(predictions, target: Target, k: int, *, truncated: bool = False, ignore_index: int = -100,
                num_classes: Optional[int] = None) -> Tensor:
    """Per-row R@k [B] float64: hits / |labels| (``truncated``: / min(k, |labels|)); NaN for no label."""
    hits, _, labels = ranked_hits(predictions, target, k, ignore_index=ignore_index, num_classes=num_classes)
    return recall_from_hits(hits, _num_labels(labels), k, truncated=truncated)


def ndcg_at_k(predictions, target: Target, k: int, *, ignore_index: int = -100,
              num_classes: Optional[int] = None) -> Tensor:
    """Per-row nDCG@k [B] float64 with binary relevance; NaN for a row with no label."""
    hits, _, labels = ranked_hits(predictions, target, k, ignore_index=ignore_index, num_classes=num_classes)
    return ndcg_from_hits(hits, _num_labels(labels), k)


def propensity(label_counts, num_instances: int, A: float = 0.55, B: float = 1.5) -> Tensor:
    """Jain et al. (2016) propensities [num_labels] float64: ``p_l = 1 / (1 + C (N_l + B)^-A)``,
    ``C = (ln N - 1)(B + 1)^A``. ``label_counts`` [num_labels]: N_l, training instances with label l;
    ``num_instances``: N, training instances."""
    counts = _as_tensor(label_counts, "label_counts").to(torch.float64)
    if counts.dim() != 1:
        raise ValueError(f"label_counts must be [num_labels], got shape {tuple(counts.shape)}")
    if counts.numel() and bool((counts < 0).any()):
        raise ValueError("label_counts must be >= 0")
    if not isinstance(num_instances, (int, np.integer)) or isinstance(num_instances, bool) or num_instances < 1:
        raise ValueError(f"num_instances must be a positive int (training instances), got {num_instances!r}")
    if B <= 0 and counts.numel() and bool((counts == 0).any()):
        raise ValueError(f"B must be > 0 when some label count is 0 (got B = {B})")
    c = (math.log(num_instances) - 1.0) * (B + 1.0) ** A
    return 1.0 / (1.0 + c * (counts + B) ** (-A))


def _ps_gains(ids: Tensor, labels: Tensor, prop) -> Tuple[Tensor, Tensor]:
    """(1/p of the ranked ids [B, k'], 1/p of each row's labels sorted decreasing [B, L], 0 at pads)."""
    prop = _as_tensor(prop, "propensity").to(torch.float64).to(ids.device)
    if prop.dim() != 1:
        raise ValueError(f"propensity must be [num_labels], got shape {tuple(prop.shape)}")
    if prop.numel() and not bool(((prop > 0) & (prop <= 1)).all()):
        raise ValueError("propensity values must lie in (0, 1]: pass propensity(label_counts, num_instances)")
    inv = 1.0 / prop
    pad = labels == torch.iinfo(torch.int64).max
    lab_inv = torch.where(pad, 0.0, inv[labels.masked_fill(pad, 0)]) if labels.numel() else labels.to(torch.float64)
    return inv[ids], lab_inv.sort(dim=1, descending=True).values


def psp_at_k(predictions, target: Target, k: int, propensity: Tensor, *, normalize: bool = False,
             ignore_index: int = -100) -> Tensor:
    """Per-row propensity-scored precision PSP@k [B] float64 = (1/k) sum_{r<k} hit_r / p_{pred_r};
    ``normalize=True``: divided by the best achievable value (NaN for a row with no label then).
    ``propensity`` [num_labels] from :func:`propensity`; it also bounds the class ids."""
    k = _check_k(k)
    prop = _as_tensor(propensity, "propensity")
    hits, ids, labels = ranked_hits(predictions, target, k, ignore_index=ignore_index, num_classes=prop.numel())
    g, lab_g = _ps_gains(ids, labels, prop)
    psp = (hits * g).sum(1) / k
    if not normalize:
        return psp
    best = lab_g[:, :k].sum(1) / k
    return psp / best.masked_fill(best == 0, float("nan"))


def psndcg_at_k(predictions, target: Target, k: int, propensity: Tensor, *, normalize: bool = False,
                ignore_index: int = -100) -> Tensor:
    """Per-row PSnDCG@k [B] float64 = sum_{r<k} hit_r / (p_{pred_r} log2(r+2)) over
    sum_{r<min(k,|labels|)} 1/log2(r+2) (the paper's); ``normalize=True``: over the PSDCG@k of the
    best ranking (labels by decreasing 1/p; pyxclib's). NaN for a row with no label."""
    k = _check_k(k)
    prop = _as_tensor(propensity, "propensity")
    hits, ids, labels = ranked_hits(predictions, target, k, ignore_index=ignore_index, num_classes=prop.numel())
    g, lab_g = _ps_gains(ids, labels, prop)
    n = _num_labels(labels)
    ideal = None
    if normalize:
        top = lab_g[:, :k]
        ideal = (top * _discounts(k, top.device)[: top.shape[1]]).sum(1)
    return ndcg_from_hits(hits, n, k, gains=g, ideal=ideal)


def evaluate(predictions, target: Target, ks: Iterable[int] = (1, 3, 5), *, propensity: Optional[Tensor] = None,
             ignore_index: int = -100, num_classes: Optional[int] = None) -> Dict[str, float]:
    """Means over rows of P@k, R@k, nDCG@k (and PSP@k, PSnDCG@k given ``propensity``) for each k:
    P and PSP average over every row, the others over rows with at least one label (nanmean)."""
    out: Dict[str, float] = {}
    for k in ks:
        out[f"P@{k}"] = precision_at_k(predictions, target, k, ignore_index=ignore_index, num_classes=num_classes).mean().item()
        out[f"R@{k}"] = torch.nanmean(recall_at_k(predictions, target, k, ignore_index=ignore_index,
                                                  num_classes=num_classes)).item()
        out[f"nDCG@{k}"] = torch.nanmean(ndcg_at_k(predictions, target, k, ignore_index=ignore_index,
                                                   num_classes=num_classes)).item()
        if propensity is not None:
            out[f"PSP@{k}"] = psp_at_k(predictions, target, k, propensity, ignore_index=ignore_index).mean().item()
            out[f"PSnDCG@{k}"] = torch.nanmean(psndcg_at_k(predictions, target, k, propensity,
                                                           ignore_index=ignore_index)).item()
    return out
