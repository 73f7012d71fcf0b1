"""k-means for the codebooks: warm-started, fitted on a subsample, empty clusters re-seeded."""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._ops import ops


def assign(x: Tensor, centroids: Tensor) -> Tuple[Tensor, Tensor]:
    """Nearest centroid of each row. x [N, d], centroids [K, d] -> (codes [N] int64, sqdist [N])."""
    return ops.assign_codewords(x, centroids)


def assign_residual(x: Tensor, first: Tensor, first_codes: Tensor, centroids: Tensor,
                    chunk: int = 65536, dtype: torch.dtype = torch.int64) -> Tensor:
    """Codes of the residuals x - first[first_codes] against centroids, without materializing the
    whole [N, d] residual (chunks of rows). Returns codes [N] of ``dtype`` (the MIDX index keeps
    int32 codes: asking for them here spares a whole int64 copy)."""
    n = x.shape[0]
    codes = torch.empty(n, dtype=dtype, device=x.device)
    # One residual buffer for every chunk: a fresh [chunk, d] tensor per chunk costs page faults.
    # It has the centroids' dtype, so bf16/fp16 rows are widened one chunk at a time.
    buf = x.new_empty((min(chunk, n), x.shape[1]), dtype=first.dtype)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        res = buf[: stop - start]
        torch.index_select(first, 0, first_codes[start:stop], out=res)
        torch.sub(x[start:stop], res, out=res)
        codes[start:stop] = ops.assign_codewords(res, centroids)[0]
    return codes


def assign_chunked(x: Tensor, centroids: Tensor, chunk: int = 65536, dtype: torch.dtype = torch.int64) -> Tensor:
    """Codes of the rows of x [N, d] (any float dtype) against float32 centroids, widening one
    chunk of rows at a time: no float32 copy of a bf16/fp16 x. Returns codes [N] of ``dtype``."""
    n = x.shape[0]
    codes = torch.empty(n, dtype=dtype, device=x.device)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        codes[start:stop] = ops.assign_codewords(x[start:stop].to(centroids.dtype), centroids)[0]
    return codes


def kmeans_plus_plus(x: Tensor, num_clusters: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): each new centroid is a row drawn with
    probability proportional to its squared distance to the nearest centroid so far."""
    n = x.shape[0]
    first = int(torch.randint(0, n, (1,), generator=generator))
    centroids = x.new_empty((num_clusters, x.shape[1]))
    centroids[0] = x[first]
    nearest = (x - x[first]).pow(2).sum(1)
    for k in range(1, num_clusters):
        total = float(nearest.sum())
        if total <= 0:  # every row already coincides with a centroid: duplicates are all we have
            idx = int(torch.randint(0, n, (1,), generator=generator))
        else:
            idx = int(torch.multinomial(nearest.cpu().double(), 1, generator=generator))
        centroids[k] = x[idx]
        nearest = torch.minimum(nearest, (x - x[idx]).pow(2).sum(1))
    return centroids


def kmeans(
    x: Tensor,
    num_clusters: int,
    *,
    iters: int = 10,
    init: Optional[Tensor] = None,
    max_points_per_centroid: int = 256,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Lloyd's k-means on at most ``max_points_per_centroid * num_clusters`` rows of x (as FAISS).

    x: [N, d] float. init: [num_clusters, d] centroids to warm-start from (e.g. the previous index).
    Returns centroids [num_clusters, d]. A cluster that ends up empty is re-seeded on a random
    training row, so centroids never become NaN (with fewer rows than clusters some stay duplicates).
    """
    n, d = x.shape
    cap = max_points_per_centroid * num_clusters
    if n > cap:
        x = x[torch.randperm(n, generator=generator, device="cpu")[:cap].to(x.device)]
        n = cap
    if init is not None and tuple(init.shape) == (num_clusters, d):
        centroids = init.to(device=x.device, dtype=x.dtype).clone()
    else:
        centroids = kmeans_plus_plus(x, num_clusters, generator)
    for _ in range(iters):
        codes, _ = assign(x, centroids)
        counts = torch.bincount(codes, minlength=num_clusters)
        # one-hot GEMM: far faster than index_add_ on CPU for k-means-sized inputs
        sums = F.one_hot(codes, num_clusters).T.to(x.dtype) @ x
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled].unsqueeze(1).to(x.dtype)
        empty = (~filled).nonzero().flatten()
        if empty.numel() > 0:
            reseed = torch.randint(0, n, (empty.numel(),), generator=generator, device="cpu").to(x.device)
            centroids[empty] = x[reseed]
    return centroids
