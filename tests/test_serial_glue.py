"""Serial glue (imi_softmax/_serial_glue.py, csrc/cpu/serial_glue.h): inside a training step the
small torch ops run on the calling thread alone while our kernels keep every thread. The switch is
per thread, nests, is always undone (errors included), never changes a result, and leaves samplers
made of torch ops (ExactSampler) on torch's threads."""
import threading

import pytest
import torch

from imi_softmax import ExactSampler, IMISoftmax, _loader
from imi_softmax import _serial_glue as sg

pytestmark = pytest.mark.skipif(_loader.USING_FALLBACK, reason="the switch lives in the compiled library")


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _kernel_threads() -> int:
    from imi_softmax import _C

    return _C._kernel_threads()


def test_switch_serializes_torch_but_not_the_kernels(two_threads):
    assert (torch.get_num_threads(), _kernel_threads()) == (2, 2)
    with sg.serial_glue():
        assert (torch.get_num_threads(), _kernel_threads()) == (1, 2)
        with sg.serial_glue():  # nested: still on, and the outer exit restores
            assert (torch.get_num_threads(), _kernel_threads()) == (1, 2)
        assert (torch.get_num_threads(), _kernel_threads()) == (1, 2)
        seen = []
        t = threading.Thread(target=lambda: seen.append((torch.get_num_threads(), _kernel_threads())))
        t.start()
        t.join()
        assert seen == [(2, 2)]  # another thread keeps its own counts
    assert (torch.get_num_threads(), _kernel_threads()) == (2, 2)


def test_switch_is_undone_when_the_step_raises(two_threads):
    head = IMISoftmax(8, 50, num_samples=4, num_codewords=4)
    x = torch.randn(3, 8)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN or Inf"):
        head(x, torch.tensor([1, 2, 3]))
    with pytest.raises(IndexError):
        head(torch.randn(3, 8), torch.tensor([1, 2, 99]))
    assert (torch.get_num_threads(), _kernel_threads()) == (2, 2)


def _step(sparse_grad: bool, glue_on: bool, monkeypatch):
    monkeypatch.setattr(sg, "_switch", sg._resolve_switch() if glue_on else None)
    torch.manual_seed(0)
    head = IMISoftmax(16, 3000, num_samples=40, num_codewords=8, sparse_grad=sparse_grad)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(97, 16, generator=g, requires_grad=True)
    y = torch.randint(0, 3000, (97,), generator=g)
    y[5] = -100  # an ignored row
    torch.manual_seed(2)
    loss = head(x, y)
    loss.backward()
    grad_w = head.weight.grad.to_dense() if sparse_grad else head.weight.grad
    grad_b = head.bias.grad.to_dense() if sparse_grad else head.bias.grad
    return loss.detach(), x.grad, grad_w, grad_b


@pytest.mark.parametrize("sparse_grad", [False, True])
def test_step_is_bit_equal_with_and_without_the_switch(two_threads, monkeypatch, sparse_grad):
    on = _step(sparse_grad, True, monkeypatch)
    off = _step(sparse_grad, False, monkeypatch)
    for a, b in zip(on, off):
        assert torch.equal(a, b)
    assert on[0].isfinite() and on[1].abs().sum() > 0


def test_only_kernel_bound_samplers_run_under_the_switch(two_threads):
    """MIDXSampler's call runs with torch on one thread; ExactSampler (all N classes scored by torch
    ops) keeps torch's two; both restore them afterwards."""
    seen = {}
    for name, sampler in (("midx", "midx"), ("exact", ExactSampler())):
        head = IMISoftmax(8, 200, num_samples=6, num_codewords=4, sampler=sampler)
        inner = head.sampler.sample_with_targets

        def spy(*args, _inner=inner, _name=name, **kwargs):
            seen[_name] = torch.get_num_threads()
            return _inner(*args, **kwargs)

        head.sampler.sample_with_targets = spy
        head(torch.randn(4, 8), torch.tensor([0, 1, 2, 3])).backward()
    assert seen == {"midx": 1, "exact": 2}
    assert torch.get_num_threads() == 2


def test_no_switch_without_the_compiled_library(monkeypatch):
    monkeypatch.setattr(_loader, "USING_FALLBACK", True)
    monkeypatch.setattr(sg, "_switch", sg._UNRESOLVED)
    assert sg._resolve_switch() is None
    before = torch.get_num_threads()
    with sg.serial_glue():  # a null context: torch keeps its threads
        assert torch.get_num_threads() == before

