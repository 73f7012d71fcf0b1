"""imi_softmax.metrics against hand-computed values (multi-label, propensity-scored, input checks)."""
import math

import pytest
import torch

from imi_softmax import metrics as M

L2_3 = 1 / math.log2(3)   # discount at rank 2
L2_5 = 1 / math.log2(5)   # rank 4
PAD = -100

# 6 classes; row 0 ranks 0,1,2,3,4,5 with labels {1, 3}; row 1 ranks 5,4,...,0 with label 5 written
# twice (a set: counts once); row 2 has no label.
SCORES = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4],
                       [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
                       [0.6, 0.5, 0.4, 0.3, 0.2, 0.1]])
PADDED = torch.tensor([[1, 3, PAD], [5, 5, PAD], [PAD, PAD, PAD]])
CSR = (torch.tensor([0, 2, 4, 4]), torch.tensor([3, 1, 5, 5]))
MASK = torch.zeros(3, 6, dtype=torch.bool)
MASK[0, [1, 3]] = True
MASK[1, 5] = True


def _same(a, b):
    return torch.allclose(a, b, equal_nan=True, rtol=0, atol=1e-12)


def test_precision_recall_ndcg_hand_computed():
    nan = float("nan")
    assert _same(M.precision_at_k(SCORES, PADDED, 2), torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))
    assert _same(M.recall_at_k(SCORES, PADDED, 2), torch.tensor([0.5, 1.0, nan], dtype=torch.float64))
    assert _same(M.ndcg_at_k(SCORES, PADDED, 2), torch.tensor([L2_3 / (1 + L2_3), 1.0, nan], dtype=torch.float64))
    # k = 4 > |labels| of every row: hits at ranks 2 and 4 for row 0, rank 1 for row 1
    assert _same(M.precision_at_k(SCORES, PADDED, 4), torch.tensor([0.5, 0.25, 0.0], dtype=torch.float64))
    assert _same(M.recall_at_k(SCORES, PADDED, 4), torch.tensor([1.0, 1.0, nan], dtype=torch.float64))
    assert M.ndcg_at_k(SCORES, PADDED, 4)[0].item() == pytest.approx((L2_3 + L2_5) / (1 + L2_3))
    assert M.ndcg_at_k(SCORES, PADDED, 4)[1].item() == pytest.approx(1.0)


def test_truncated_recall_and_k_above_catalogue():
    # plain recall 1/2 vs truncated 1 / min(1, 2) at k = 1 for row 0's hit at rank 2 -> 0 either way; k = 2 row 0:
    assert M.recall_at_k(SCORES, PADDED, 2, truncated=True)[0].item() == pytest.approx(0.5)
    assert M.recall_at_k(SCORES, PADDED, 1, truncated=True)[1].item() == pytest.approx(1.0)
    # k = 10 > N = 6: every class is ranked, precision still divides by k
    assert M.precision_at_k(SCORES, PADDED, 10)[0].item() == pytest.approx(0.2)
    assert M.recall_at_k(SCORES, PADDED, 10)[0].item() == pytest.approx(1.0)


def test_target_forms_agree():
    for k in (1, 2, 3, 6):
        for fn in (M.precision_at_k, M.recall_at_k, M.ndcg_at_k):
            ref = fn(SCORES, PADDED, k)
            assert _same(fn(SCORES, CSR, k), ref), (fn.__name__, k)
            assert _same(fn(SCORES, MASK, k), ref), (fn.__name__, k)
    single = torch.tensor([1, 5, PAD])  # [B] single-label form
    assert _same(M.precision_at_k(SCORES, single, 2), torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))


def test_ranked_ids_with_duplicates():
    ids = torch.tensor([[1, 1, 3, 0]])          # id 1 twice: the second copy is a miss
    t = torch.tensor([[1, 3]])
    assert M.precision_at_k(ids, t, 2).item() == pytest.approx(0.5)
    assert M.precision_at_k(ids, t, 3).item() == pytest.approx(2 / 3)
    assert M.ndcg_at_k(ids, t, 3).item() == pytest.approx((1 + 0.5) / (1 + L2_3))
    # the same ranking from scores gives the same values as from its ids
    assert _same(M.ndcg_at_k(SCORES, PADDED, 3), M.ndcg_at_k(SCORES.topk(3).indices, PADDED, 3))


def test_propensity_formula():
    counts = torch.tensor([0.0, 9.0, 99.0])
    p = M.propensity(counts, 100)
    c = (math.log(100) - 1) * 2.5 ** 0.55
    for j, n in enumerate((0, 9, 99)):
        assert p[j].item() == pytest.approx(1 / (1 + c * (n + 1.5) ** -0.55), rel=1e-12)
    assert p[0].item() == pytest.approx(0.17317, abs=1e-5)  # C = 3.6052 * 2.5^0.55 = 5.9675; 1 / (1 + C * 1.5^-0.55)
    assert bool((p[1:] > p[:-1]).all())          # frequent labels are more likely observed
    assert M.propensity(counts, 100, A=0.6, B=2.6)[2].item() == pytest.approx(
        1 / (1 + (math.log(100) - 1) * 3.6 ** 0.6 * 101.6 ** -0.6), rel=1e-12)


PROP = torch.tensor([0.5, 0.25, 1.0, 0.5, 1.0, 0.2], dtype=torch.float64)  # 1/p = 2, 4, 1, 2, 1, 5


def test_psp_psndcg_hand_computed():
    nan = float("nan")
    # row 0: rank 2 holds label 1 (1/p = 4); row 1: rank 1 holds label 5 (1/p = 5); row 2: no label
    assert _same(M.psp_at_k(SCORES, PADDED, 2, PROP), torch.tensor([2.0, 2.5, 0.0], dtype=torch.float64))
    assert _same(M.psndcg_at_k(SCORES, PADDED, 2, PROP),
                 torch.tensor([4 * L2_3 / (1 + L2_3), 5.0, nan], dtype=torch.float64))
    # normalized by the best ranking: row 0's labels by decreasing 1/p are 1 (4) then 3 (2)
    assert _same(M.psp_at_k(SCORES, PADDED, 2, PROP, normalize=True),
                 torch.tensor([2 / 3, 1.0, nan], dtype=torch.float64))
    assert _same(M.psndcg_at_k(SCORES, PADDED, 2, PROP, normalize=True),
                 torch.tensor([4 * L2_3 / (4 + 2 * L2_3), 1.0, nan], dtype=torch.float64))
    # with all propensities 1 they reduce to P@k and nDCG@k
    ones = torch.ones(6)
    assert _same(M.psp_at_k(SCORES, PADDED, 3, ones), M.precision_at_k(SCORES, PADDED, 3))
    assert _same(M.psndcg_at_k(SCORES, PADDED, 3, ones), M.ndcg_at_k(SCORES, PADDED, 3))


def test_evaluate_means():
    out = M.evaluate(SCORES, PADDED, ks=(2,), propensity=PROP)
    assert out["P@2"] == pytest.approx(1 / 3)                 # (0.5 + 0.5 + 0) / 3: the empty row counts
    assert out["R@2"] == pytest.approx(0.75)                  # (0.5 + 1) / 2: the empty row is skipped
    assert out["PSP@2"] == pytest.approx(1.5)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="non-decreasing"):
        M.precision_at_k(SCORES, (torch.tensor([0, 2, 1, 4]), torch.tensor([1, 3, 5, 5])), 2)
    with pytest.raises(ValueError, match=r"offsets\[-1\] = 3 must equal the number of labels \(4\)"):
        M.precision_at_k(SCORES, (torch.tensor([0, 2, 3, 3]), torch.tensor([1, 3, 5, 5])), 2)
    with pytest.raises(ValueError, match="B\\+1 = 4"):
        M.precision_at_k(SCORES, (torch.tensor([0, 2, 4]), torch.tensor([1, 3, 5, 5])), 2)
    with pytest.raises(ValueError, match="start at 0"):
        M.precision_at_k(SCORES, (torch.tensor([1, 2, 4, 4]), torch.tensor([1, 3, 5, 5])), 2)
    with pytest.raises(IndexError, match="id 6, outside \\[0, 6\\)"):
        M.precision_at_k(SCORES, torch.tensor([[1, 6], [5, PAD], [PAD, PAD]]), 2)
    with pytest.raises(IndexError, match="id 7, outside \\[0, 6\\)"):
        M.recall_at_k(SCORES, (torch.tensor([0, 2, 3, 3]), torch.tensor([1, 7, 5])), 2)
    with pytest.raises(IndexError, match="-1 < 0"):
        M.precision_at_k(SCORES, torch.tensor([[1, -1], [5, PAD], [PAD, PAD]]), 2)
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        M.precision_at_k(SCORES, PADDED, 0)
    with pytest.raises(TypeError, match="k must be an int"):
        M.ndcg_at_k(SCORES, PADDED, 2.0)
    with pytest.raises(ValueError, match="at least k ids"):
        M.precision_at_k(torch.tensor([[0, 1]]), torch.tensor([[1]]), 3)
    with pytest.raises(IndexError, match="outside \\[0, 6\\)"):
        M.psp_at_k(torch.tensor([[0, 9]]), torch.tensor([[1]]), 2, PROP)
    with pytest.raises(ValueError, match="B = 3"):
        M.precision_at_k(SCORES, PADDED[:2], 2)
    with pytest.raises(TypeError, match="dtype"):
        M.precision_at_k(SCORES, PADDED.float(), 2)
    with pytest.raises(ValueError, match="\\(0, 1\\]"):
        M.psp_at_k(SCORES, PADDED, 2, PROP * 10)
