"""Smoke tests of examples/multilabel (ML "predict all held-out items"): the training batches and a
tiny run on ml100k (skips without ../shared/data)."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples.multilabel.run import main, training_batch  # noqa: E402
from examples.recommender.data import Interactions, default_npz_path, make_split  # noqa: E402


def test_training_batch_splits_each_history_into_bag_and_labels():
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(4), [1, 2, 10, 30])
    items = np.concatenate([[0], [1, 2], np.arange(10), np.arange(30) + 5])
    split = make_split(Interactions(users, items, 4, 40), test_frac=0.0)
    hist, offsets, counts, positives = training_batch(split, np.arange(4), rng, 0.2, 4)
    assert positives.shape[0] == 3  # the user with one item is skipped
    lens = (positives >= 0).sum(1).tolist()
    assert lens == [1, 2, 4]  # round(0.2 n), at least 1, at most max_labels = 4
    for r, u in enumerate([1, 2, 3]):
        bag = set(hist[offsets[r]:offsets[r] + counts[r]].tolist())
        labels = set(positives[r][positives[r] >= 0].tolist())
        own = set(split.train_indices[split.train_indptr[u]:split.train_indptr[u + 1]].tolist())
        assert not bag & labels and bag | labels == own


@pytest.mark.skipif(not default_npz_path("ml100k").is_file(), reason="../shared/data/ml100k.npz not present")
def test_tiny_run_writes_results(tmp_path):
    rows = main(["--data", "ml100k", "--epochs", "1", "--max-steps", "2", "--eval-users", "50",
                 "--num-samples", "32", "--num-codewords", "4", "--out", str(tmp_path / "r")])
    assert [r["head"] for r in rows] == ["full", "uniform", "midx"]
    for r in rows:
        for k in ("P@5", "P@10", "nDCG@5", "nDCG@10"):
            assert 0.0 <= r[k] <= 1.0
        assert np.isfinite(r["final loss"])
    assert (tmp_path / "r.md").is_file() and (tmp_path / "r.csv").is_file()
