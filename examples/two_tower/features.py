"""Content-like item features derived from the TRAINING interactions only.

Why not MovieLens genres/titles: the shared ml10m.npz / ml100k.npz are the fastvae repository's
preprocessed matrices (8,939 of ML-10M's 10,677 movies, ids re-indexed 0..N-1); that repository ships
only the matrices, no map back to MovieLens movie ids, so no genre or title table can be joined to
them honestly. Instead each item gets

    f_i = [ (1 / sqrt(n_i)) * sum_{u trained on i} r_u ,  z(log(1 + n_i)) ]     ([F + 1] float32)

where r_u ~ N(0, I_F) is a fixed random vector per user (seeded), n_i the item's training count and z()
standardizes over items: a random projection of the item's training-user set (a sketch of its
co-occurrence column, like a bag of hashed user buckets) plus its popularity. Held-out interactions
never enter the features.
"""
from __future__ import annotations

import numpy as np


def item_features(train_indptr: np.ndarray, train_indices: np.ndarray, num_items: int, dim: int = 64,
                  seed: int = 0) -> np.ndarray:
    """[num_items, dim + 1] float32 features from the per-user CSR training lists (see module doc)."""
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    num_users = len(train_indptr) - 1
    r = np.random.default_rng(seed).standard_normal((num_users, dim)).astype(np.float32)
    owner = np.repeat(np.arange(num_users), np.diff(train_indptr))
    proj = np.zeros((num_items, dim), dtype=np.float64)
    np.add.at(proj, train_indices, r[owner])
    counts = np.bincount(train_indices, minlength=num_items).astype(np.float64)
    proj /= np.sqrt(np.maximum(counts, 1.0))[:, None]
    pop = np.log1p(counts)
    pop = (pop - pop.mean()) / max(pop.std(), 1e-12)
    return np.concatenate([proj, pop[:, None]], axis=1).astype(np.float32)
