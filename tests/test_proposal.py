"""MIDX proposal: normalisation, exactness of sampling, log_q consistency, reproducibility."""
import math
import os
import subprocess
import sys

import pytest
import torch
from imi_softmax import MIDXSampler
from conftest import chi_square_p_value, cpu_simd_levels, reference_midx_log_q


def make_sampler(n=300, d=8, k=6, quantizer="rq", bias=True, seed=0, device="cpu", scale=1.0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, d, generator=g) * scale).to(device)
    b = (torch.randn(n, generator=g) * scale).to(device) if bias else None
    return MIDXSampler(num_codewords=k, quantizer=quantizer).build(w, b), w, b


@pytest.mark.parametrize("quantizer", ["rq", "pq"])
@pytest.mark.parametrize("bias", [True, False])
def test_log_prob_normalizes_and_matches_reference(device, quantizer, bias):
    s, _, _ = make_sampler(quantizer=quantizer, bias=bias, device=device)
    q = torch.randn(5, 8, generator=torch.Generator().manual_seed(1)).to(device)
    all_ids = torch.arange(300, device=device).expand(5, 300)
    lp = s.log_prob(q, all_ids)
    assert lp.dtype == torch.float32 and lp.shape == (5, 300)
    assert torch.logsumexp(lp.double(), 1).abs().max() < 1e-5
    ref = reference_midx_log_q(s, q)
    torch.testing.assert_close(lp.double(), ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize("quantizer", ["rq", "pq"])
@pytest.mark.parametrize("bias", [True, False])
def test_sample_frequencies_match_log_prob(device, quantizer, bias, cpu_draw_passes):
    """Chi-square goodness of fit of the empirical frequencies against exp(log_prob), on a k-means
    index (every CPU draw-pass level; K = 64 / 100 and random indexes: test_sampling_law.py)."""
    if device.type != "cpu" and cpu_draw_passes != "auto":
        pytest.skip("IMI_CPU_SIMD only selects between CPU draw passes")
    s, _, _ = make_sampler(n=120, quantizer=quantizer, bias=bias, device=device)
    q = torch.randn(3, 8, generator=torch.Generator().manual_seed(2)).to(device)
    draws = 60000
    ids, _ = s.sample(q, draws, generator=torch.Generator(device=device).manual_seed(3))
    p = s.log_prob(q, torch.arange(120, device=device).expand(3, 120)).double().exp().cpu()
    for row in range(3):
        counts = torch.bincount(ids[row].cpu(), minlength=120)
        p_value, chi2, dof = chi_square_p_value(counts, p[row] * draws)
        assert p_value > 1e-4, f"row {row}: chi2={chi2:.1f} dof={dof} p={p_value:.2e}"
    # zero-mass classes and empty cells: test_sampling_law.py::test_empty_and_zero_mass_cells_are_never_drawn


@pytest.mark.parametrize("quantizer", ["rq", "pq"])
def test_sample_log_q_equals_log_prob(device, quantizer):
    s, _, _ = make_sampler(quantizer=quantizer, device=device)
    q = torch.randn(7, 8, generator=torch.Generator().manual_seed(4)).to(device)
    ids, log_q = s.sample(q, 50)
    assert ids.shape == (7, 50) and ids.dtype == torch.int64 and log_q.dtype == torch.float32
    assert ids.min() >= 0 and ids.max() < 300
    torch.testing.assert_close(log_q, s.log_prob(q, ids), atol=0, rtol=0)


def test_same_seed_same_samples_and_consecutive_calls_differ(device):
    s, _, _ = make_sampler(device=device)
    q = torch.randn(4, 8).to(device)
    a, la = s.sample(q, 30, generator=torch.Generator(device=device).manual_seed(7))
    b, lb = s.sample(q, 30, generator=torch.Generator(device=device).manual_seed(7))
    assert torch.equal(a, b) and torch.equal(la, lb)
    g = torch.Generator(device=device).manual_seed(7)
    c, _ = s.sample(q, 30, generator=g)
    d, _ = s.sample(q, 30, generator=g)
    assert not torch.equal(c, d)
    torch.manual_seed(11)
    e, _ = s.sample(q, 30)
    torch.manual_seed(11)
    f, _ = s.sample(q, 30)
    assert torch.equal(e, f)


def test_fewer_classes_than_cells_has_empty_cells(device):
    """10 classes in 8 x 8 cells: the cells hold exactly the classes of their brute-force codes
    (nearest first codeword, then nearest second codeword of the residual), in ascending class
    order; log Q still sums to one and the draws follow it."""
    s, w, _ = make_sampler(n=10, k=8, device=device)
    c1, c2 = (c.double().cpu() for c in s.codebooks)
    wd = w.double().cpu()
    a1 = torch.cdist(wd, c1).argmin(1)
    a2 = torch.cdist(wd - c1[a1], c2).argmin(1)
    cell = a1 * 8 + a2
    assert torch.equal(s.cell_counts().cpu().flatten(), torch.bincount(cell, minlength=64))
    offsets, class_ids = s.offsets.cpu(), s.class_ids.cpu()
    for c in range(64):
        members = class_ids[offsets[c]:offsets[c + 1]]
        assert torch.equal(members, (cell == c).nonzero().flatten()), f"cell {c}"
    q = torch.randn(3, 8, generator=torch.Generator().manual_seed(5)).to(device)
    lp = s.log_prob(q, torch.arange(10, device=device).expand(3, 10))
    assert torch.logsumexp(lp.double(), 1).abs().max() < 1e-5
    torch.testing.assert_close(lp.double(), reference_midx_log_q(s, q), atol=2e-5, rtol=0)
    draws = 20000
    ids, log_q = s.sample(q, draws, generator=torch.Generator(device=device).manual_seed(6))
    torch.testing.assert_close(log_q, s.log_prob(q, ids), atol=0, rtol=0)
    for row in range(3):
        counts = torch.bincount(ids[row].cpu(), minlength=10)
        p_value, chi2, dof = chi_square_p_value(counts, lp[row].double().exp().cpu() * draws)
        assert p_value > 1e-4, f"row {row}: chi2={chi2:.1f} dof={dof} p={p_value:.2e}"


def test_single_class(device):
    s = MIDXSampler(num_codewords=4).build(torch.randn(1, 6).to(device), torch.randn(1).to(device))
    q = torch.randn(2, 6).to(device)
    ids, log_q = s.sample(q, 20)
    assert (ids == 0).all()
    assert log_q.abs().max() < 1e-6


@pytest.mark.parametrize("k,scale", [(64, 1.0), (23, 3.0), (64, 12.0)])
def test_log_prob_matches_reference_many_codewords(device, k, scale):
    """K*K cells with many empty ones, rows of every magnitude (scale 12 underflows the scaled row
    masses and takes the exact log-space path): log Q still matches the float64 reference and sums
    to one; draws only land on classes with mass."""
    s, _, _ = make_sampler(n=4000, d=16, k=k, scale=scale, device=device)
    q = (torch.randn(6, 16, generator=torch.Generator().manual_seed(3)) * scale).to(device)
    lp = s.log_prob(q, torch.arange(4000, device=device).expand(6, 4000))
    ref = reference_midx_log_q(s, q)
    s1, s2 = s.scores(q)
    magnitude = (s1.abs().max(1).values + s2.abs().max(1).values + s.beta.abs().max()).double().cpu()
    tol = torch.clamp(32 * torch.finfo(torch.float32).eps * magnitude, min=2e-5)  # fp32 rounding of scores
    keep = ref > -30  # classes with non-negligible mass
    err = ((lp.double() - ref).abs() * keep).amax(1).cpu()
    assert (err <= tol).all(), f"max |log Q - ref| {err.tolist()} > {tol.tolist()}"
    assert (torch.logsumexp(lp.double(), 1).abs().cpu() <= tol).all()
    ids, log_q = s.sample(q, 300)
    assert (ref.gather(1, ids) > -30).all()
    torch.testing.assert_close(log_q, s.log_prob(q, ids), atol=0, rtol=0)


def test_identical_class_vectors(device):
    w = torch.ones(50, 4).to(device)
    s = MIDXSampler(num_codewords=5).build(w)
    assert torch.isfinite(s.codebooks[0]).all() and torch.isfinite(s.codebooks[1]).all()
    q = torch.randn(2, 4).to(device)
    lp = s.log_prob(q, torch.arange(50, device=device).expand(2, 50))
    torch.testing.assert_close(lp, torch.full_like(lp, -math.log(50)), atol=1e-5, rtol=0)


def test_large_magnitude_scores_do_not_overflow(device):
    s, _, _ = make_sampler(scale=300.0, device=device)
    q = (torch.randn(4, 8) * 300.0).to(device)
    lp = s.log_prob(q, torch.arange(300, device=device).expand(4, 300))
    assert torch.isfinite(lp.max(1).values).all()
    # float32 carries ~eps * |score| absolute error at these magnitudes (scores ~1e5 here)
    s1, s2 = s.scores(q)
    magnitude = (s1.abs().max(1).values + s2.abs().max(1).values + s.beta.abs().max()).double().cpu()
    tol = 32 * torch.finfo(torch.float32).eps * magnitude
    assert (torch.logsumexp(lp.double(), 1).abs().cpu() <= tol).all()
    ids, log_q = s.sample(q, 100)
    assert torch.isfinite(log_q).all()
    ref = reference_midx_log_q(s, q)
    # the sampled ids must be among the classes the exact proposal gives real mass to
    assert (ref.gather(1, ids) > -30).all()


def _seeded_with(monkeypatch, level, args):
    monkeypatch.setenv("IMI_CPU_SIMD", level)
    return torch.ops.imi_softmax.midx_sample_seeded(*args)


@pytest.mark.parametrize("level", ["avx512", "avx2"])
@pytest.mark.parametrize("k,n,m,bias,scale", [(6, 300, 37, True, 1.0), (16, 5000, 64, False, 3.0),
                                              (64, 20000, 250, True, 2.0), (23, 4000, 16, True, 8.0),
                                              (100, 30000, 48, True, 2.0), (64, 20000, 7, False, 1.0),
                                              (33, 8000, 24, True, 1.0)])
def test_vector_draw_passes_equal_portable_passes(monkeypatch, level, k, n, m, bias, scale):
    """The vectorized CPU passes (stage 2: AVX-512 64 and 16 draws at a time, AVX2 32 and 8, tails included)
    compute the same draws as the portable ones that call the shared header bodies: same (seed,
    offset) -> identical ids and log Q, biased cells (alias path) and not. The offset makes the
    64-bit draw counter carry into its high word inside the first vector. Stage 1 reads its CDF from
    registers for K <= 64 (K = 6, 16, 23, 33, 64: different halving lengths) and gathers above
    (K = 100); M = 7 is all tail."""
    if level not in cpu_simd_levels():
        pytest.skip(f"the {level} draw passes need a CPU with {level}")
    s, _, _ = make_sampler(n=n, d=16, k=k, bias=bias, scale=scale)
    g = torch.Generator().manual_seed(5)
    s1, s2 = s.scores(torch.randn(9, 16, generator=g) * scale)
    for offset in (4 * (2**32 - 5), 4 * (2**32 - 13), 0):
        args = (s1, s2, s.log_n, s.cell_mass, s.log_n_max, s.offsets, s.class_ids, s.alias_prob, s.alias_pos,
                s.beta_csr, m, 1234, offset)
        simd = _seeded_with(monkeypatch, level, args)
        portable = _seeded_with(monkeypatch, "portable", args)
        assert torch.equal(simd[0], portable[0])
        assert torch.equal(simd[1], portable[1])
    assert s.num_classes > 0 and portable[0].unique().numel() > 1


@pytest.mark.parametrize("level", ["avx512", "avx2"])
def test_vector_draw_passes_equal_portable_passes_on_nan_scores(monkeypatch, level):
    """NaN query scores (only reachable through the ops) take the same path at every level: the
    halving compares as the scalar `>` does (a NaN entry moves the search), so the draws, or the
    error, are the portable passes' ones."""
    if level not in cpu_simd_levels():
        pytest.skip(f"the {level} draw passes need a CPU with {level}")
    s, _, _ = make_sampler(n=3000, d=16, k=16, bias=True)
    s1, s2 = s.scores(torch.randn(4, 16, generator=torch.Generator().manual_seed(6)))
    s1[1, 3] = float("nan")
    s2[2] = float("nan")
    args = (s1, s2, s.log_n, s.cell_mass, s.log_n_max, s.offsets, s.class_ids, s.alias_prob, s.alias_pos,
            s.beta_csr, 40, 99, 0)
    outcomes = []
    for lv in (level, "portable"):
        try:
            outcomes.append(_seeded_with(monkeypatch, lv, args)[:2])
        except RuntimeError as e:
            outcomes.append(str(e))
    if isinstance(outcomes[0], str) or isinstance(outcomes[1], str):
        assert outcomes[0] == outcomes[1]
    else:
        assert torch.equal(outcomes[0][0], outcomes[1][0])
        torch.testing.assert_close(outcomes[0][1], outcomes[1][1], atol=0, rtol=0, equal_nan=True)


_SIMD_PROBE = """
import torch
from imi_softmax import MIDXSampler
g = torch.Generator().manual_seed(0)
s = MIDXSampler(num_codewords=8).build(torch.randn(500, 8, generator=g), torch.randn(500, generator=g))
q = torch.randn(3, 8, generator=g)
for _ in range(3):
    ids, _ = s.sample(q, 20, generator=torch.Generator().manual_seed(1))
print(ids.sum().item())
"""


@pytest.mark.parametrize("value", ["sse9", "portable", "0", "avx2", "avx512", "auto", "1"])
def test_imi_cpu_simd_values(value):
    """IMI_CPU_SIMD takes auto (or 1), portable (or 0), avx2, avx512; anything else, or a level the
    CPU lacks, warns once per process and runs the widest passes the CPU has (never an illegal
    instruction). Every level draws the same samples. Fresh processes: the warning (torch's warning
    log on stderr) is once per process."""
    warns = value not in {"portable", "0", "auto", "1"} and value not in cpu_simd_levels()
    results = {}
    for v in (value, "portable"):
        run = subprocess.run([sys.executable, "-c", _SIMD_PROBE], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "IMI_CPU_SIMD": v})
        assert run.returncode == 0, run.stderr[-2000:]
        results[v] = (run.stdout.strip(), run.stderr.count("IMI_CPU_SIMD"))
    assert results[value][1] == (1 if warns else 0), results
    assert results[value][0] == results["portable"][0]
