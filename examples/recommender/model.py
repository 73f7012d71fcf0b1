"""Two-tower recommender: a user tower pooling the user's history, an item side that is the weight
of the output head (``full`` nn.Linear or an ``IMISoftmax`` with one of four samplers)."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from imi_softmax import IMISoftmax, InBatchSampler, MIDXSampler, MixtureSampler, TopCellsSampler

HEADS = ("full", "uniform", "unigram", "midx-pq", "midx-rq")
# composed proposals (issue 13): MIDX + 10% hard negatives from the query's top cells, in-batch
# negatives with the streaming logQ estimate, in-batch + M MIDX draws (mixed negative sampling)
MIXTURE_HEADS = ("midx-hard", "inbatch", "inbatch-midx")
ALL_HEADS = HEADS + MIXTURE_HEADS
HARD_FRACTION = 0.1
HARD_BUDGET = 256  # classes in the query's top cells that the hard component draws from
# heads whose negatives do not depend on M (trained once per grid)
M_FREE_HEADS = ("full", "inbatch")


class UserEncoder(nn.Module):
    """Query of a user = p + MLP(p), where p is the mean of the input embeddings of the user's
    training items (an nn.EmbeddingBag in "sum" mode, divided by the count).

    ``leave_one_out``: for a training row (user u, target item t from u's history) the pooled vector
    leaves t out, p = (sum_u - e_t) / (n_u - 1), so one bag per user serves all its targets.
    """

    def __init__(self, num_items: int, dim: int = 64, hidden: int = 128, sparse: bool = False):
        super().__init__()
        self.item_emb = nn.EmbeddingBag(num_items, dim, mode="sum", sparse=sparse)
        nn.init.normal_(self.item_emb.weight, std=0.1)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def pooled_sum(self, hist: Tensor, offsets: Tensor) -> Tensor:
        """[B, d] sums over the bags given in EmbeddingBag's flat ``hist`` + ``offsets`` layout."""
        return self.item_emb(hist, offsets)

    def forward(self, hist: Tensor, offsets: Tensor, counts: Tensor,
                owner: Optional[Tensor] = None, target: Optional[Tensor] = None) -> Tensor:
        """Queries [B, d] for B bags (no owner/target), or [R, d] leave-one-out queries for R rows
        (row r: bag ``owner[r]`` without item ``target[r]``)."""
        s = self.pooled_sum(hist, offsets)
        n = counts.to(s.dtype)
        if owner is None:
            p = s / n.clamp_min(1).unsqueeze(1)
        else:
            e_t = self.item_emb(target.unsqueeze(1))  # a one-item bag: sparse grad when sparse=True
            p = (s[owner] - e_t) / (n[owner] - 1).clamp_min(1).unsqueeze(1)
        return p + self.mlp(p)


class OutputHead(nn.Module):
    """Scores all items with ``forward(q)`` [*, N]; ``loss(q, target)`` is the training loss.

    kind: "full" (nn.Linear + F.cross_entropy) or "uniform" | "unigram" | "midx-pq" | "midx-rq"
    (imi_softmax.IMISoftmax with that sampler and ``num_samples`` negatives per row), or one of
    MIXTURE_HEADS: "midx-hard" (MIDX rq mixed with 10% TopCellsSampler draws), "inbatch" (the
    batch's targets as negatives, logQ from the streaming frequency estimate; M unused),
    "inbatch-midx" (the batch's targets + M MIDX draws, balance-heuristic correction).
    """

    def __init__(self, kind: str, dim: int, num_items: int, num_samples: int = 256,
                 item_counts: Optional[np.ndarray] = None, refresh_every: int = 50,
                 num_codewords: int = 64, sparse: bool = False, **head_kwargs):
        super().__init__()
        if kind not in ALL_HEADS:
            raise ValueError(f"head must be one of {ALL_HEADS}, got {kind!r}")
        self.kind = kind
        if kind == "full":
            self.layer = nn.Linear(dim, num_items)
            return
        kw = dict(num_samples=num_samples, refresh_every=refresh_every, sparse_grad=sparse, **head_kwargs)
        if kind == "unigram":
            if item_counts is None:
                raise ValueError("head='unigram' needs item_counts (training interactions per item)")
            kw.update(sampler="unigram", class_counts=torch.as_tensor(np.asarray(item_counts), dtype=torch.float64))
        elif kind == "uniform":
            kw.update(sampler="uniform")
        elif kind == "midx-hard":
            midx = MIDXSampler(num_codewords, "rq")
            kw.update(sampler=MixtureSampler([(midx, 1 - HARD_FRACTION),
                                              (TopCellsSampler(midx, budget=HARD_BUDGET), HARD_FRACTION)]))
        elif kind == "inbatch":  # the batch's targets are the negatives: no sampled ones
            kw.update(sampler=InBatchSampler(num_items), num_samples=0)
        elif kind == "inbatch-midx":
            kw.update(sampler=InBatchSampler(num_items, mix_with=MIDXSampler(num_codewords, "rq")))
        else:
            kw.update(sampler="midx", quantizer=kind.split("-")[1], num_codewords=num_codewords)
        self.layer = IMISoftmax(dim, num_items, **kw)

    @property
    def weight(self) -> Tensor:
        return self.layer.weight

    def forward(self, q: Tensor) -> Tensor:
        return self.layer(q)

    def loss(self, q: Tensor, target: Tensor) -> Tensor:
        if self.kind == "full":
            return F.cross_entropy(self.layer(q), target)
        return self.layer(q, target)  # training mode: sampled softmax; eval mode: exact CE

    def topk(self, q: Tensor, k: int):
        if self.kind == "full":
            return self.layer(q).topk(k, dim=-1)
        return self.layer.topk(q, k)


class Recommender(nn.Module):
    def __init__(self, num_items: int, head: str = "full", dim: int = 64, hidden: int = 128,
                 num_samples: int = 256, item_counts=None, refresh_every: int = 50,
                 num_codewords: int = 64, sparse: bool = False, **head_kwargs):
        super().__init__()
        self.encoder = UserEncoder(num_items, dim, hidden, sparse=sparse)
        self.head = OutputHead(head, dim, num_items, num_samples, item_counts, refresh_every,
                               num_codewords, sparse=sparse, **head_kwargs)

    def training_loss(self, batch) -> Tensor:
        q = self.encoder(batch["hist"], batch["offsets"], batch["counts"], batch["owner"], batch["target"])
        return self.head.loss(q, batch["target"])

    @torch.no_grad()
    def user_queries(self, hist: Tensor, offsets: Tensor, counts: Tensor) -> Tensor:
        return self.encoder(hist, offsets, counts)
