"""Under torch.compile the Python argument checks return early (imi_softmax/_validation.py), so the
C++ ops are the last line: a compiled step with a bad target or sample id must raise an error that
names the id, never return garbage or read out of bounds (a segfault kills pytest: a failure too)."""
import pytest
import torch

import imi_softmax.functional as IF
from imi_softmax import IMISoftmax

N, D, B, M = 20, 6, 4, 5
BAD = (RuntimeError, IndexError)


def _loss_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, D, generator=g, requires_grad=True)
    w = torch.randn(N, D, generator=g, requires_grad=True)
    b = torch.randn(N, generator=g, requires_grad=True)
    target = torch.randint(0, N, (B,), generator=g)
    ids = torch.randint(0, N, (B, M), generator=g)
    log_q = torch.rand(B, M, generator=g) * -3 - 1
    tlq = torch.rand(B, generator=g) * -3 - 1
    return x, w, b, target, ids, log_q, tlq


def _compiled_loss():
    """A compiled training step: the compiled forward (one graph), then its compiled backward
    (AOT autograd). Dynamo cannot trace Tensor.backward() inside a fullgraph region."""
    loss_fn = torch.compile(IF.sampled_softmax_loss, backend="aot_eager", fullgraph=True)

    def step(x, w, b, target, ids, log_q, tlq):
        loss = loss_fn(x, w, b, target, ids, log_q, tlq)
        loss.backward()
        return loss.detach()

    return step


def test_compiled_loss_runs_on_valid_input():
    """The compiled function is the real thing: on valid input it gives the eager loss."""
    x, w, b, target, ids, log_q, tlq = _loss_inputs()
    want = IF.sampled_softmax_loss(x, w, b, target, ids, log_q, tlq)
    want_grads = torch.autograd.grad(want, (x, w, b))
    got = _compiled_loss()(x, w, b, target, ids, log_q, tlq)
    torch.testing.assert_close(got, want.detach())
    for p, g in zip((x, w, b), want_grads):
        torch.testing.assert_close(p.grad, g)


@pytest.mark.parametrize("bad", [N, 10**12, -5])
@pytest.mark.parametrize("where", ["target", "sample"])
def test_compiled_loss_raises_on_bad_ids(bad, where):
    x, w, b, target, ids, log_q, tlq = _loss_inputs()
    if where == "target":
        target[2] = bad
    else:
        ids[2, 3] = bad
    with pytest.raises(BAD, match=f"class id {bad} at \\["):  # the op's message (Python checks are off)
        _compiled_loss()(x, w, b, target, ids, log_q, tlq)


def _head():
    torch.manual_seed(0)
    head = IMISoftmax(D, N, num_samples=M, num_codewords=4, refresh_every=0)
    head.train()
    head.refresh_index()
    return head


def _compiled_step(head):
    forward = torch.compile(head, backend="aot_eager", fullgraph=True)

    def step(x, target):
        loss = forward(x, target)
        loss.backward()
        return loss.detach()

    return step


def test_compiled_training_step_runs_on_valid_input():
    head = _head()
    x = torch.randn(B, D)
    target = torch.randint(0, N, (B,))
    loss = _compiled_step(head)(x, target)
    assert loss.isfinite() and head.weight.grad is not None and head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("bad", [N, 10**12, -5])
def test_compiled_training_step_raises_on_bad_target(bad):
    head = _head()
    x = torch.randn(B, D)
    target = torch.randint(0, N, (B,))
    target[1] = bad
    with pytest.raises(BAD, match=f"class id {bad} at \\["):  # the op's message (Python checks are off)
        _compiled_step(head)(x, target)
    assert head.weight.grad is None  # nothing was applied
