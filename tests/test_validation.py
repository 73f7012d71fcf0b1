"""Bad input raises a clear Python error naming the argument, before any kernel runs."""
import pytest
import torch

import imi_softmax.functional as IF
from imi_softmax import IMISoftmax, MIDXSampler, UniformSampler, UnigramSampler


@pytest.fixture
def head():
    torch.manual_seed(0)
    return IMISoftmax(8, 50, num_samples=4, num_codewords=4)


@pytest.mark.parametrize(
    "kwargs, exc, word",
    [
        (dict(num_samples=-1), ValueError, "num_samples"),
        (dict(num_codewords=0), ValueError, "num_codewords"),
        (dict(num_samples=2.5), TypeError, "num_samples"),
        (dict(sampler="bogus"), ValueError, "sampler"),
        (dict(quantizer="xq"), ValueError, "quantizer"),
        (dict(sampler="unigram"), ValueError, "class_counts"),
        (dict(refresh_every=-1), ValueError, "refresh_every"),
    ],
)
def test_bad_constructor_arguments(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        IMISoftmax(8, 50, **kwargs)


def test_pq_needs_even_features():
    with pytest.raises(ValueError, match="even"):
        IMISoftmax(7, 50, quantizer="pq")
    with pytest.raises(ValueError, match="even"):
        MIDXSampler(4, "pq").build(torch.randn(10, 7))


def test_bad_forward_inputs(head):
    y = torch.randint(0, 50, (3,))
    with pytest.raises(ValueError, match=r"x must be \[\*, 8\]"):
        head(torch.randn(3, 7), y)
    with pytest.raises(TypeError, match="dtype"):
        head(torch.randn(3, 8, dtype=torch.float64), y)
    with pytest.raises(TypeError, match="x must"):
        head(torch.randint(0, 3, (3, 8)), y)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        head([[0.0] * 8], y)
    with pytest.raises(ValueError, match="target must have shape"):
        head(torch.randn(3, 8), torch.randint(0, 50, (4,)))
    with pytest.raises(TypeError, match="int64"):
        head(torch.randn(3, 8), y.to(torch.int32))
    with pytest.raises(IndexError, match="50"):
        head(torch.randn(3, 8), torch.tensor([1, 50, 2]))
    with pytest.raises(IndexError, match="-3"):
        head(torch.randn(3, 8), torch.tensor([1, -3, 2]))
    with pytest.raises(ValueError, match="NaN"):
        head(torch.randn(3, 8).index_fill_(0, torch.tensor([1]), float("nan")), y)
    assert torch.isfinite(head(torch.randn(3, 8), torch.tensor([1, -100, 2])))


def test_bad_functional_inputs():
    x, w, b = torch.randn(3, 4), torch.randn(10, 4), torch.randn(10)
    t, ids, lq, tlq = torch.tensor([1, 2, 3]), torch.randint(0, 10, (3, 5)), torch.zeros(3, 5), torch.zeros(3)
    with pytest.raises(IndexError, match="sample_ids"):
        IF.sampled_softmax_loss(x, w, b, t, ids.clone().fill_(10), lq, tlq)
    with pytest.raises(ValueError, match="sample_log_q"):
        IF.sampled_softmax_loss(x, w, b, t, ids, torch.zeros(3, 4), tlq)
    with pytest.raises(ValueError, match="bias"):
        IF.sampled_softmax_loss(x, w, torch.randn(9), t, ids, lq, tlq)
    with pytest.raises(ValueError, match="reduction"):
        IF.sampled_softmax_loss(x, w, b, t, ids, lq, tlq, reduction="avg")
    with pytest.raises(ValueError, match="device"):
        IF.sampled_softmax_loss(x, w, b, t, ids, lq, tlq.to("meta"))


def test_bad_sampler_inputs():
    s = MIDXSampler(4).build(torch.randn(20, 6))
    with pytest.raises(ValueError, match="num_samples"):
        s.sample(torch.randn(2, 6), -1)
    with pytest.raises(ValueError, match=r"query must be \[B, 6\]"):
        s.sample(torch.randn(2, 5), 3)
    with pytest.raises(IndexError, match="ids"):
        s.log_prob(torch.randn(2, 6), torch.tensor([[0, 20]]).expand(2, 2))
    with pytest.raises(ValueError, match="NaN"):
        MIDXSampler(4).build(torch.full((5, 3), float("nan")))
    with pytest.raises(RuntimeError, match="build"):
        MIDXSampler(4).sample(torch.randn(2, 6), 3)
    with pytest.raises(ValueError, match="num_codewords"):
        MIDXSampler(0)
    with pytest.raises(ValueError, match="num_classes"):
        UniformSampler(0)
    with pytest.raises(ValueError, match="non-negative"):
        UnigramSampler(torch.tensor([1.0, -1.0]))


def test_direct_op_calls_are_checked():
    from imi_softmax import ops
    with pytest.raises(RuntimeError, match="out of range"):
        ops.build_cells(torch.tensor([0, 5], dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32), None, 4)
    with pytest.raises(RuntimeError, match="num_classes"):
        ops.dense_weight_grad(torch.ones(1, 2), torch.tensor([[0, 9]]), torch.ones(1, 3), 5)
    for op in (ops.dense_weight_grad, ops.sparse_weight_grad):
        with pytest.raises(RuntimeError, match="num_classes must be >= 0, got -1"):
            op(torch.ones(1, 2), torch.tensor([[0, 1]]), torch.ones(1, 3), -1)
        with pytest.raises(RuntimeError, match="coef dtype must be the accumulation dtype"):
            op(torch.ones(1, 2, dtype=torch.float64), torch.tensor([[0, 1]]), torch.ones(1, 3), 5)


def test_sampler_names_a_non_finite_query():
    """The query's finiteness is checked from its scores (one check for both codebooks): a NaN or Inf
    query still gets an error naming the query, before any draw."""
    s = MIDXSampler(4).build(torch.randn(60, 8, generator=torch.Generator().manual_seed(0)))
    for bad in (float("nan"), float("inf")):
        q = torch.randn(3, 8)
        q[1, 5] = bad
        with pytest.raises(ValueError, match="query contains NaN or Inf"):
            s.sample(q, 4)
        with pytest.raises(ValueError, match="query contains NaN or Inf"):
            s.log_prob(q, torch.zeros(3, 2, dtype=torch.long))
        with pytest.raises(ValueError, match="query contains NaN or Inf"):
            s.sample_with_targets(q, 4, torch.zeros(3, 1, dtype=torch.long))
    # finite query, overflowing scores: named as the overflow, on the op's check too
    with pytest.raises(ValueError, match="scores.*overflows float32"):
        s.sample(torch.full((2, 8), 3e38), 4)
    with pytest.raises(ValueError, match="scores.*overflows float32"):
        s.log_prob(torch.full((2, 8), 3e38), torch.zeros(2, 1, dtype=torch.long))
