"""Eval over class chunks: the exact cross-entropy (and its gradients) and top-k without a [B, N]
tensor, against float64 F.cross_entropy / torch.topk."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from imi_softmax import IMISoftmax

N, D = 301, 8  # 301 is prime: no chunk size below it divides it
BF16_EPS = 2.0 ** -8


def make_head(bias=True, chunk=None, dtype=torch.float32, n=N, seed=0):
    torch.manual_seed(seed)
    head = IMISoftmax(D, n, bias=bias, num_samples=8, num_codewords=4, eval_chunk_size=chunk, dtype=dtype)
    with torch.no_grad():
        head.weight.mul_(3)  # logits of a few units: a softmax far from uniform
    return head.eval()


def reference(head, x, target, ignore_index=-100):
    """float64 F.cross_entropy(F.linear(x, W, b)) and its gradients (x, W, b)."""
    x64 = x.detach().double().requires_grad_()
    w64 = head.weight.detach().double().requires_grad_()
    b64 = None if head.bias is None else head.bias.detach().double().requires_grad_()
    loss = F.cross_entropy(F.linear(x64, w64, b64).reshape(-1, w64.shape[0]), target.reshape(-1),
                           ignore_index=ignore_index)
    loss.backward()
    return loss.detach(), x64.grad, w64.grad, None if b64 is None else b64.grad


def run(head, x, target):
    x = x.clone().requires_grad_()
    head.zero_grad(set_to_none=True)
    loss = head(x, target)
    loss.backward()
    return loss.detach(), x.grad, head.weight.grad, None if head.bias is None else head.bias.grad


def batch(shape=(37,), seed=1, n=N, ignore=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, D, generator=g)
    target = torch.randint(0, n, shape, generator=g)
    if ignore:
        flat = target.view(-1)
        flat[torch.randperm(flat.numel(), generator=g)[:ignore]] = -100
    return x, target


@pytest.mark.parametrize("chunk", [1, 7, 64, 300, 301, 1000, None])
@pytest.mark.parametrize("bias", [True, False])
def test_eval_loss_and_grads_match_float64_cross_entropy(chunk, bias):
    head = make_head(bias, chunk)
    x, target = batch(ignore=5)
    got = run(head, x, target)
    want = reference(head, x, target)
    assert got[0].dtype == torch.float32
    for name, a, b in zip(("loss", "x", "weight", "bias"), got, want):
        if b is None:
            assert a is None, name
            continue
        torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=2e-6, msg=name)


@pytest.mark.parametrize("chunk", [5, 64])
def test_float64_head_is_exact_to_float64_rounding(chunk):
    head = make_head(True, chunk, dtype=torch.float64)
    x, target = batch((4, 9), ignore=3)
    got = run(head, x.double(), target)
    want = reference(head, x.double(), target)
    for a, b in zip(got, want):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(3, 5), (2, 3, 4), ()])
def test_batch_shapes(shape):
    head = make_head(True, 13)
    x, target = batch(shape)
    got = run(head, x, target)
    want = reference(head, x, target)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=2e-6)


def test_empty_batch_and_all_ignored_give_nan_like_cross_entropy():
    head = make_head(True, 16)
    for x, target in [batch((0,)), batch((6,), ignore=6)]:
        got = run(head, x, target)
        want = reference(head, x, target)
        assert math.isnan(got[0]) and math.isnan(want[0])
        # F.cross_entropy's gradients here are 0 (no row contributes) or NaN (0/0): ours are 0
        for a, b in zip(got[1:], want[1:]):
            assert a.shape == b.shape and torch.equal(a, torch.zeros_like(a))
            assert torch.equal(b.nan_to_num(0.0), torch.zeros_like(b))


def test_no_grad_and_eval_without_target_are_unchanged():
    head = make_head(True, 10)
    x, target = batch()
    with torch.no_grad():
        loss = head(x, target)
    torch.testing.assert_close(loss.double(), reference(head, x, target)[0], rtol=2e-5, atol=2e-6)
    assert torch.equal(head(x), F.linear(x, head.weight, head.bias))  # head(x) stays the full logits


class _LargestOutput(TorchDispatchMode):
    """The largest number of elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_batch_by_classes_tensor_in_forward_backward_or_topk():
    n, rows, chunk = 2000, 64, 50  # [rows, n] = 128000 elements; the weight's gradient is n * D = 16000
    head = make_head(True, chunk, n=n)
    x, target = batch((rows,), n=n)
    x.requires_grad_()
    with _LargestOutput() as mode:
        head(x, target).backward()
        head.topk(x, 5)
    assert mode.largest <= max(n * D, rows * chunk) < rows * n


@pytest.mark.parametrize("chunk", [1, 4, 9, 300, 301, 5000, None])
@pytest.mark.parametrize("k", [1, 5, 10, N])
def test_topk_matches_torch_topk(chunk, k):
    head = make_head(True, chunk)
    x, _ = batch((3, 7))
    values, ids = head.topk(x, k)
    want_v, want_i = F.linear(x.double(), head.weight.double(), head.bias.double()).topk(k, dim=-1)
    assert values.shape == ids.shape == (3, 7, k)
    assert torch.equal(ids, want_i)  # continuous random logits: no ties
    torch.testing.assert_close(values.double(), want_v, rtol=1e-6, atol=1e-5)
    assert bool((values[..., 1:] <= values[..., :-1]).all())  # sorted, as torch.topk


def test_topk_chunk_argument_and_empty_batch():
    head = make_head(True, 16)
    x, _ = batch((5,))
    assert torch.equal(head.topk(x, 4, chunk_size=3)[1], head.topk(x, 4, chunk_size=1000)[1])
    v, i = head.topk(torch.empty(0, D), 3)
    assert v.shape == i.shape == (0, 3)


def test_autocast_bf16_eval_loss_and_grads():
    head = make_head(True, 17)
    head.train(False)
    x, target = batch((32,), ignore=2)
    x_low = x.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head(x_low, target)
        ref = F.cross_entropy(F.linear(x_low, head.weight, head.bias), target)
    assert loss.dtype == ref.dtype == torch.float32
    # the same bf16 logits, summed in another order
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    loss.backward()
    assert x_low.grad.dtype == torch.bfloat16 and head.weight.grad.dtype == torch.float32
    want = reference(head, x_low.detach().float(), target)
    scale = float((x.abs() @ head.weight.detach().abs().T + head.bias.detach().abs()).max())
    tol = 2 * 3 * BF16_EPS * scale  # bf16 rounding of x, W and the logits, relative to the logit scale
    assert abs(float(loss) - float(want[0])) <= tol
    torch.testing.assert_close(head.weight.grad.double(), want[2], atol=tol / x.shape[0], rtol=0)
    torch.testing.assert_close(x_low.grad.double(), want[1], atol=tol, rtol=0)


@pytest.mark.parametrize("bad, exc", [(0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError)])
def test_eval_chunk_size_validation(bad, exc):
    with pytest.raises(exc, match="eval_chunk_size"):
        IMISoftmax(D, N, eval_chunk_size=bad)
    head = IMISoftmax(D, N)
    with pytest.raises(exc, match="eval_chunk_size"):
        head.eval_chunk_size = bad
    with pytest.raises(exc, match="chunk_size"):
        head.topk(torch.randn(2, D), 3, chunk_size=bad)
