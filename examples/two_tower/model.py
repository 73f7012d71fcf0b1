"""The two towers: the recommender example's user tower (leave-one-out pooling of the user's history)
and an item tower that maps item features to item vectors (no per-item id embedding, so every
optimizer step moves every item's vector: the cache goes stale)."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from ..recommender.model import UserEncoder


class ItemEncoder(nn.Module):
    """features [N, F] (a fixed buffer) -> item vectors: ``forward(ids [U]) -> [U, d]``."""

    def __init__(self, features: Tensor, dim: int = 64, hidden: int = 256):
        super().__init__()
        self.register_buffer("features", features.float())
        self.mlp = nn.Sequential(nn.Linear(features.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, dim))

    @property
    def num_items(self) -> int:
        return self.features.shape[0]

    def forward(self, ids: Tensor) -> Tensor:
        return self.mlp(self.features[ids])

    @torch.no_grad()
    def encode_all(self, chunk: int = 65536) -> Tensor:
        """[N, d] vectors of the whole catalogue (cache refreshes, evaluation and KL probes only)."""
        return torch.cat([self.mlp(self.features[s:s + chunk]) for s in range(0, self.num_items, chunk)])


class TwoTower(nn.Module):
    def __init__(self, features: Tensor, dim: int = 64, user_hidden: int = 128, item_hidden: int = 256):
        super().__init__()
        self.user = UserEncoder(features.shape[0], dim, user_hidden)
        self.item = ItemEncoder(features, dim, item_hidden)
