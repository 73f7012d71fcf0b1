"""Double backward through our losses is an error wherever it is tried, never a silently wrong answer.

Their backward formulas use the forward's softmax coefficients as constants, so a gradient taken
with create_graph=True has no correct derivative. That gradient must (1) raise, naming the loss,
when it is differentiated, also when it is only one term of a larger objective (a gradient penalty
added to another loss, where a gradient without a graph would silently count as a constant);
(2) equal, value for value, the gradient taken without create_graph, also when the incoming gradient
itself requires grad (a nonlinear function of the loss), which the tie then includes. The sharded head's case runs in
tests/test_sharded.py (it needs a process group).
"""
import pytest
import torch

import imi_softmax
import imi_softmax.functional as IF
from imi_softmax import ops
from imi_softmax.chunked import chunked_cross_entropy, chunked_multilabel_loss
from conftest import make_loss_inputs

PAD = -100


def _multilabel_case():
    x, w, b, t, ids, lq, _ = make_loss_inputs()
    positives = torch.stack([t, (t + 1) % w.shape[0]], 1)
    positives[1, 1] = PAD  # a row with one positive
    tlq = torch.full(positives.shape, -2.0)
    return x, w, b, positives, ids, lq, tlq


def _sampled(sparse_grad=False):
    x, w, b, t, ids, lq, tlq = make_loss_inputs()
    return (x, w, b), IF.sampled_softmax_loss(x, w, b, t, ids, lq, tlq, sparse_grad=sparse_grad)


def _sampled_forward_op():
    """The inference op with autograd (the functional takes the training op when a gradient is needed)."""
    x, w, b, t, ids, lq, tlq = make_loss_inputs()
    rows, _ = ops.sampled_softmax_forward(x, w, b, torch.cat([t.unsqueeze(1), ids], 1),
                                          torch.cat([tlq.unsqueeze(1), lq.double()], 1), True, -1, False)
    return (x, w, b), rows.sum()


def _multilabel(reduction="mean"):
    x, w, b, positives, ids, lq, tlq = _multilabel_case()
    loss = IF.multilabel_sampled_softmax_loss(x, w, b, positives, ids, lq, tlq, ignore_index=PAD,
                                              reduction=reduction)
    return (x, w, b), loss.sum()


def _chunked_cross_entropy():
    x, w, b, t, *_ = make_loss_inputs()
    return (x, w, b), chunked_cross_entropy(x, w, b, t, chunk_size=16)


def _chunked_multilabel():
    x, w, b, positives, *_ = _multilabel_case()
    return (x, w, b), chunked_multilabel_loss(x, w, b, positives.clamp_min(-1), chunk_size=16)


def _head():
    torch.manual_seed(0)
    head = imi_softmax.IMISoftmax(5, 40, num_samples=7, num_codewords=2).double()
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(1)  # the same draws in every call of this case
    return (x, head.weight, head.bias), head(x, torch.arange(6))


CASES = {
    "sampled_softmax_loss": (_sampled, "sampled_softmax_loss"),
    "sampled_softmax_loss, sparse_grad": (lambda: _sampled(sparse_grad=True), "sampled_softmax_loss"),
    "sampled_softmax_forward op": (_sampled_forward_op, "sampled_softmax_loss"),
    "multi-label, mean": (_multilabel, "multi-label sampled softmax loss"),
    "multi-label, none": (lambda: _multilabel("none"), "multi-label sampled softmax loss"),
    "chunked_cross_entropy": (_chunked_cross_entropy, "chunked_cross_entropy"),
    "chunked_multilabel_loss": (_chunked_multilabel, "chunked_multilabel_loss"),
    "IMISoftmax": (_head, "sampled_softmax_loss"),
}


@pytest.mark.parametrize("case", CASES)
def test_differentiating_the_gradient_raises_naming_the_loss(case):
    make, name = CASES[case]
    (x, w, b), loss = make()
    gx, gw = torch.autograd.grad(loss, (x, w), create_graph=True)
    assert gx.requires_grad and gw.requires_grad
    with pytest.raises(RuntimeError, match=f"{name} does not support double backward"):
        torch.autograd.grad(gx.square().sum(), w)
    with pytest.raises(RuntimeError, match=f"{name} does not support double backward"):
        torch.autograd.grad(gw.sum(), x)


@pytest.mark.parametrize("case", CASES)
def test_a_gradient_penalty_is_never_silently_dropped(case):
    """The penalty is one term of the objective: with a gradient without a graph, backward() would
    run and leave out the penalty's terms."""
    make, name = CASES[case]
    (x, w, b), loss = make()
    (gx,) = torch.autograd.grad(loss, x, create_graph=True)
    objective = loss + 0.1 * gx.square().sum()
    with pytest.raises(RuntimeError, match=f"{name} does not support double backward"):
        objective.backward()


@pytest.mark.parametrize("case", CASES)
def test_first_derivatives_are_the_same_with_create_graph(case):
    make, _ = CASES[case]
    (x, w, b), loss = make()
    plain = torch.autograd.grad(loss, (x, w, b))
    (x, w, b), loss = make()
    graphed = torch.autograd.grad(loss, (x, w, b), create_graph=True)
    for p, g in zip(plain, graphed):
        assert p.is_sparse == g.is_sparse
        if p.is_sparse:
            p, g = p.to_dense(), g.to_dense()
        assert torch.equal(p, g.detach())


@pytest.mark.parametrize("case", CASES)
def test_an_upstream_gradient_that_requires_grad_is_tied_too(case):
    """grad_outputs v requiring grad (the loss went through a nonlinear function): the first
    derivatives come out as without create_graph; their derivative in v raises."""
    make, name = CASES[case]
    (x, w, b), loss = make()
    v = torch.full_like(loss, 0.5, requires_grad=True)
    (gx,) = torch.autograd.grad(loss, x, grad_outputs=v, create_graph=True)
    (x, w, b), loss = make()
    (plain,) = torch.autograd.grad(loss, x, grad_outputs=torch.full_like(loss, 0.5))
    assert torch.equal(gx.detach(), plain)
    with pytest.raises(RuntimeError, match=f"{name} does not support double backward"):
        torch.autograd.grad(gx.sum(), v)


def test_a_nonlinear_function_of_the_loss_keeps_first_derivatives_under_create_graph():
    """chunked_multilabel_loss feeds its S into log / exp: under create_graph its backward gets an
    incoming gradient that requires grad, and must still give first derivatives (equal to the
    plain ones), raising only when they are differentiated."""
    (x, w, b), loss = _chunked_multilabel()
    gx = torch.autograd.grad(loss.square(), x, create_graph=True)[0]
    (x, w, b), loss = _chunked_multilabel()
    assert torch.equal(gx.detach(), torch.autograd.grad(loss.square(), x)[0])
    with pytest.raises(RuntimeError, match="chunked_multilabel_loss does not support double backward"):
        gx.sum().backward()


def test_backward_with_create_graph_fills_grads_that_cannot_be_differentiated():
    """loss.backward(create_graph=True) (first derivatives only, e.g. for another part of a model)
    works and fills .grad; only differentiating those grads raises."""
    (x, w, b), loss = _head()
    with pytest.warns(UserWarning, match="create_graph=True"):  # torch's own warning about .grad cycles
        loss.backward(create_graph=True)
    assert w.grad is not None and x.grad is not None
    with pytest.raises(RuntimeError, match="does not support double backward"):
        w.grad.sum().backward()
