"""IMISoftmax module behaviour: the nn.Linear contract, eval exactness, index refresh, compile."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from imi_softmax import IMISoftmax, MIDXSampler, UniformSampler, UnigramSampler


def make_head(**kw):
    torch.manual_seed(0)
    kw.setdefault("num_samples", 16)
    kw.setdefault("num_codewords", 4)
    return IMISoftmax(8, 100, **kw)


def test_full_logits_equal_linear(device):
    head = make_head().to(device)
    x = torch.randn(3, 5, 8, device=device)
    torch.testing.assert_close(head(x), F.linear(x, head.weight, head.bias), atol=0, rtol=0)


def test_eval_equals_cross_entropy(device):
    head = make_head().to(device).eval()
    x = torch.randn(2, 6, 8, device=device)
    y = torch.randint(0, 100, (2, 6), device=device)
    y[0, 1] = -100
    ref = F.cross_entropy(F.linear(x, head.weight, head.bias).reshape(-1, 100), y.reshape(-1))
    torch.testing.assert_close(head(x, y), ref, atol=0, rtol=0)


@pytest.mark.parametrize("sampler", ["midx", "uniform", "unigram", "exact"])
@pytest.mark.parametrize("sparse_grad", [False, True])
def test_training_step_gives_finite_loss_and_grads(device, sampler, sparse_grad):
    kw = {"class_counts": torch.arange(100.0)} if sampler == "unigram" else {}
    head = make_head(sampler=sampler, sparse_grad=sparse_grad, **kw).to(device)
    x = torch.randn(12, 8, device=device, requires_grad=True)
    y = torch.randint(0, 100, (12,), device=device)
    loss = head(x, y)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(x.grad).all()
    assert head.weight.grad.is_sparse == sparse_grad
    grad = head.weight.grad.to_dense() if sparse_grad else head.weight.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # only the target and sampled rows receive gradient
    logits, ids = head.sampled_logits(x.detach(), y)
    assert logits.shape == (12, 17) and ids.shape == (12, 16)


def test_sampled_logits_match_the_fused_loss():
    head = make_head()
    x, y = torch.randn(10, 8), torch.randint(0, 100, (10,))
    logits, _ = head.sampled_logits(x, y, generator=torch.Generator().manual_seed(5))
    via_logits = (torch.logsumexp(logits.double(), 1) - logits[:, 0].double()).mean()
    # same draws through the fused op
    from imi_softmax.functional import sampled_softmax_loss
    flat_x, flat_t, ids, lq, tlq = head._draw(x, y, torch.Generator().manual_seed(5))
    fused = sampled_softmax_loss(flat_x, head.weight, head.bias, flat_t, ids, lq, tlq)
    torch.testing.assert_close(fused.double(), via_logits, atol=1e-5, rtol=1e-5)


def test_state_dict_round_trip_with_linear():
    lin = nn.Linear(8, 100)
    head = IMISoftmax.from_linear(lin, num_samples=8, num_codewords=4)
    assert set(IMISoftmax.linear_state_dict(head.state_dict())) == set(lin.state_dict()) == {"weight", "bias"}
    torch.testing.assert_close(head.weight, lin.weight)
    other = nn.Linear(8, 100)
    other.load_state_dict(IMISoftmax.linear_state_dict(head.state_dict()))
    head2 = make_head()
    head2.train()
    head2(torch.randn(4, 8), torch.randint(0, 100, (4,)))  # builds an index
    head2.load_state_dict(lin.state_dict())
    assert head2._index_stale  # rebuilt from the loaded weights on next use
    x = torch.randn(4, 8)
    torch.testing.assert_close(head2(x), lin(x))
    nobias = IMISoftmax.from_linear(nn.Linear(8, 100, bias=False))
    assert nobias.bias is None and set(IMISoftmax.linear_state_dict(nobias.state_dict())) == {"weight"}


def test_refresh_every_counts_training_forwards(monkeypatch):
    head = make_head(refresh_every=3)
    builds = []
    original = head.sampler.build
    monkeypatch.setattr(head.sampler, "build", lambda w, b=None: builds.append(1) or original(w, b))
    x, y = torch.randn(4, 8), torch.randint(0, 100, (4,))
    for _ in range(7):
        head(x, y)
    assert len(builds) == 3  # calls 0, 3, 6
    head.eval()
    head(x, y)
    head(x)
    assert len(builds) == 3


def test_refresh_warm_starts_from_previous_codebooks():
    head = make_head(refresh_every=0)
    head.refresh_index()
    c1 = head.sampler.codebooks[0].clone()
    head.refresh_index()  # same weights: Lloyd from a converged start barely moves
    assert (head.sampler.codebooks[0] - c1).abs().max() < 0.5


def test_topk_matches_full_logits():
    head = make_head()
    x = torch.randn(2, 3, 8)
    v, i = head.topk(x, 5, chunk_size=7)
    rv, ri = F.linear(x, head.weight, head.bias).topk(5, dim=-1)
    torch.testing.assert_close(v, rv)
    assert torch.equal(i, ri)


def test_extra_repr_and_samplers_exposed():
    head = make_head(quantizer="pq")
    r = repr(head)
    assert "num_classes=100" in r and "pq" in r
    assert isinstance(head.sampler, MIDXSampler)
    assert isinstance(make_head(sampler=UniformSampler(100)).sampler, UniformSampler)
    assert isinstance(make_head(sampler="unigram", class_counts=torch.ones(100)).sampler, UnigramSampler)


def test_dtype_and_device_kwargs():
    head = IMISoftmax(8, 50, dtype=torch.float64, device="cpu", num_codewords=4, num_samples=4)
    assert head.weight.dtype == torch.float64 and head.bias.dtype == torch.float64
    loss = head(torch.randn(3, 8, dtype=torch.float64), torch.tensor([1, 2, 3]))
    assert loss.dtype == torch.float64


def test_compiled_training_step_fullgraph():
    head = make_head()
    head.refresh_index()
    x = torch.randn(16, 8, requires_grad=True)
    y = torch.randint(0, 100, (16,))

    def step(x, y):
        return head(x, y)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(x, y)
    loss.backward()
    assert torch.isfinite(loss) and head.weight.grad.abs().sum() > 0
    eager = step(x, y)
    assert abs(eager.item() - loss.item()) < 3.0  # different draws, same scale
