"""k-means pieces against brute-force references."""
import torch

from imi_softmax.kmeans import assign, kmeans


def test_assign_matches_brute_force(device):
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(500, 7, generator=g, dtype=dtype).to(device)
        c = torch.randn(13, 7, generator=g, dtype=dtype).to(device)
        codes, sqdist = assign(x, c)
        ref = torch.cdist(x.double(), c.double()) ** 2
        assert torch.equal(codes, ref.argmin(1))
        torch.testing.assert_close(sqdist.double(), ref.min(1).values, atol=1e-4, rtol=1e-4)


def test_kmeans_recovers_separated_clusters():
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(5, 4, generator=g) * 20
    x = centers.repeat_interleave(100, 0) + torch.randn(500, 4, generator=g) * 0.1
    c = kmeans(x, 5, iters=20, generator=torch.Generator().manual_seed(2))
    # every true centre has a centroid within the noise scale
    assert (torch.cdist(centers, c).min(1).values < 1.0).all()


def test_empty_clusters_are_reseeded_on_training_rows():
    """An empty cluster is re-seeded on a training row: never NaN, and every centroid is one of the
    rows (all rows equal -> all centroids equal them; fewer rows than clusters -> duplicates)."""
    x = torch.full((10, 3), 2.5)
    c = kmeans(x, 8, iters=3)
    assert torch.equal(c, torch.full((8, 3), 2.5))
    x = torch.randn(3, 3, generator=torch.Generator().manual_seed(4))
    c = kmeans(x, 8, iters=3, generator=torch.Generator().manual_seed(5))
    assert torch.isfinite(c).all()
    assert (torch.cdist(c.double(), x.double()).min(1).values < 1e-6).all()


def _lloyd_step(x, init):
    """One Lloyd iteration in float64 by brute force (every cluster must stay non-empty)."""
    codes = torch.cdist(x.double(), init.double()).argmin(1)
    counts = torch.bincount(codes, minlength=init.shape[0])
    assert (counts > 0).all()
    sums = torch.zeros(init.shape, dtype=torch.float64).index_add_(0, codes, x.double())
    return sums / counts.unsqueeze(1)


def test_subsample_cap_and_warm_start():
    """Above max_points_per_centroid * K rows, Lloyd runs on a subsample of exactly that many rows
    drawn by randperm from the generator, starting from init: one step equals the float64 step on
    that subsample, and not the step on all rows."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5000, 4, generator=g)
    x[:2500] += 3.0  # two blobs, so the subsample's means differ visibly from the full data's
    init = torch.randn(4, 4, generator=g)
    got = kmeans(x, 4, iters=1, init=init, max_points_per_centroid=32, generator=torch.Generator().manual_seed(9))
    sub = x[torch.randperm(5000, generator=torch.Generator().manual_seed(9))[:4 * 32]]
    torch.testing.assert_close(got.double(), _lloyd_step(sub, init), atol=1e-5, rtol=1e-5)
    full = _lloyd_step(x, init)
    assert (got.double() - full).abs().max() > 100 * 1e-5
    # warm start with no iterations returns the start, on the full data or a subsample
    for cap in (32, 10_000):
        torch.testing.assert_close(kmeans(x, 4, iters=0, init=init, max_points_per_centroid=cap), init, atol=0, rtol=0)


def test_assign_in_row_blocks_matches_float64_and_any_thread_count():
    """The CPU op computes its dots one block of 1,024 rows at a time (the blocks claimed by the
    threads as they come): rows on both sides of block edges and in the short last block get the
    float64 nearest codeword, and 1 or 2 threads give the same bits."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2 * 1024 + 77, 24, generator=g)
    c = torch.randn(37, 24, generator=g)
    d64 = torch.cdist(x.double(), c.double()).pow(2)
    want_codes = d64.argmin(1)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(assign(x, c))
    finally:
        torch.set_num_threads(before)
    (codes1, dist1), (codes2, dist2) = results
    assert torch.equal(codes1, codes2) and torch.equal(dist1, dist2)
    assert torch.equal(codes1, want_codes)
    torch.testing.assert_close(dist1.double(), d64.min(1).values, rtol=1e-4, atol=1e-4)
