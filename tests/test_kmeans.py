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


def test_empty_clusters_are_reseeded_not_nan():
    x = torch.zeros(10, 3)
    c = kmeans(x, 8, iters=3)
    assert torch.isfinite(c).all()
    c = kmeans(torch.randn(3, 3), 8, iters=3)  # fewer points than clusters
    assert torch.isfinite(c).all()


def test_subsample_cap_and_warm_start():
    x = torch.randn(5000, 4)
    c0 = kmeans(x, 4, iters=5, max_points_per_centroid=32, generator=torch.Generator().manual_seed(0))
    c1 = kmeans(x, 4, iters=0, init=c0)
    torch.testing.assert_close(c0, c1)
