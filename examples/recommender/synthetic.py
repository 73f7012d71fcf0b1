"""A synthetic catalogue with planted structure (default 1,000,000 items), for timing and recovery.

Planted model:
- the items are split at random into ``num_clusters`` equal clusters; inside a cluster the item of
  popularity rank r has probability proportional to (r + 1) ** -zipf;
- user u is a mixture of ``clusters_per_user`` clusters with Dirichlet(1) weights;
- each of the user's ``interactions_per_user`` draws picks a cluster from the mixture, then an item
  from that cluster's Zipf law (duplicate pairs are kept once).
:func:`planted_scores` gives the planted P(item | user): ranking with it is the best any model can do
(the "oracle" row of run_large_catalogue.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .data import Interactions


@dataclass
class PlantedModel:
    num_items: int
    num_clusters: int
    cluster_items: np.ndarray   # [C, S] item ids of each cluster in popularity order (rank 0 first)
    item_cluster: np.ndarray    # [N] cluster of each item
    item_rank: np.ndarray       # [N] popularity rank inside its cluster
    rank_prob: np.ndarray       # [S] P(rank r | cluster)
    user_clusters: np.ndarray   # [U, m] clusters of each user
    user_weights: np.ndarray    # [U, m] mixture weights (rows sum to 1)


def make_planted(num_items: int = 1_000_000, num_clusters: int = 200, num_users: int = 50_000,
                 interactions_per_user: int = 30, clusters_per_user: int = 2, zipf: float = 1.1,
                 seed: int = 0):
    """-> (Interactions, PlantedModel). num_items must be a multiple of num_clusters."""
    if num_items % num_clusters:
        raise ValueError(f"num_items ({num_items}) must be a multiple of num_clusters ({num_clusters})")
    rng = np.random.default_rng(seed)
    size = num_items // num_clusters
    cluster_items = rng.permutation(num_items).reshape(num_clusters, size)
    item_cluster = np.empty(num_items, np.int64)
    item_rank = np.empty(num_items, np.int64)
    item_cluster[cluster_items] = np.arange(num_clusters)[:, None]
    item_rank[cluster_items] = np.arange(size)[None, :]
    rank_prob = (np.arange(size) + 1.0) ** -zipf
    rank_prob /= rank_prob.sum()
    rank_cdf = np.cumsum(rank_prob)
    m = clusters_per_user
    user_clusters = np.stack([rng.choice(num_clusters, m, replace=False) for _ in range(num_users)])
    user_weights = rng.dirichlet(np.ones(m), size=num_users)
    L = interactions_per_user
    # cluster of each draw, then a Zipf rank inside it
    which = (rng.random((num_users, L, 1)) > np.cumsum(user_weights, 1)[:, None, :]).sum(-1)
    which = np.minimum(which, m - 1)
    clusters = np.take_along_axis(user_clusters, which, 1)
    ranks = np.minimum(np.searchsorted(rank_cdf, rng.random((num_users, L))), size - 1)
    items = cluster_items[clusters, ranks].reshape(-1)
    users = np.repeat(np.arange(num_users), L)
    pairs = np.unique(np.stack([users, items], 1), axis=0)
    data = Interactions(pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64), num_users, num_items,
                        name=f"planted{num_items // 1000}k")
    model = PlantedModel(num_items, num_clusters, cluster_items, item_cluster, item_rank, rank_prob,
                         user_clusters, user_weights)
    return data, model


def planted_scores(model: PlantedModel, users: np.ndarray) -> torch.Tensor:
    """[len(users), N] planted P(item | user) (the oracle ranking)."""
    out = torch.zeros(len(users), model.num_items)
    p_item = torch.from_numpy(model.rank_prob[model.item_rank]).float()  # P(item | its cluster)
    ic = torch.from_numpy(model.item_cluster)
    for j in range(model.user_clusters.shape[1]):
        c = torch.from_numpy(model.user_clusters[users, j])
        w = torch.from_numpy(model.user_weights[users, j]).float()
        out += (ic.unsqueeze(0) == c.unsqueeze(1)).float() * (w.unsqueeze(1) * p_item.unsqueeze(0))
    return out
