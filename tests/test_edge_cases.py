"""Empty batches, zero negatives and all-ignored targets: defined results, like F.cross_entropy."""
import math

import pytest
import torch
import torch.nn.functional as F

import imi_softmax.functional as IF
from imi_softmax import ExactSampler, IMISoftmax, MIDXSampler, UniformSampler, UnigramSampler

SAMPLERS = ["midx", "uniform", "unigram", "exact"]
N, D = 60, 8


def make_head(sampler, num_samples=6, bias=True, sparse_grad=False):
    torch.manual_seed(0)
    counts = torch.arange(N, dtype=torch.float32) if sampler == "unigram" else None
    return IMISoftmax(D, N, bias=bias, num_samples=num_samples, num_codewords=4, sampler=sampler,
                      class_counts=counts, sparse_grad=sparse_grad)


def built_samplers():
    w = torch.randn(N, D)
    return [MIDXSampler(4).build(w, torch.randn(N)), MIDXSampler(4).build(w), UniformSampler(N),
            UnigramSampler(torch.arange(N, dtype=torch.float32)).build(w), ExactSampler().build(w, torch.randn(N))]


@pytest.mark.parametrize("b, m", [(0, 5), (3, 0), (0, 0)])
def test_every_sampler_draws_empty_shapes(b, m):
    for s in built_samplers():
        q = torch.randn(b, D)
        ids, log_q = s.sample(q, m)
        name = type(s).__name__
        assert ids.shape == (b, m) and ids.dtype == torch.int64, name
        assert log_q.shape == (b, m) and log_q.dtype == torch.float32, name
        lp = s.log_prob(q, torch.zeros(b, m, dtype=torch.int64))
        assert lp.shape == (b, m) and lp.dtype == torch.float32, name


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("sparse_grad", [False, True])
def test_empty_batch_is_nan_like_cross_entropy(sampler, sparse_grad):
    head = make_head(sampler, sparse_grad=sparse_grad).train()
    x = torch.randn(0, D, requires_grad=True)
    target = torch.empty(0, dtype=torch.int64)
    loss = head(x, target)
    ref = F.cross_entropy(F.linear(x, head.weight, head.bias), target)
    assert loss.shape == () and math.isnan(float(loss.detach())) and math.isnan(float(ref.detach()))
    loss.backward()
    assert x.grad.shape == (0, D)
    assert float(head.weight.grad.to_dense().abs().sum()) == 0.0  # nothing was touched
    head.eval()
    assert math.isnan(float(head(x, target).detach()))
    # any leading shape with zero rows
    assert math.isnan(float(head.train()(torch.randn(2, 0, D), torch.empty(2, 0, dtype=torch.int64)).detach()))


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("sparse_grad", [False, True])
def test_zero_negatives_is_the_loss_over_the_target_alone(sampler, bias, sparse_grad):
    """With M = 0 the softmax is over {target}: loss = log(exp(u0)) - u0 = 0, gradient 0."""
    head = make_head(sampler, num_samples=0, bias=bias, sparse_grad=sparse_grad).train()
    x = torch.randn(5, D, requires_grad=True)
    target = torch.tensor([1, 7, -100, 30, 59])
    loss = head(x, target)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert float(x.grad.abs().sum()) == 0.0
    assert float(head.weight.grad.to_dense().abs().sum()) == 0.0
    logits, ids = head.sampled_logits(x, target)
    assert logits.shape == (5, 1) and ids.shape == (5, 0)


def test_zero_negatives_in_the_functional_op():
    torch.manual_seed(0)
    x, w, b = torch.randn(4, D, dtype=torch.float64, requires_grad=True), torch.randn(N, D, dtype=torch.float64), torch.randn(N, dtype=torch.float64)
    t = torch.tensor([0, 5, 9, -100])
    ids, lq = torch.empty(4, 0, dtype=torch.int64), torch.empty(4, 0)
    rows = IF.sampled_softmax_loss(x, w, b, t, ids, lq, torch.randn(4), reduction="none")
    assert rows.shape == (4,) and float(rows.detach().abs().sum()) == 0.0
    empty = IF.sampled_softmax_loss(x[:0], w, b, t[:0], ids[:0], lq[:0], torch.randn(0))
    assert math.isnan(float(empty.detach()))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_all_ignored_targets_are_nan_like_cross_entropy(sampler):
    head = make_head(sampler).train()
    x = torch.randn(4, D, requires_grad=True)
    target = torch.full((4,), -100)
    loss = head(x, target)
    ref = F.cross_entropy(F.linear(x, head.weight, head.bias), target)
    assert math.isnan(float(loss.detach())) and math.isnan(float(ref.detach()))
    loss.backward()  # no error; nothing receives gradient from ignored rows
    assert float(head.weight.grad.to_dense().abs().sum()) == 0.0
    assert float(x.grad.abs().sum()) == 0.0
    assert float(head(x, target[:2].clone().fill_(3).repeat(2)).detach()) > 0  # sanity: real targets give a loss
