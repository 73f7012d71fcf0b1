"""Ranking metrics of examples/recommender/metrics.py against hand-computed values."""
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples.recommender.metrics import (mask_scores, ndcg_at_k, ndcg_from_hits, random_recall_at_k,  # noqa: E402
                                          recall_at_k, recall_from_hits, topk_hits)

L2_3 = 1 / math.log2(3)   # discount at rank 2
L2_4 = 1 / math.log2(4)   # rank 3 (= 0.5)
L2_5 = 1 / math.log2(5)   # rank 4

SCORES = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5],
                       [0.1, 0.2, 0.3, 0.4, 0.5],
                       [0.5, 0.4, 0.3, 0.2, 0.1]])
HELD = torch.tensor([[0, 1, 0, 1, 0],
                     [0, 0, 0, 0, 1],
                     [0, 0, 0, 0, 0]], dtype=torch.bool)


def test_recall_hand_computed():
    # user 0: ranking 0,1,2,3,4, held {1,3}; user 1: ranking 4,3,2,1,0, held {4}; user 2: none held
    r2 = recall_at_k(SCORES, HELD, 2)
    assert r2[0].item() == pytest.approx(0.5)          # 1 hit / min(2, 2)
    assert r2[1].item() == pytest.approx(1.0)          # 1 hit / min(2, 1)
    assert math.isnan(r2[2].item())                    # no held-out item: undefined
    r4 = recall_at_k(SCORES, HELD, 4)
    assert r4[0].item() == pytest.approx(1.0)          # 2 hits / min(4, 2)
    r1 = recall_at_k(SCORES, HELD, 1)
    assert r1[0].item() == pytest.approx(0.0) and r1[1].item() == pytest.approx(1.0)


def test_ndcg_hand_computed():
    n2 = ndcg_at_k(SCORES, HELD, 2)
    assert n2[0].item() == pytest.approx(L2_3 / (1 + L2_3))             # hit at rank 2 of 2 relevant
    assert n2[1].item() == pytest.approx(1.0)                           # hit at rank 1, 1 relevant
    n4 = ndcg_at_k(SCORES, HELD, 4)
    assert n4[0].item() == pytest.approx((L2_3 + L2_5) / (1 + L2_3))    # hits at ranks 2 and 4
    assert n4[0].item() == pytest.approx(0.650921, abs=1e-6)
    assert math.isnan(n4[2].item())


def test_masking_training_items():
    train = torch.tensor([[1, 0, 0, 0, 0]], dtype=torch.bool)  # the top item was seen in training
    s = mask_scores(SCORES[:1], train)
    assert s[0, 0] == float("-inf")
    # ranking now 1,2,3,4: held {1,3} at ranks 1 and 3
    assert recall_at_k(s, HELD[:1], 2).item() == pytest.approx(0.5)
    assert ndcg_at_k(s, HELD[:1], 3).item() == pytest.approx((1 + L2_4) / (1 + L2_3))


def test_perfect_and_worst_rankings():
    held = torch.zeros(2, 100, dtype=torch.bool)
    held[0, [3, 7, 11]] = True
    held[1, :30] = True
    perfect = held.float() + 0.001 * torch.rand(2, 100)
    assert torch.allclose(recall_at_k(perfect, held, 20), torch.ones(2, dtype=torch.float64))
    assert torch.allclose(ndcg_at_k(perfect, held, 50), torch.ones(2, dtype=torch.float64))
    worst = -perfect
    assert recall_at_k(worst, held, 20)[0].item() == 0.0
    assert ndcg_at_k(worst, held, 10)[1].item() == 0.0


def test_numpy_inputs_and_hits_functions():
    hits = topk_hits(SCORES.numpy(), HELD.numpy(), 3)
    assert hits.tolist() == [[False, True, False], [True, False, False], [False, False, False]]
    n = HELD.sum(1)
    assert torch.allclose(recall_from_hits(hits, n, 3)[:2], torch.tensor([0.5, 1.0], dtype=torch.float64))
    assert ndcg_from_hits(hits, n, 3)[0].item() == pytest.approx(L2_3 / (1 + L2_3))


def test_k_larger_than_catalogue():
    assert recall_at_k(SCORES, HELD, 10)[0].item() == pytest.approx(1.0)


def test_random_recall_matches_simulation():
    assert random_recall_at_k(20, torch.tensor([1, 30]), torch.tensor([100, 100])).tolist() == pytest.approx([0.2, 0.3])
    g = torch.Generator().manual_seed(0)
    held = torch.zeros(4000, 200, dtype=torch.bool)
    held[:, :5] = True
    r = recall_at_k(torch.rand(4000, 200, generator=g), held, 20).mean().item()
    expected = random_recall_at_k(20, torch.tensor([5]), torch.tensor([200])).item()  # 0.1
    se = math.sqrt(expected * (1 - expected) / (4000 * 5))  # hits are ~binomial; 5 sigma
    assert abs(r - expected) < 5 * se + 1e-3


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="differ"):
        recall_at_k(SCORES, HELD[:, :4], 2)
