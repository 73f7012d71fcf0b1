"""IMISoftmax module behaviour: the nn.Linear contract, eval exactness, index refresh, compile."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from imi_softmax import IMISoftmax, MIDXSampler, UniformSampler, UnigramSampler
from conftest import compiled_and_eager_step, reference_loss


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
def test_training_step_grads_touch_only_target_and_sampled_rows(device, sampler, sparse_grad):
    """A training step's gradients equal the float64 formula of DESIGN.md on the same draws (the
    draws are replayed from the same global seed through the sampler), and every weight/bias row
    that is neither a target nor a sample gets exactly zero (or, sparse, is absent)."""
    kw = {"class_counts": torch.arange(100.0)} if sampler == "unigram" else {}
    head = make_head(sampler=sampler, sparse_grad=sparse_grad, refresh_every=0, **kw).to(device)
    head.refresh_index()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 8, generator=g).to(device).requires_grad_()
    y = torch.randint(0, 100, (12,), generator=g).to(device)
    y[4] = -100
    torch.manual_seed(7)
    loss = head(x, y)
    loss.backward()
    torch.manual_seed(7)
    ids, log_q = head.sampler.sample(x.detach(), head.num_samples)
    tlq = head.sampler.log_prob(x.detach(), y.clamp_min(0).unsqueeze(1)).squeeze(1)
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, head.weight, head.bias))
    rows = reference_loss(xr, wr, br, y, ids, log_q, tlq, remove_hits=True)
    ref = rows.sum() / (y != -100).sum()
    ref_gx, ref_gw, ref_gb = torch.autograd.grad(ref, (xr, wr, br))
    torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), ref_gx, atol=1e-5, rtol=1e-4)
    touched = torch.unique(torch.cat([y[y != -100], ids.flatten()]))
    assert head.weight.grad.is_sparse == sparse_grad and head.bias.grad.is_sparse == sparse_grad
    if sparse_grad:
        assert torch.equal(head.weight.grad.coalesce().indices()[0], touched)
        assert torch.equal(head.bias.grad.coalesce().indices()[0], touched)
    gw, gb = head.weight.grad.to_dense(), head.bias.grad.to_dense()
    untouched = torch.ones(100, dtype=torch.bool, device=device)
    untouched[touched] = False
    assert untouched.any() and (gw[untouched] == 0).all() and (gb[untouched] == 0).all()
    torch.testing.assert_close(gw.double(), ref_gw, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gb.double(), ref_gb, atol=1e-5, rtol=1e-4)
    assert ref_gw[touched].abs().sum(1).gt(0).any()  # the touched rows do carry gradient


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
    original, update = head.sampler.build, head.sampler.update
    monkeypatch.setattr(head.sampler, "build", lambda w, b=None: builds.append("full") or original(w, b))
    monkeypatch.setattr(head.sampler, "update", lambda *a: builds.append("inc") or update(*a))
    x, y = torch.randn(4, 8), torch.randint(0, 100, (4,))
    for _ in range(7):
        head(x, y)
    assert builds == ["full", "inc", "inc"]  # calls 0, 3, 6; incremental between full rebuilds
    head.eval()
    head(x, y)
    head(x)
    assert len(builds) == 3


def test_refresh_warm_starts_from_previous_codebooks():
    """With no Lloyd iterations a refresh returns its warm start unchanged, so the second refresh
    keeps the first's codebooks exactly; a cold rebuild (no previous codebooks) re-seeds them with
    k-means++ from the advanced generator and differs, so the equality is the warm start's doing."""
    head = make_head(refresh_every=0, kmeans_iters=0)
    head.refresh_index()
    first = tuple(c.clone() for c in head.sampler.codebooks)
    head.refresh_index()
    for a, b in zip(head.sampler.codebooks, first):
        assert torch.equal(a, b)
    head.sampler._index = None  # forget the previous index: the next build starts cold
    head.refresh_index()
    assert not torch.equal(head.sampler.codebooks[0], first[0])


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
    """The compiled step (no graph break) computes what the eager step computes on the same draws
    (same global seed): loss and gradients equal to fp32 rounding."""
    head = make_head(refresh_every=0)
    head.refresh_index()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 8, generator=g, requires_grad=True)
    y = torch.randint(0, 100, (16,), generator=g)

    compiled, (lc, *gc), (le, *ge) = compiled_and_eager_step(head, x, y, backend="aot_eager")
    torch.testing.assert_close(lc, le, atol=1e-6, rtol=1e-6)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    torch.manual_seed(6)
    assert not torch.equal(compiled(x, y), lc)  # and a new seed gives new draws under compile too


def test_training_step_prepares_each_query_once(monkeypatch):
    """The targets' log Q come out of the sampling op (one query preparation per row): a training
    step calls the MIDX sampling op once and never log_prob / midx_log_prob."""
    head = make_head()
    head.train()
    x, y = torch.randn(6, 8), torch.randint(0, 100, (6,))
    head.refresh_index()
    calls = []
    real_sample = MIDXSampler.sample_with_targets

    def counted(self, *a, **kw):
        calls.append(1)
        return real_sample(self, *a, **kw)

    def refuse(*a, **kw):
        raise AssertionError("the training step computed the targets' log Q in a second pass")

    monkeypatch.setattr(MIDXSampler, "sample_with_targets", counted)
    monkeypatch.setattr(MIDXSampler, "log_prob", refuse)
    loss = head(x, y)
    loss.backward()
    assert len(calls) == 1 and torch.isfinite(loss)
