"""The law of the MIDX draws (DESIGN invariant 2) on any device, at every K regime of the kernels.

Indexes here come from build_cells on random codes (no k-means), so K can be 64 (the largest K
whose stage-1 CDF the AVX-512 passes keep in registers) or above (the gather search), with as many
classes as needed. The reference law is float64 log_softmax(s1[a1] + s2[a2] + beta) computed from
the codes, independent of the kernels. Every chi-square test uses a fixed seed and p > 1e-4, with
bins of expected count < 5 pooled; the draw counts are chosen so that a law off by a few percent
on a bin of ~1% mass gives p far below that (the power comment in each test says how).
"""
import pytest
import torch

from imi_softmax import ops
from conftest import (chi_square_p_value, implied_position_mass, random_index, reference_log_q_from_codes,
                      sample_args)

P_MIN = 1e-4


def _skip_portable_off_cpu(device, cpu_draw_passes):
    if device.type != "cpu" and cpu_draw_passes != "auto":
        pytest.skip("IMI_CPU_SIMD only selects between CPU draw passes")


def _draw(device, s1, s2, index_args, draws, seed):
    out = ops.midx_sample(s1, s2, *index_args, draws, torch.Generator(device=device).manual_seed(seed))
    ids, log_q = out[0], out[1]
    return ids, log_q


@pytest.mark.parametrize("k,n", [(6, 400), (64, 20000), (100, 30000)])
@pytest.mark.parametrize("bias", [True, False])
def test_draws_follow_the_proposal(device, cpu_draw_passes, k, n, bias):
    """Per query row: class frequencies, cell frequencies and the first-code marginal all fit the
    float64 reference law, and log_q of every draw is the exact log Q of its class.
    Power: 150k draws per row; a bin with expected count e shifted by a relative error r adds about
    e r^2 to chi2, so r = 5% on a bin of 1% mass (e = 1500) adds ~4 per such bin."""
    _skip_portable_off_cpu(device, cpu_draw_passes)
    (code1, code2, beta), index = random_index(n, k, bias, seed=k + n, device=device)
    args = sample_args(index, bias)
    g = torch.Generator().manual_seed(k)
    B, draws = 3, 150_000
    s1 = (torch.randn(B, k, generator=g) * 1.5).to(device)
    s2 = (torch.randn(B, k, generator=g) * 1.5).to(device)
    ids, log_q = _draw(device, s1, s2, args, draws, seed=11)
    assert ids.shape == (B, draws) and ids.dtype == torch.int64 and log_q.dtype == torch.float32
    ref = reference_log_q_from_codes(s1.cpu(), s2.cpu(), code1.cpu(), code2.cpu(), None if beta is None else beta.cpu())
    ids, log_q = ids.cpu(), log_q.cpu()
    torch.testing.assert_close(log_q.double(), ref.gather(1, ids), atol=2e-5, rtol=0)
    p = ref.exp()
    cell_of_class = (code1 * k + code2).cpu()
    for row in range(B):
        counts = torch.bincount(ids[row], minlength=n)
        p_value, chi2, dof = chi_square_p_value(counts, p[row] * draws)
        assert p_value > P_MIN, f"classes, row {row}: chi2={chi2:.1f} dof={dof} p={p_value:.2e}"
        cell_p = torch.zeros(k * k, dtype=torch.float64).index_add_(0, cell_of_class, p[row])
        cell_counts = torch.bincount(cell_of_class[ids[row]], minlength=k * k)
        p_value, chi2, dof = chi_square_p_value(cell_counts, cell_p * draws)
        assert p_value > P_MIN, f"cells, row {row}: chi2={chi2:.1f} dof={dof} p={p_value:.2e}"
        k1_p = cell_p.view(k, k).sum(1)
        k1_counts = cell_counts.view(k, k).sum(1)
        p_value, chi2, dof = chi_square_p_value(k1_counts, k1_p * draws)
        assert p_value > P_MIN, f"stage 1, row {row}: chi2={chi2:.1f} dof={dof} p={p_value:.2e}"


@pytest.mark.parametrize("bias", [True, False])
def test_seeded_draws_follow_the_proposal(device, cpu_draw_passes, bias):
    """midx_sample_seeded (explicit Philox seed/offset) draws from the same law, with an offset
    that makes the 64-bit draw counter carry."""
    _skip_portable_off_cpu(device, cpu_draw_passes)
    k, n, B, draws = 64, 20000, 2, 150_000
    (code1, code2, beta), index = random_index(n, k, bias, seed=3, device=device)
    g = torch.Generator().manual_seed(4)
    s1, s2 = ((torch.randn(B, k, generator=g) * 1.5).to(device) for _ in range(2))
    out = ops.midx_sample_seeded(s1, s2, *sample_args(index, bias), draws, 99, 4 * (2**32 - 3))  # counter offset/4 + j carries
    ids = out[0].cpu()
    p = reference_log_q_from_codes(s1.cpu(), s2.cpu(), code1.cpu(), code2.cpu(),
                                   None if beta is None else beta.cpu()).exp()
    for row in range(B):
        p_value, chi2, dof = chi_square_p_value(torch.bincount(ids[row], minlength=n), p[row] * draws)
        assert p_value > P_MIN, f"row {row}: chi2={chi2:.1f} dof={dof} p={p_value:.2e}"


def test_alias_tables_encode_exp_beta_within_each_cell(device):
    """Structure of build_cells' alias tables: uniform slot then alias gives each CSR position
    the probability exp(beta_i) / sum_{j in cell} exp(beta_j), and the alias stays in its cell."""
    k = 5
    (_, _, _), index = random_index(3000, k, True, seed=8, device=device)
    offsets, class_ids, alias_prob, alias_pos, beta_csr = (t.cpu() for t in index[:5])
    sizes = offsets.diff()
    start, stop = offsets[:-1].repeat_interleave(sizes), offsets[1:].repeat_interleave(sizes)
    assert ((alias_pos >= start) & (alias_pos < stop)).all()
    assert ((alias_prob >= 0) & (alias_prob <= 1)).all()
    got = implied_position_mass(offsets, alias_prob, alias_pos)
    cell = torch.repeat_interleave(torch.arange(k * k), sizes)
    weights = beta_csr.double().exp()
    norm = torch.zeros(k * k, dtype=torch.float64).index_add_(0, cell, weights)
    torch.testing.assert_close(got, weights / norm[cell], atol=1e-6, rtol=0)


def test_within_cell_frequencies_follow_exp_beta(device, cpu_draw_passes):
    """The draws inside each cell, conditioned on the cell drawn, have frequencies proportional to
    exp(beta) (stage 3 through the alias tables), whatever stages 1-2 did. Biases spread over
    exp(+-6) make a uniform slot (alias ignored) fail by orders of magnitude."""
    _skip_portable_off_cpu(device, cpu_draw_passes)
    k, n, draws = 3, 900, 400_000
    (code1, code2, beta), index = random_index(n, k, True, seed=21, device=device)
    s1 = torch.zeros(1, k, device=device)
    s2 = torch.zeros(1, k, device=device)
    ids, _ = _draw(device, s1, s2, sample_args(index, True), draws, seed=5)
    ids = ids[0].cpu()
    cell_of_class = (code1 * k + code2).cpu()
    weights = beta.cpu().double().exp()
    counts = torch.bincount(ids, minlength=n)
    for c in range(k * k):
        members = (cell_of_class == c).nonzero().flatten()
        if members.numel() < 2:
            continue
        drawn = counts[members]
        expected = weights[members] / weights[members].sum() * drawn.sum()
        p_value, chi2, dof = chi_square_p_value(drawn, expected)
        assert p_value > P_MIN, f"cell {c}: chi2={chi2:.1f} dof={dof} p={p_value:.2e}"


def test_empty_and_zero_mass_cells_are_never_drawn(device, cpu_draw_passes):
    """Column k2 = 0 of the cells is empty but has the largest score; the next cell in CSR order,
    column k2 = 1, holds classes whose mass underflows to exactly 0 in float64 (score -2000). A draw
    that picked an empty cell would land on the first class of the next cell, a zero-mass class:
    so zero-mass classes must get no draws, and the rest must follow the reference law."""
    _skip_portable_off_cpu(device, cpu_draw_passes)
    k, n, B, draws = 6, 600, 3, 60_000
    (code1, code2, beta), index = random_index(n, k, True, seed=2, device=device, code2_values=range(1, k))
    g = torch.Generator().manual_seed(6)
    s1 = torch.randn(B, k, generator=g)
    s2 = torch.randn(B, k, generator=g)
    s2[:, 0] = 30.0  # empty column, hottest score
    s2[:, 1] = -2000.0  # populated column, no mass
    s1, s2 = s1.to(device), s2.to(device)
    ids, log_q = _draw(device, s1, s2, sample_args(index, True), draws, seed=9)
    ids, log_q = ids.cpu(), log_q.cpu()
    p = reference_log_q_from_codes(s1.cpu(), s2.cpu(), code1.cpu(), code2.cpu(), beta.cpu()).exp()
    zero = p == 0
    assert zero.any(1).all() and (code2.cpu() == 1).sum() == zero[0].sum()  # the case exists
    for row in range(B):
        counts = torch.bincount(ids[row], minlength=n)
        assert counts[zero[row]].sum() == 0, f"row {row}: {counts[zero[row]].sum()} draws of zero-mass classes"
        p_value, chi2, dof = chi_square_p_value(counts[~zero[row]], p[row, ~zero[row]] * draws)
        assert p_value > P_MIN, f"row {row}: chi2={chi2:.1f} dof={dof} p={p_value:.2e}"
    assert torch.isfinite(log_q).all()
