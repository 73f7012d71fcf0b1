"""Batches of queries that share a k-means cluster, so in-batch negatives are hard."""
from __future__ import annotations

import math
from typing import Callable, Iterator, List, Optional, Union

import torch
from torch import Tensor
from torch.utils.data import Sampler

from .._validation import check_finite, check_flag, check_positive_int, check_tensor
from ..kmeans import assign, kmeans

__all__ = ["ClusteredBatchSampler"]

Embeddings = Union[Tensor, Callable[[], Tensor]]


class ClusteredBatchSampler(Sampler[List[int]]):
    """A ``batch_sampler`` for :class:`torch.utils.data.DataLoader` whose batches group the
    examples by the k-means cluster of their query embeddings.

    Each epoch, a ``random_fraction`` of the batches are drawn uniformly at random (from a random
    subset of the examples); the remaining examples are ordered by cluster (clusters in a random
    order, examples in a random order within their cluster) and cut into consecutive batches, so a
    batch holds one cluster, or the end of one and the start of the next. The batch order is then
    shuffled. Every index in ``range(N)`` appears exactly once per epoch; all batches have
    ``batch_size`` indices except one smaller last batch (dropped with ``drop_last``).

    Args:
        embeddings: ``[N, d]`` float tensor of query embeddings, or a callable returning one (called
            at construction and again at each refresh, e.g. the current user tower over all users;
            N must not change).
        batch_size: indices per batch.
        num_clusters: k-means clusters (default ``max(1, N // batch_size)``: about one batch each).
        random_fraction: fraction of the batches (rounded down) that are uniform random batches,
            in [0, 1]; 0 = all clustered, 1 = plain shuffled batches.
        refresh_every: epochs between re-clusterings (1 = every epoch; 0 = only at construction
            and on :meth:`refresh`).
        drop_last: drop the smaller last batch.
        kmeans_iters: Lloyd iterations per clustering (warm-started from the previous centroids).
        seed: the same seed and epoch give the same batches.

    The epoch is the one given to :meth:`set_epoch` (as DistributedSampler); without calls to it,
    each full pass over the sampler advances it by one.
    """

    def __init__(self, embeddings: Embeddings, batch_size: int, *, num_clusters: Optional[int] = None,
                 random_fraction: float = 0.0, refresh_every: int = 1, drop_last: bool = False,
                 kmeans_iters: int = 10, seed: int = 0):
        if not (isinstance(embeddings, Tensor) or callable(embeddings)):
            raise TypeError(f"embeddings must be an [N, d] tensor or a callable returning one, got "
                            f"{type(embeddings).__name__}")
        self._source = embeddings
        self.batch_size = check_positive_int("batch_size", batch_size)
        if isinstance(random_fraction, bool) or not isinstance(random_fraction, (int, float)):
            raise TypeError(f"random_fraction must be a float in [0, 1], got {type(random_fraction).__name__}")
        if not (0.0 <= float(random_fraction) <= 1.0):
            raise ValueError(f"random_fraction must be in [0, 1] (the fraction of random batches), got {random_fraction}")
        self.random_fraction = float(random_fraction)
        self.refresh_every = check_positive_int("refresh_every", refresh_every, minimum=0)
        self.drop_last = check_flag("drop_last", drop_last)
        self.kmeans_iters = check_positive_int("kmeans_iters", kmeans_iters, minimum=0)
        self.seed = check_positive_int("seed", seed, minimum=0)
        emb = self._embeddings()
        self.num_items = emb.shape[0]
        k = max(1, self.num_items // self.batch_size) if num_clusters is None else num_clusters
        self.num_clusters = check_positive_int("num_clusters", k)
        if self.num_clusters > self.num_items:
            raise ValueError(f"num_clusters must be <= the number of examples N = {self.num_items}, got "
                             f"{self.num_clusters}")
        self.epoch = 0
        self._epoch_set = False
        self._centroids: Optional[Tensor] = None
        self._clusters_epoch = 0
        self.codes = self._cluster(emb, 0)

    def _embeddings(self) -> Tensor:
        emb = self._source() if callable(self._source) else self._source
        check_tensor("embeddings", emb, dims=(2,))
        if not emb.is_floating_point():
            raise TypeError(f"embeddings must be a floating tensor, got {emb.dtype}")
        if emb.shape[0] < 1:
            raise ValueError("embeddings must hold at least one row (got 0)")
        n = getattr(self, "num_items", None)
        if n is not None and emb.shape[0] != n:
            raise ValueError(f"embeddings must keep N = {n} rows across refreshes, got {emb.shape[0]}")
        emb = emb.detach()
        check_finite("embeddings", emb)
        return emb

    @torch.no_grad()
    def _cluster(self, emb: Tensor, epoch: int) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        x = emb.to(torch.float32).contiguous()
        init = None if self._centroids is None else self._centroids.to(x.device)
        self._centroids = kmeans(x, self.num_clusters, iters=self.kmeans_iters, init=init, generator=g)
        self._clusters_epoch = epoch
        return assign(x, self._centroids)[0].cpu()

    def refresh(self) -> None:
        """Re-cluster now from the current embeddings (the callable is called again)."""
        self.codes = self._cluster(self._embeddings(), self.epoch)

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` for the next pass (its batches depend only on the seed, the epoch and the
        clusters); re-clusters at the pass's start when a refresh is due."""
        self.epoch = check_positive_int("epoch", epoch, minimum=0)
        self._epoch_set = True

    def __len__(self) -> int:
        n, b = self.num_items, self.batch_size
        return n // b if self.drop_last else math.ceil(n / b)

    def _batches(self) -> List[Tensor]:
        n, b = self.num_items, self.batch_size
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        num_random = int(self.random_fraction * math.ceil(n / b) + 1e-9)
        perm = torch.randperm(n, generator=g)
        rand_part = perm[: num_random * b]
        rest = perm[num_random * b:]
        # clusters in a random order, examples in a random order inside their cluster (perm's order)
        rank = torch.randperm(self.num_clusters, generator=g)[self.codes[rest]]
        rest = rest[torch.sort(rank, stable=True).indices]
        batches = list(rand_part.split(b)) + list(rest.split(b))
        batches = [t for t in batches if t.numel() == b or (t.numel() > 0 and not self.drop_last)]
        order = torch.randperm(len(batches), generator=g).tolist()
        return [batches[i] for i in order]

    def __iter__(self) -> Iterator[List[int]]:
        if self.refresh_every > 0 and self.epoch - self._clusters_epoch >= self.refresh_every:
            self.refresh()
        batches = self._batches()
        for batch in batches:
            yield batch.tolist()
        if not self._epoch_set:
            self.epoch += 1
        self._epoch_set = False

    def __repr__(self) -> str:
        return (f"ClusteredBatchSampler(num_items={self.num_items}, batch_size={self.batch_size}, "
                f"num_clusters={self.num_clusters}, random_fraction={self.random_fraction}, "
                f"refresh_every={self.refresh_every}, drop_last={self.drop_last}, seed={self.seed})")
