"""imi_softmax.data.ClusteredBatchSampler: a permutation per epoch, clustered batches, seeds."""
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from imi_softmax.data import ClusteredBatchSampler


def blobs(num_blobs=10, per_blob=64, d=8, seed=0):
    """Well separated blobs: a clustered batch holds one blob, a random one holds many."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_blobs, d, generator=g) * 50
    labels = torch.arange(num_blobs).repeat_interleave(per_blob)
    x = centers[labels] + torch.randn(num_blobs * per_blob, d, generator=g)
    perm = torch.randperm(x.shape[0], generator=g)
    return x[perm], labels[perm]


@pytest.mark.parametrize("n,batch,drop_last", [(640, 64, False), (1000, 64, False), (1000, 64, True), (5, 8, False)])
def test_every_index_once_per_epoch_and_batch_sizes(n, batch, drop_last):
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(n))
    s = ClusteredBatchSampler(x, batch, random_fraction=0.25, drop_last=drop_last, seed=1)
    for epoch in range(3):
        s.set_epoch(epoch)
        batches = list(s)
        assert len(batches) == len(s)
        sizes = sorted(len(b) for b in batches)
        assert all(k == batch for k in sizes[1:]) and sizes[-1] == min(batch, n)
        flat = sorted(i for b in batches for i in b)
        if drop_last:
            assert len(flat) == (n // batch) * batch and len(set(flat)) == len(flat)
            assert all(0 <= i < n for i in flat)
        else:
            assert flat == list(range(n))


@pytest.mark.parametrize("fraction", [0.0, 0.3, 1.0])
def test_random_fraction_sets_the_number_of_mixed_batches(fraction):
    x, labels = blobs()
    s = ClusteredBatchSampler(x, 64, num_clusters=10, random_fraction=fraction, seed=0)
    batches = list(s)
    blobs_per_batch = [len(set(labels[b].tolist())) for b in batches]
    # a uniform batch of 64 from 10 blobs of 64 covers >= 6 blobs except with probability < 1e-9;
    # a clustered batch is a run of 64 in cluster order: 1 blob, or 2-3 where a cluster ends (the
    # random batches took ~19 rows of each)
    assert sum(k >= 6 for k in blobs_per_batch) == int(fraction * 10)
    assert all(k <= 3 for k in blobs_per_batch if k < 6)
    if fraction == 0.0:
        assert blobs_per_batch == [1] * 10


def test_same_seed_same_batches_and_epochs_differ():
    x, _ = blobs()
    a = ClusteredBatchSampler(x, 64, random_fraction=0.2, seed=3)
    b = ClusteredBatchSampler(x, 64, random_fraction=0.2, seed=3)
    assert list(a) == list(b)   # epoch 0 (both advance to 1)
    assert list(a) == list(b)   # epoch 1
    c = ClusteredBatchSampler(x, 64, random_fraction=0.2, seed=3)
    c.set_epoch(1)
    a.set_epoch(1)
    assert list(a) == list(c)
    a.set_epoch(2)
    assert list(a) != list(c)
    assert list(ClusteredBatchSampler(x, 64, random_fraction=0.2, seed=4)) != list(
        ClusteredBatchSampler(x, 64, random_fraction=0.2, seed=3))


def test_callable_embeddings_refresh_on_schedule_and_dataloader():
    x, labels = blobs()
    calls = []

    def embed():
        calls.append(1)
        return x

    s = ClusteredBatchSampler(embed, 64, num_clusters=10, refresh_every=2, seed=0)
    assert len(calls) == 1
    for epoch in range(5):
        s.set_epoch(epoch)
        list(s)
    assert len(calls) == 3  # construction, epochs 2 and 4
    loader = DataLoader(TensorDataset(torch.arange(x.shape[0]), labels), batch_sampler=s)
    seen = []
    for idx, lab in loader:
        assert len(set(lab.tolist())) == 1  # clustered: one blob per batch
        seen += idx.tolist()
    assert sorted(seen) == list(range(x.shape[0]))


def test_bad_input_raises_clear_errors():
    x = torch.randn(50, 4)
    with pytest.raises(ValueError, match="batch_size"):
        ClusteredBatchSampler(x, 0)
    with pytest.raises(ValueError, match="random_fraction"):
        ClusteredBatchSampler(x, 8, random_fraction=1.5)
    with pytest.raises(TypeError, match="random_fraction"):
        ClusteredBatchSampler(x, 8, random_fraction="half")
    with pytest.raises(ValueError, match="dimensions"):
        ClusteredBatchSampler(torch.randn(50), 8)
    with pytest.raises(TypeError, match="floating"):
        ClusteredBatchSampler(torch.arange(50).view(25, 2), 8)
    with pytest.raises(ValueError, match="NaN"):
        ClusteredBatchSampler(torch.full((50, 4), float("nan")), 8)
    with pytest.raises(ValueError, match="num_clusters"):
        ClusteredBatchSampler(x, 8, num_clusters=51)
    with pytest.raises(TypeError, match="embeddings"):
        ClusteredBatchSampler([[1.0, 2.0]], 8)
    rows = iter([x, x[:40]])
    s = ClusteredBatchSampler(lambda: next(rows), 8)
    with pytest.raises(ValueError, match="N = 50"):
        s.refresh()
