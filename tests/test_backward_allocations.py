"""The loss ops' backward fills no zero tensor for the outputs no gradient flows through (lse, and the
training ops' coef [B, M + 1] and grad_x [B, d]). Autograd materializes a zero gradient for every
unused output unless told not to; each such fill is a parallel region of torch's outside the step's
serial glue, which beside a busy process costs a wait on a descheduled thread (bench/core_targets.py
--busy 1). The gradients themselves are checked against float64 references elsewhere
(test_sampled_loss.py, test_multilabel.py); here the backward is compared with one that runs with
materialized zeros, so it must also stay exact."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import imi_softmax.functional as IF
from imi_softmax import _ops

N, D, M, B = 40, 6, 7, 5


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


def _zero_fills(names):
    return [n for n in names if n.split(".")[0] in ("zeros", "zeros_like", "zero_", "fill_", "new_zeros")]


def _case(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(N, D, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(N, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, N, (B, M), generator=g)
    log_q = torch.rand(B, M, generator=g, dtype=torch.float64) * -3 - 1
    return x, w, b, ids, log_q, g


def _single(reduction, sparse_grad):
    x, w, b, ids, log_q, g = _case()
    target = torch.randint(0, N, (B,), generator=g)
    target[2] = -100  # an ignored row
    tlq = torch.rand(B, generator=g, dtype=torch.float64) * -3 - 1
    loss = IF.sampled_softmax_loss(x, w, b, target, ids, log_q, tlq, reduction=reduction, sparse_grad=sparse_grad)
    return loss, (x, w, b)


def _multi(reduction, sparse_grad):
    x, w, b, ids, log_q, g = _case(1)
    target = torch.randint(0, N, (B, 3), generator=g)
    target[1, 1:] = -100
    target[3] = -100  # a row without positives
    tlq = torch.rand(B, 3, generator=g, dtype=torch.float64) * -3 - 1
    loss = IF.multilabel_sampled_softmax_loss(x, w, b, target, ids, log_q, tlq, reduction=reduction,
                                              sparse_grad=sparse_grad)
    return loss, (x, w, b)


def _backward(make, reduction, sparse_grad):
    loss, leaves = make(reduction, sparse_grad)
    with _RecordOps() as rec:
        loss.sum().backward()
    grads = [t.grad.to_dense() if t.grad.is_sparse else t.grad for t in leaves]
    return rec.names, grads


# (loss, reduction): "mean" runs the training ops (sampled_softmax_train, multilabel_softmax_train),
# the multi-label "none" the plain forward op with its own backward.
CASES = [(_single, "mean"), (_single, "none"), (_multi, "mean"), (_multi, "none")]


@pytest.mark.parametrize("sparse_grad", [False, True])
@pytest.mark.parametrize("make,reduction", CASES)
def test_backward_fills_no_zero_gradient(make, reduction, sparse_grad, monkeypatch):
    names, grads = _backward(make, reduction, sparse_grad)
    assert any(n.startswith(("sparse_weight_grad", "dense_weight_grad")) for n in names), names
    assert _zero_fills(names) == []

    # The same backward with the zero gradients materialized (autograd's default) fills them, and
    # gives bit-identical gradients.
    monkeypatch.setattr(_ops, "_mark_constant_outputs", lambda ctx, *outs: ctx.mark_non_differentiable(*outs))
    names_materialized, grads_materialized = _backward(make, reduction, sparse_grad)
    assert _zero_fills(names_materialized) != []
    for got, want in zip(grads, grads_materialized):
        assert torch.equal(got, want)
