"""KL refinement of the MIDX codebooks: never raises KL on its own sample, keeps the index exact."""
import math

import pytest
import torch
from imi_softmax import IMISoftmax, MIDXSampler
from conftest import chi_square_p_value, reference_midx_log_q


def clustered_problem(n=400, d=8, seed=0, bias=True, device="cpu"):
    """Class vectors in a few blobs (like trained embeddings) and queries near the blobs, so the
    softmax is peaked and the k-means proposal is far from it."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(6, d, generator=g) * 2.0
    w = centers[torch.randint(0, 6, (n,), generator=g)] + 0.7 * torch.randn(n, d, generator=g)
    b = 0.5 * torch.randn(n, generator=g) if bias else None
    q = centers[torch.randint(0, 6, (96,), generator=g)] + 0.5 * torch.randn(96, d, generator=g)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(w), to(b), to(q)


def reference_kl(sampler, w, b, q):
    """Mean over queries of KL(P || Q) in float64, P from the logits, Q from the definition."""
    logits = q.double() @ w.double().T + (0 if b is None else b.double())
    log_p = torch.log_softmax(logits, 1)
    log_q = reference_midx_log_q(sampler, q)
    return float((log_p.exp() * (log_p - log_q)).sum(1).mean())


@pytest.mark.parametrize("quantizer", ["rq", "pq"])
@pytest.mark.parametrize("bias", [True, False])
def test_refinement_lowers_kl_on_its_sample(device, quantizer, bias):
    w, b, q = clustered_problem(bias=bias, device=device)
    s = MIDXSampler(num_codewords=5, quantizer=quantizer).build(w, b)
    before = reference_kl(s, w, b, q)
    stats = s.refine_codebooks(q, w, b, steps=60, lr=0.05)
    after = reference_kl(s, w, b, q)
    # the reported values are the exact KL of the index before and after (an independent reference)
    assert math.isclose(stats["kl_before"], before, rel_tol=1e-9, abs_tol=1e-9)
    assert math.isclose(stats["kl_after"], after, rel_tol=1e-9, abs_tol=1e-9)
    assert stats["improved"] and after < before - 1e-3 * before, (before, after)
    assert s.last_refine is stats


def test_refinement_never_increases_kl_even_when_adam_diverges():
    w, b, q = clustered_problem()
    s = MIDXSampler(num_codewords=5).build(w, b)
    c1, c2 = (c.clone() for c in s.codebooks)
    before = reference_kl(s, w, b, q)
    stats = s.refine_codebooks(q, w, b, steps=5, lr=1e4)  # absurd steps: every iterate is worse
    after = reference_kl(s, w, b, q)
    assert after <= before + 1e-12
    if not stats["improved"]:  # the k-means codebooks are kept bit for bit
        assert torch.equal(s.codebooks[0], c1) and torch.equal(s.codebooks[1], c2)
    s0 = MIDXSampler(num_codewords=5).build(w, b)
    stats0 = s0.refine_codebooks(q, w, b, steps=0)
    assert not stats0["improved"] and stats0["kl_after"] == stats0["kl_before"]


@pytest.mark.parametrize("quantizer", ["rq", "pq"])
def test_refined_index_stays_exact(device, quantizer):
    w, b, q = clustered_problem(device=device)
    s = MIDXSampler(num_codewords=5, quantizer=quantizer).build(w, b)
    cells = [t.clone() for t in (s.offsets, s.class_ids, s.code1, s.code2, s.log_n)]
    old = [c.clone() for c in s.codebooks]
    assert s.refine_codebooks(q, w, b, steps=40, lr=0.05)["improved"]
    assert not torch.equal(s.codebooks[0], old[0])
    # the assignment is kept: cells, codes and masses are the k-means ones
    for before, after in zip(cells, (s.offsets, s.class_ids, s.code1, s.code2, s.log_n)):
        assert torch.equal(before, after)
    n = w.shape[0]
    probe = q[:9]
    lp = s.log_prob(probe, torch.arange(n, device=device).expand(9, n))
    assert torch.logsumexp(lp.double(), 1).abs().max() < 1e-5
    torch.testing.assert_close(lp.double(), reference_midx_log_q(s, probe), atol=2e-5, rtol=0)
    ids, log_q = s.sample(probe, 64, generator=torch.Generator(device=device).manual_seed(0))
    torch.testing.assert_close(log_q, s.log_prob(probe, ids), atol=0, rtol=0)
    # draws follow the refined Q
    draws = 40000
    ids, _ = s.sample(probe[:1], draws, generator=torch.Generator(device=device).manual_seed(1))
    counts = torch.bincount(ids[0].cpu(), minlength=n)
    p_value, chi2, dof = chi_square_p_value(counts, lp[0].double().exp().cpu() * draws)
    assert p_value > 1e-4, f"chi2={chi2:.1f} dof={dof} p={p_value:.2e}"


def test_head_refines_after_full_rebuilds_and_checkpoints_the_reservoir():
    torch.manual_seed(0)
    w, b, q = clustered_problem(n=300)
    head = IMISoftmax(8, 300, num_samples=16, num_codewords=4, refresh_every=3, full_refresh_every=1,
                      kl_refine_steps=30, kl_refine_queries=64)
    with torch.no_grad():
        head.weight.copy_(w)
        head.bias.copy_(b)
    assert head.sampler.kl_refine_steps == 30
    t = torch.randint(0, 300, (40,))
    for _ in range(4):  # the first call builds (and refines on its own 40 rows), the 4th rebuilds
        head(q[:40], t).backward()
    stats = head.sampler.last_refine
    assert stats is not None and stats["kl_after"] <= stats["kl_before"]
    assert head._reservoir_fill == 64
    state = head.state_dict()
    other = IMISoftmax(8, 300, num_samples=16, num_codewords=4, refresh_every=3, full_refresh_every=1,
                       kl_refine_steps=30, kl_refine_queries=64)
    other.load_state_dict(state)
    assert torch.equal(other._reservoir, head._reservoir) and other._reservoir_pos == head._reservoir_pos
    small = IMISoftmax(8, 300, num_samples=16, num_codewords=4, kl_refine_steps=30, kl_refine_queries=32)
    with pytest.raises(ValueError, match="kl_refine_queries"):
        small.load_state_dict(state)
    # no refinement: no reservoir is kept
    plain = IMISoftmax(8, 300, num_samples=16, num_codewords=4)
    plain(q[:40], t)
    assert plain._reservoir is None


def test_bad_refinement_arguments_raise_clear_errors():
    w, b, q = clustered_problem()
    with pytest.raises(ValueError, match="kl_refine_steps"):
        IMISoftmax(8, 400, sampler="uniform", kl_refine_steps=10)
    with pytest.raises(ValueError, match="kl_refine_steps"):
        IMISoftmax(8, 400, kl_refine_steps=-1)
    with pytest.raises(ValueError, match="kl_refine_queries"):
        IMISoftmax(8, 400, kl_refine_steps=1, kl_refine_queries=0)
    with pytest.raises(ValueError, match="kl_refine_lr"):
        MIDXSampler(kl_refine_lr=0.0)
    s = MIDXSampler(num_codewords=5)
    with pytest.raises(RuntimeError, match="build"):
        s.refine_codebooks(q, w, b)
    s.build(w, b)
    with pytest.raises(ValueError, match="weight must be"):
        s.refine_codebooks(q, w[:10], b)
    with pytest.raises(ValueError, match="bias must be"):
        s.refine_codebooks(q, w, b[:10])
    with pytest.raises(ValueError, match="query must be"):
        s.refine_codebooks(q[:, :4], w, b)
    with pytest.raises(ValueError, match="NaN"):
        s.refine_codebooks(q.clone().fill_(float("nan")), w, b)
    with pytest.raises(ValueError, match="at least one row"):
        s.refine_codebooks(q[:0], w, b)
    with pytest.raises(ValueError, match="lr"):
        s.refine_codebooks(q, w, b, lr=-1.0)
    with pytest.raises(TypeError, match="steps"):
        s.refine_codebooks(q, w, b, steps=1.5)
