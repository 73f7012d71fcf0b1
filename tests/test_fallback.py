"""The pure-PyTorch fallback (imi_softmax/_fallback): against float64 references, against the
compiled kernels where both follow the same contract, and registered in place of the compiled
library in a subprocess (IMI_FORCE_FALLBACK=1)."""
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import imi_softmax
from imi_softmax import MIDXSampler, _fallback as fb
from imi_softmax._fallback import philox
from imi_softmax._loader import USING_FALLBACK

from conftest import make_loss_inputs, reference_loss, reference_midx_log_q

scipy_stats = pytest.importorskip("scipy.stats")

ops = torch.ops.imi_softmax
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_kernels = pytest.mark.skipif(USING_FALLBACK, reason="the compiled library is not loaded: nothing to compare with")


# --- random numbers -----------------------------------------------------------------------------

def test_philox_known_answers():
    """Random123's Philox4x32-10 test vectors (kat_vectors), through the int64-limb version."""
    cases = [([0, 0, 0, 0], 0, ["6627e8d5", "e169c58d", "bc57ac4c", "9b00dbd8"]),
             ([0xFFFFFFFF] * 4, 0xFFFFFFFFFFFFFFFF, ["408f276d", "41c83b0e", "a20bc7c6", "6d5451fd"]),
             ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], 0x299F31D0A4093822,
              ["d16cfe09", "94fdcceb", "5001e420", "24126ea1"])]
    for ctr, key, want in cases:
        got = philox.philox10(*[torch.tensor(c) for c in ctr], key)
        assert [f"{int(w):08x}" for w in got] == want


def test_draw_words_counter_layout():
    """counter = (c, c >> 32, b, b >> 32) with c = offset / 4 + j: a call at offset 4*k continues
    where k draws of a call at offset 0 stopped (torch's philox_cuda_state counts 32-bit outputs,
    four per draw)."""
    seed = 0x0123456789ABCDEF
    a = torch.stack(philox.draw_words(seed, 0, 3, 10))
    b = torch.stack(philox.draw_words(seed, 4 * 6, 3, 4))
    assert torch.equal(a[:, :, 6:], b)
    big = torch.stack(philox.draw_words(seed, 4 * (2 ** 32 - 1), 2, 2))  # c crosses into the high word
    for row in range(2):
        for j in range(2):
            c = 2 ** 32 - 1 + j
            want = philox.philox10(*[torch.tensor(v) for v in (c & 0xFFFFFFFF, c >> 32, row, 0)], seed)
            assert [int(w) for w in big[:, row, j]] == [int(w) for w in want]


def test_slot_and_accept_is_the_128_bit_product():
    g = torch.Generator().manual_seed(0)
    w2 = torch.randint(0, 2 ** 32, (4000,), generator=g)
    w3 = torch.randint(0, 2 ** 32, (4000,), generator=g)
    count = torch.cat([torch.tensor([1, 2, 3, 2 ** 25, 2 ** 32 - 1, 2 ** 32, 2 ** 62 + 12345]),
                       torch.randint(1, 2 ** 62, (3993,), generator=g)])
    slot, u = philox.slot_and_accept(w2, w3, count)
    for a, b, c, s, uu in zip(w2.tolist(), w3.tolist(), count.tolist(), slot.tolist(), u.tolist()):
        p = ((a << 32) | b) * c
        assert s == p >> 64 and 0 <= s < c
        assert uu == ((p & (2 ** 64 - 1)) >> 40) * 2.0 ** -24


# --- index build ---------------------------------------------------------------------------------

@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_assign_codewords_matches_kernel_and_reference(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(700, 9, generator=g, dtype=torch.float64).to(dtype)
    c = torch.randn(13, 9, generator=g, dtype=torch.float64).to(dtype)
    codes, sq = fb.assign_codewords(x, c)
    kc, ks = ops.assign_codewords(x, c)
    assert torch.equal(codes, kc)
    torch.testing.assert_close(sq, ks)
    ref = torch.cdist(x.double(), c.double()) ** 2
    assert torch.equal(codes, ref.argmin(1))
    torch.testing.assert_close(sq.double(), ref.min(1).values, rtol=1e-4 if dtype == torch.float32 else 1e-9,
                               atol=1e-4 if dtype == torch.float32 else 1e-9)


def _codes(n, K, seed):
    g = torch.Generator().manual_seed(seed)
    # skewed codes: big cells, small cells and empty ones
    code1 = (torch.rand(n, generator=g) ** 2 * K).long()
    code2 = torch.randint(0, K, (n,), generator=g) * (torch.rand(n, generator=g) < 0.8)
    code2[(code1 == 1) & (code2 == 2)] = 3  # cell (1, 2) stays empty
    return code1.int(), code2.int()  # the index's codes are int32


@needs_kernels
@pytest.mark.parametrize("with_beta", [False, True])
def test_build_cells_matches_kernel(with_beta):
    K, n = 6, 1500
    code1, code2 = _codes(n, K, 2)
    beta = (torch.randn(n, generator=torch.Generator().manual_seed(3)) * 3) if with_beta else None
    got = fb.build_cells(code1, code2, beta, K)
    want = ops.build_cells(code1, code2, beta, K)
    names = ["offsets", "class_ids", "alias_prob", "alias_pos", "beta_csr", "log_n", "cell_mass", "log_n_max"]
    for name, a, b in zip(names, got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a, b), name  # same float32/float64 steps, same libm exp/log/logf
    assert (got[5] == -math.inf).sum() > 0  # the design has empty cells


@needs_kernels
@pytest.mark.parametrize("count", [1579, 3100])
def test_build_cells_log_count_is_the_libm_logf(count):
    """Without a bias log n = logf(count), which glibc does not round correctly for these counts
    (float(math.log(count)) is one ulp away): the fallback must call the same logf."""
    code1 = torch.zeros(count + 2, dtype=torch.int32)
    code2 = torch.zeros(count + 2, dtype=torch.int32)
    code2[-2:] = 1
    for a, b in zip(fb.build_cells(code1, code2, None, 2), ops.build_cells(code1, code2, None, 2)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("with_beta", [False, True])
def test_build_cells_against_float64_definition(with_beta):
    K, n = 5, 800
    code1, code2 = _codes(n, K, 4)
    beta = (torch.randn(n, generator=torch.Generator().manual_seed(5)) * 2) if with_beta else None
    offsets, ids, prob, alias, bcsr, log_n, mass, log_n_max = fb.build_cells(code1, code2, beta, K)
    cell = code1 * K + code2
    b64 = beta.double() if with_beta else torch.zeros(n, dtype=torch.float64)
    for c in range(K * K):
        members = (cell == c).nonzero()[:, 0]
        lo, hi = int(offsets[c]), int(offsets[c + 1])
        assert torch.equal(ids[lo:hi], members)  # stable: ascending ids within a cell
        want = torch.logsumexp(b64[members], 0) if len(members) else torch.tensor(-math.inf, dtype=torch.float64)
        torch.testing.assert_close(log_n.view(-1)[c].double(), want, rtol=1e-6, atol=1e-6)
        if with_beta and hi > lo:
            # law of the alias table: slot p uniform, kept with prob[p], else alias[p]
            p = torch.zeros(n, dtype=torch.float64)
            for q in range(lo, hi):
                p[ids[q]] += float(prob[q]) / (hi - lo)
                p[ids[alias[q]]] += (1 - float(prob[q])) / (hi - lo)
            torch.testing.assert_close(p[members], torch.softmax(b64[members], 0), rtol=0, atol=1e-6)
            assert torch.equal(bcsr[lo:hi], beta[members])
    finite = log_n[log_n > -math.inf]
    assert float(log_n_max) == float(finite.max())
    # cell_mass = sum_{i in cell} exp(beta_i - log_n_max) in float64, rounded once to float32
    want = torch.zeros(K * K, dtype=torch.float64).index_add_(0, cell, (b64 - float(log_n_max)).exp())
    torch.testing.assert_close(mass.view(-1).double(), want, rtol=2.0 ** -23, atol=0)
    assert (mass.view(-1)[want == 0] == 0).all()


# --- proposal ------------------------------------------------------------------------------------

def _index(n=3000, d=12, K=8, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, d, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    return MIDXSampler(num_codewords=K, kmeans_iters=3).build(w, b)


def _tables(s):
    return (s.log_n, s.cell_mass, s.log_n_max, s.offsets, s.class_ids, s.alias_prob, s.alias_pos, s.beta_csr)


def f32_tolerance(*terms):
    """Rounding of fp32 sums of these terms' magnitudes (log Q is an fp32 sum of scores and log Z)."""
    return 1e-5 + 4 * torch.finfo(torch.float32).eps * sum(float(t.abs().max()) for t in terms if t is not None)


@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_log_prob_normalized_and_matches_reference(scale):
    s = _index()
    q = torch.randn(5, 12, generator=torch.Generator().manual_seed(1)) * scale
    s1, s2 = s.scores(q)
    every = torch.arange(s.num_classes).expand(5, -1).contiguous()
    lp = fb.midx_log_prob(s1, s2, s.log_n, s.cell_mass, s.log_n_max, s.beta, s.code1, s.code2, every)
    tol = f32_tolerance(s1, s2, s.beta)
    assert lp.logsumexp(1).abs().max() < tol
    torch.testing.assert_close(lp.double(), reference_midx_log_q(s, q), rtol=0, atol=tol)
    if not USING_FALLBACK:
        torch.testing.assert_close(lp, ops.midx_log_prob(s1, s2, s.log_n, s.cell_mass, s.log_n_max, s.beta,
                                                         s.code1, s.code2, every), rtol=0, atol=tol)


def test_underflowed_rows_take_the_log_space_path():
    """Row k1 = 0 holds classes only where s2 is 2000 below its max, so its scaled mass underflows
    to 0 in the fast path; s1[0] is 2000 above, so that row still carries real mass. The exact
    log-space path must keep Q normalized and the draws equal to log_prob."""
    K, n = 4, 240
    i = torch.arange(n)
    code1, code2 = (i % K).int(), ((i // K) % K).int()
    code2[code1 == 0] = 0
    beta = torch.randn(n, generator=torch.Generator().manual_seed(2))
    offsets, class_ids, prob, pos, bcsr, log_n, mass, log_n_max = fb.build_cells(code1, code2, beta, K)
    g = torch.Generator().manual_seed(3)
    s1 = torch.randn(3, K, generator=g) + torch.tensor([2000.0, 0, 0, 0])
    s2 = torch.randn(3, K, generator=g) + torch.tensor([-2000.0, 0, 0, 0])
    e2 = fb.proposal.exp_poly(s2 - s2.max(1, keepdim=True).values)
    assert ((e2 @ mass.T)[:, 0] <= fb.proposal.ROW_MASS_FLOOR).all()  # row 0 takes the exact path
    every = torch.arange(n).expand(3, -1).contiguous()
    lp = fb.midx_log_prob(s1, s2, log_n, mass, log_n_max, beta, code1, code2, every)
    ref = torch.log_softmax(s1.double()[:, code1] + s2.double()[:, code2] + beta.double(), 1)
    tol = f32_tolerance(s1, s2, beta)
    torch.testing.assert_close(lp.double(), ref, rtol=0, atol=tol)
    assert ref[:, code1 == 0].exp().sum(1).min() > 0.01  # the exact-path row matters
    ids, lq, _ = fb.midx_sample_seeded(s1, s2, log_n, mass, log_n_max, offsets, class_ids, prob, pos, bcsr, 4000, 3, 0)
    assert torch.equal(lq, fb.midx_log_prob(s1, s2, log_n, mass, log_n_max, beta, code1, code2, ids))
    frac = (code1[ids] == 0).double().mean(1)
    want = ref[:, code1 == 0].exp().sum(1)
    assert ((frac - want).abs() < 5 * torch.sqrt(want * (1 - want) / 4000)).all()
    if not USING_FALLBACK:
        k = ops.midx_log_prob(s1, s2, log_n, mass, log_n_max, beta, code1, code2, every)
        torch.testing.assert_close(lp, k, rtol=0, atol=tol)


@pytest.mark.parametrize("bias", [False, True])
def test_sampling_law_chi_square(bias):
    """Draws of the fallback follow exp(log_prob): chi-square over classes (expected >= 5 pooled)."""
    s = _index(n=400, K=5, bias=bias, seed=3)
    q = torch.randn(2, 12, generator=torch.Generator().manual_seed(4))
    s1, s2 = s.scores(q)
    M = 20000
    ids, log_q, _ = fb.midx_sample_seeded(s1, s2, *_tables(s), M, 1234, 0)
    every = torch.arange(s.num_classes).expand(2, -1).contiguous()
    p = fb.midx_log_prob(s1, s2, s.log_n, s.cell_mass, s.log_n_max, s.beta, s.code1, s.code2, every).double().exp()
    for b in range(2):
        counts = torch.bincount(ids[b], minlength=s.num_classes).double()
        expected = p[b] * M
        big = expected >= 5
        obs = torch.cat([counts[big], counts[~big].sum().reshape(1)])
        exp_ = torch.cat([expected[big], expected[~big].sum().reshape(1)])
        exp_ = exp_ * obs.sum() / exp_.sum()
        assert scipy_stats.chisquare(obs.numpy(), exp_.numpy()).pvalue > 1e-3
    # log_q is log_prob of the drawn ids, bit for bit (one preparation)
    lp = fb.midx_log_prob(s1, s2, s.log_n, s.cell_mass, s.log_n_max, s.beta, s.code1, s.code2, ids)
    assert torch.equal(log_q, lp)


def test_sample_targets_log_q_and_edge_shapes():
    s = _index(n=500, K=4)
    q = torch.randn(3, 12, generator=torch.Generator().manual_seed(5))
    s1, s2 = s.scores(q)
    targets = torch.tensor([[3, -100], [499, 0], [-1, 7]])
    _, _, tlq = fb.midx_sample_seeded(s1, s2, *_tables(s), 5, 7, 0, targets, s.beta, s.code1, s.code2)
    lp = fb.midx_log_prob(s1, s2, s.log_n, s.cell_mass, s.log_n_max, s.beta, s.code1, s.code2, targets.clamp(min=0))
    assert torch.equal(tlq, torch.where(targets < 0, torch.zeros_like(lp), lp))
    ids, lq, tlq = fb.midx_sample_seeded(s1, s2, *_tables(s), 0, 7, 0)
    assert ids.shape == (3, 0) and lq.shape == (3, 0) and tlq.shape == (3, 0)
    ids, lq, _ = fb.midx_sample_seeded(s1[:0], s2[:0], *_tables(s), 4, 7, 0)
    assert ids.shape == (0, 4) and lq.dtype == torch.float32
    with pytest.raises(RuntimeError, match="multiple of 4"):
        fb.midx_sample_seeded(s1, s2, *_tables(s), 4, 7, 2)
    with pytest.raises(RuntimeError, match=r"midx_sample: targets has class id 500 at \[0, 0\] outside "
                                           r"\[0, 500\) \(or negative: ignored\)"):
        fb.midx_sample_seeded(s1, s2, *_tables(s), 4, 7, 0, torch.tensor([[500]] * 3), s.beta, s.code1, s.code2)
    with pytest.raises(RuntimeError, match="code1"):
        fb.midx_sample_seeded(s1, s2, *_tables(s), 4, 7, 0, targets)


def test_sample_and_log_prob_check_what_they_index_with():
    """Corrupt tables get an error before any indexing (a CUDA gather would device-assert)."""
    s = _index(n=300, K=4)
    s1, s2 = s.scores(torch.randn(2, 12, generator=torch.Generator().manual_seed(9)))
    good = list(_tables(s))
    cases = {3: s.offsets.flip(0), 4: s.class_ids + 300, 6: s.alias_pos.clone().fill_(300), 5: s.alias_prob[:-1]}
    for where, bad in cases.items():
        args = list(good)
        args[where] = bad
        with pytest.raises(RuntimeError, match="midx_sample"):
            fb.midx_sample_seeded(s1, s2, *args, 4, 7, 0)
    with pytest.raises(RuntimeError, match=r"class 0 \(in ids\) has codes \(\d+, \d+\) outside \[0, K = 4\)"):
        fb.midx_log_prob(s1, s2, s.log_n, s.cell_mass, s.log_n_max, s.beta, s.code1 + 4, s.code2,
                         torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(RuntimeError, match=r"ids has class id -1 at \[1, 0\] outside \[0, 300\)$"):
        fb.midx_log_prob(s1, s2, s.log_n, s.cell_mass, s.log_n_max, s.beta, s.code1, s.code2,
                         torch.tensor([[0], [-1]]))


@needs_kernels
def test_bad_targets_ids_and_aliases_raise_the_kernels_messages():
    """The same RuntimeError text as the CPU kernels: a target or id named with its [row, column],
    and a draw that meets an alias outside its cell (in [0, N), so only the draw can see it)."""
    s = _index(n=300, K=4)
    s1, s2 = s.scores(torch.randn(2, 12, generator=torch.Generator().manual_seed(9)))
    codes = (s.beta, s.code1, s.code2)

    def same_error(fn_args):
        msgs = []
        for impl in (fb, ops):
            with pytest.raises(RuntimeError) as err:
                fn_args(impl)
            msgs.append(str(err.value).splitlines()[0])
        assert msgs[0] == msgs[1]

    same_error(lambda m: m.midx_sample_seeded(s1, s2, *_tables(s), 4, 7, 0, torch.tensor([[1, -3], [300, 2]]), *codes))
    same_error(lambda m: m.midx_log_prob(s1, s2, s.log_n, s.cell_mass, s.log_n_max, *codes, torch.tensor([[0, 4], [-2, 1]])))
    n = s.class_ids.numel()
    off = s.offsets
    cell_end = off[torch.searchsorted(off, torch.arange(n), right=True)]
    outside = (cell_end % n).int()  # the first position after each one's cell: never inside it
    tables = list(_tables(s))
    tables[5], tables[6] = torch.zeros(n), outside  # always take the alias
    same_error(lambda m: m.midx_sample_seeded(s1, s2, *tables, 16, 7, 0))
    with pytest.raises(RuntimeError, match="a draw reached an empty cell, an alias outside its cell"):
        fb.midx_sample_seeded(s1, s2, *tables, 16, 7, 0)


def test_offset_continues_the_stream_and_generator_reproduces():
    s = _index(n=500, K=4)
    q = torch.randn(2, 12, generator=torch.Generator().manual_seed(6))
    s1, s2 = s.scores(q)
    a, _, _ = fb.midx_sample_seeded(s1, s2, *_tables(s), 12, 99, 0)
    b, _, _ = fb.midx_sample_seeded(s1, s2, *_tables(s), 4, 99, 4 * 8)
    assert torch.equal(a[:, 8:], b)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    x1 = fb.midx_sample(s1, s2, *_tables(s), 16, g1)[0]
    x2 = fb.midx_sample(s1, s2, *_tables(s), 16, g2)[0]
    assert torch.equal(x1, x2)
    assert not torch.equal(x1, fb.midx_sample(s1, s2, *_tables(s), 16, g1)[0])  # the generator advanced


def _equal_mass_index(K=4, per_cell=24):
    """Cells of equal size holding the same multiset of biases: every cell mass is 1 and each query
    with constant scores has CDFs of small integers, exact in float32 in any rounding order, so
    the fallback and the kernels must draw the very same classes (a case that needs no care about
    rounding; the random-score test below checks the rounding too)."""
    n = K * K * per_cell
    i = torch.arange(n)
    cell = i % (K * K)
    code1, code2 = (cell // K).int(), (cell % K).int()  # the index's codes are int32
    beta = torch.linspace(-2, 2, per_cell)[i // (K * K)].contiguous()
    return code1, code2, beta


@needs_kernels
def test_seeded_draws_equal_the_kernels_exactly():
    K = 4
    code1, code2, beta = _equal_mass_index(K)
    tables = ops.build_cells(code1, code2, beta, K)
    offsets, class_ids, prob, pos, bcsr, log_n, mass, log_n_max = tables
    assert torch.equal(mass, torch.ones(K, K))
    s1 = torch.zeros(3, K)
    s2 = torch.zeros(3, K)
    args = (s1, s2, log_n, mass, log_n_max, offsets, class_ids, prob, pos, bcsr)
    targets = torch.tensor([[0, 5], [-100, 17], [383, 2]])
    extra = (targets, beta, code1, code2)
    for seed, offset in ((0, 0), (2 ** 63 + 12345, 4 * 1000), (7, 4 * (2 ** 32 - 3))):
        want = ops.midx_sample_seeded(*args, 2000, seed - 2 ** 64 if seed >= 2 ** 63 else seed, offset, *extra)
        got = fb.midx_sample_seeded(*args, 2000, seed, offset, *extra)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
    g1, g2 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    for a, b in zip(fb.midx_sample(*args, 500, g1, *extra), ops.midx_sample(*args, 500, g2, *extra)):
        assert torch.equal(a, b)


@needs_kernels
@pytest.mark.parametrize("K, bias_scale, score_scale", [(4, None, 1.0), (8, 1.0, 3.0), (13, 10.0, 30.0),
                                                         (33, 1000.0, 1.0)])
def test_seeded_draws_equal_the_kernels_on_random_scores(K, bias_scale, score_scale):
    """Random scores, biases and tables: ids, log_q and target_log_q EQUAL to the CPU kernels', and
    log_prob too. Nothing is left to chance: the fallback runs the kernels' float32 operations in
    their order (max-shifted scores, exp_poly/log_poly, sequential cumulative sums; torch never
    fuses two ops into an FMA and the host preparation is built with fp-contract=off), so every CDF
    and log Z' is the same float and every inverse-CDF search lands on the same entry."""
    g = torch.Generator().manual_seed(K)
    n = 2000
    w = torch.randn(n, 12, generator=g)
    b = torch.randn(n, generator=g) * bias_scale if bias_scale is not None else None
    s = MIDXSampler(num_codewords=K, kmeans_iters=2).build(w, b)
    for a, c in zip(fb.build_cells(s.code1, s.code2, s.beta, K), ops.build_cells(s.code1, s.code2, s.beta, K)):
        assert torch.equal(a, c)
    s1, s2 = s.scores(torch.randn(16, 12, generator=g) * score_scale)
    targets = torch.randint(-1, n, (16, 6), generator=g)
    args = (s1, s2, *_tables(s), 1024, 31, 4 * 5, targets, s.beta, s.code1, s.code2)
    want, got = ops.midx_sample_seeded(*args), fb.midx_sample_seeded(*args)
    for a, c in zip(got, want):
        assert torch.equal(a, c)
    every = torch.arange(n).expand(16, -1).contiguous()
    lp_args = (s1, s2, s.log_n, s.cell_mass, s.log_n_max, s.beta, s.code1, s.code2, every)
    assert torch.equal(fb.midx_log_prob(*lp_args), ops.midx_log_prob(*lp_args))


@needs_kernels
def test_underflowed_rows_draw_and_score_like_the_kernels():
    """The exact log-space path (a row whose scaled mass underflows) equals the kernels' too."""
    K, n = 4, 240
    i = torch.arange(n)
    code1, code2 = (i % K).int(), ((i // K) % K).int()
    code2[code1 == 0] = 0
    beta = torch.randn(n, generator=torch.Generator().manual_seed(2)) * 3
    tables = ops.build_cells(code1, code2, beta, K)
    for a, c in zip(fb.build_cells(code1, code2, beta, K), tables):
        assert torch.equal(a, c)
    offsets, class_ids, prob, pos, bcsr, log_n, mass, log_n_max = tables
    g = torch.Generator().manual_seed(3)
    s1 = torch.randn(6, K, generator=g) * 5 + torch.tensor([2000.0, 0, 0, 0])
    s2 = torch.randn(6, K, generator=g) * 5 + torch.tensor([-2000.0, 0, 0, 0])
    targets = torch.randint(-1, n, (6, 7), generator=g)
    args = (s1, s2, log_n, mass, log_n_max, offsets, class_ids, prob, pos, bcsr, 2000, 3, 0, targets, beta, code1, code2)
    got, want = fb.midx_sample_seeded(*args), ops.midx_sample_seeded(*args)
    for a, c in zip(got, want):
        assert torch.equal(a, c)
    assert (code1[got[0]] == 0).any()  # draws went through the exact-path row


# --- loss and weight gradients -------------------------------------------------------------------

def _op_inputs_with_ignored_row(dtype):
    """make_loss_inputs (B=7, N=40, d=5, M=9) with row 3 ignored (-100), plus the accumulation dtype and the
    op-level ids [B, 1 + M] (target first) and log Q [B, 1 + M] in that dtype."""
    x, w, b, target, ids, log_q, tlq = make_loss_inputs(B=7, N=40, d=5, M=9, dtype=dtype)
    target = target.clone()
    target[3] = -100
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    all_ids = torch.cat([target[:, None], ids], 1)
    all_lq = torch.cat([tlq[:, None], log_q], 1).to(acc)
    return x, w, b, target, ids, log_q, tlq, acc, all_ids, all_lq


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("remove_hits", [True, False])
def test_loss_forward_backward_match_kernel_and_reference(dtype, remove_hits):
    x, w, b, target, ids, log_q, tlq, acc, all_ids, all_lq = _op_inputs_with_ignored_row(dtype)
    x, w, b = x.detach(), w.detach(), b.detach()
    loss, lse = fb.sampled_softmax_forward(x, w, b, all_ids, all_lq, remove_hits, -100, False)
    k_loss, k_lse = ops.sampled_softmax_forward(x, w, b, all_ids, all_lq, remove_hits, -100, False)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, k_loss, **tol)
    torch.testing.assert_close(lse, k_lse, **tol)
    ref = reference_loss(x, w, b, target, ids, log_q, tlq, remove_hits)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    g = torch.linspace(0.5, 2, 7, dtype=acc)
    gx, coef = fb.sampled_softmax_backward(g, x, w, b, all_ids, all_lq, lse, remove_hits, -100)
    k_gx, k_coef = ops.sampled_softmax_backward(g, x, w, b, all_ids, all_lq, k_lse, remove_hits, -100)
    torch.testing.assert_close(gx, k_gx, **tol)
    torch.testing.assert_close(coef, k_coef, **tol)
    assert (coef[3] == 0).all() and (gx[3] == 0).all()
    for num_classes in (40, 55):
        gw, gb = fb.dense_weight_grad(coef, all_ids, x, num_classes)
        k_gw, k_gb = ops.dense_weight_grad(coef, all_ids, x, num_classes)
        torch.testing.assert_close(gw, k_gw, **tol)
        torch.testing.assert_close(gb, k_gb, **tol)
        u, rows, brows = fb.sparse_weight_grad(coef, all_ids, x, num_classes)
        k_u, k_rows, k_brows = ops.sparse_weight_grad(coef, all_ids, x, num_classes)
        assert torch.equal(u, k_u)
        torch.testing.assert_close(rows, k_rows, **tol)
        torch.testing.assert_close(brows, k_brows, **tol)
        torch.testing.assert_close(gw[u], rows)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("remove_hits", [True, False])
def test_training_forward_matches_kernel_and_float64_autograd(dtype, remove_hits):
    """sampled_softmax_train: the fallback equals the kernel, and its coef / grad_x (grad_loss = 1)
    equal autograd of the float64 reference loss (ignored row: zeros)."""
    x, w, b, target, ids, log_q, tlq, acc, all_ids, all_lq = _op_inputs_with_ignored_row(dtype)
    xd, wd, bd = x.detach(), w.detach(), b.detach()
    got = fb.sampled_softmax_train(xd, wd, bd, all_ids, all_lq, remove_hits, -100, False)
    want = ops.sampled_softmax_train(xd, wd, bd, all_ids, all_lq, remove_hits, -100, False)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for a, k in zip(got, want):
        assert a.dtype == k.dtype == acc
        torch.testing.assert_close(a, k, **tol)
    loss, _, coef, gx = got
    x64 = x.detach().double().requires_grad_()
    ref = reference_loss(x64, w.detach().double(), b.detach().double(), target, ids, log_q, tlq, remove_hits)
    (gx_ref,) = torch.autograd.grad(ref.sum(), x64)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx.double(), gx_ref, rtol=1e-5, atol=1e-5)
    assert (coef[3] == 0).all() and (gx[3] == 0).all()


def test_loss_gradients_against_float64_autograd():
    """grad_x and the weight/bias grads from coef equal autograd of the float64 reference loss."""
    x, w, b, target, ids, log_q, tlq = make_loss_inputs(B=5, N=30, d=4, M=6)
    ref = reference_loss(x, w, b, target, ids, log_q, tlq).sum()
    gx_ref, gw_ref, gb_ref = torch.autograd.grad(ref, (x, w, b))
    all_ids = torch.cat([target[:, None], ids], 1)
    all_lq = torch.cat([tlq[:, None], log_q], 1).double()
    xd, wd, bd = x.detach(), w.detach(), b.detach()
    _, lse = fb.sampled_softmax_forward(xd, wd, bd, all_ids, all_lq, True, -100, False)
    gx, coef = fb.sampled_softmax_backward(torch.ones(5, dtype=torch.float64), xd, wd, bd, all_ids, all_lq, lse,
                                           True, -100)
    gw, gb = fb.dense_weight_grad(coef, all_ids, xd, 30)
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gw, gw_ref)
    torch.testing.assert_close(gb, gb_ref)


def test_loss_rejects_out_of_range_ids():
    x, w, b, target, ids, log_q, tlq = make_loss_inputs(B=2, N=10, d=3, M=2)
    bad = torch.tensor([[0, 10, 1], [2, 3, -5]])
    with pytest.raises(RuntimeError, match="outside"):
        fb.sampled_softmax_forward(x.detach(), w.detach(), b.detach(), bad, torch.zeros(2, 3, dtype=torch.float64),
                                   True, -100, False)
    # non-zero coefficients: an entry whose coefficient is exactly 0 is skipped whatever its id, as the
    # kernel does (imi::weight_grad_entry; test_op_checks.py::test_weight_grad_skips_marker_and_zero_coef_entries)
    with pytest.raises(RuntimeError, match="num_classes"):
        fb.dense_weight_grad(torch.ones(2, 3, dtype=torch.float64), bad, x.detach(), 10)


# --- registered in place of the compiled library --------------------------------------------------

_CHILD = textwrap.dedent("""
    import json, warnings
    import torch
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        import imi_softmax
    from imi_softmax import IMISoftmax, _loader
    msgs = [str(w.message) for w in seen if issubclass(w.category, UserWarning) and "imi_softmax" in str(w.message)]
    torch.manual_seed(0)
    head = IMISoftmax(6, 50, num_samples=8, sampler="uniform").double()
    x = torch.randn(5, 6, dtype=torch.float64)
    t = torch.tensor([1, 2, -100, 4, 5])
    loss = head(x, t)
    loss.backward()
    ops = torch.ops.imi_softmax
    xs, w = x.clone().requires_grad_(), head.weight.detach().clone().requires_grad_()
    ids = torch.tensor([[1, 3, 1], [2, 0, 9], [4, 4, 5], [7, 8, 9], [5, 6, 7]])
    lq = torch.randn(5, 3, dtype=torch.float64)
    ok_grad = torch.autograd.gradcheck(lambda a, b: ops.sampled_softmax_forward(a, b, None, ids, lq, True, -100, False)[0],
                                       (xs, w))
    torch.library.opcheck(ops.sampled_softmax_forward, (xs, w, None, ids, lq, True, -100, False))
    print(json.dumps(dict(fallback=_loader.USING_FALLBACK, warnings=msgs, loss=loss.item(),
                          grad=head.weight.grad.sum().item(), gradcheck=bool(ok_grad))))
""")


def test_forced_fallback_registers_the_ops_and_warns_once():
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMI_")}
    env.update(IMI_FORCE_FALLBACK="1", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", _CHILD], cwd=ROOT, capture_output=True, text=True, timeout=180, env=env)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["fallback"] is True and got["gradcheck"] is True
    assert len(got["warnings"]) == 1
    assert "IMI_FORCE_FALLBACK" in got["warnings"][0] and "pip install --no-build-isolation ." in got["warnings"][0]
    if not USING_FALLBACK:  # the same seeded training step with the compiled ops
        torch.manual_seed(0)
        head = imi_softmax.IMISoftmax(6, 50, num_samples=8, sampler="uniform").double()
        x = torch.randn(5, 6, dtype=torch.float64)
        loss = head(x, torch.tensor([1, 2, -100, 4, 5]))
        loss.backward()
        assert math.isclose(got["loss"], loss.item(), rel_tol=1e-12, abs_tol=1e-12)
        assert math.isclose(got["grad"], head.weight.grad.sum().item(), rel_tol=1e-10, abs_tol=1e-12)


_CHILD_MIDX = textwrap.dedent("""
    import warnings
    warnings.simplefilter("ignore")
    import torch
    from imi_softmax import IMISoftmax, MIDXSampler, _loader
    assert _loader.USING_FALLBACK
    torch.manual_seed(0)
    head = IMISoftmax(8, 300, num_samples=16, num_codewords=4)
    x, t = torch.randn(6, 8), torch.randint(0, 300, (6,))
    loss = head(x, t)
    loss.backward()
    assert torch.isfinite(loss) and head.weight.grad.abs().sum() > 0
    s = MIDXSampler(num_codewords=4).build(torch.randn(300, 8), torch.randn(300))
    ids, log_q = s.sample(x, 32)
    assert torch.equal(log_q, s.log_prob(x, ids))
    head.eval()
    ref = torch.nn.functional.cross_entropy(torch.nn.functional.linear(x, head.weight, head.bias), t)
    torch.testing.assert_close(head(x, t), ref)
    want, got = head.topk(x, 5), head.topk(x, 5, approximate=True, budget=300)  # retrieval ops
    assert torch.equal(want[1], got[1])
    print("ok")
""")


def test_forced_fallback_trains_with_the_midx_sampler():
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMI_")}
    env.update(IMI_FORCE_FALLBACK="1", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", _CHILD_MIDX], cwd=ROOT, capture_output=True, text=True,
                         timeout=180, env=env)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fallback_on_cuda_equals_cpu():
    """The fallback is device-agnostic torch: the same tables, draws and loss on a GPU."""
    code1, code2 = _codes(400, 4, 6)
    beta = torch.randn(400, generator=torch.Generator().manual_seed(7))
    cpu = fb.build_cells(code1, code2, beta, 4)
    gpu = fb.build_cells(code1.cuda(), code2.cuda(), beta.cuda(), 4)
    for a, b in zip(cpu, gpu):
        assert b.is_cuda and torch.equal(a, b.cpu())
    s1 = torch.randn(3, 4, generator=torch.Generator().manual_seed(8))
    s2 = torch.randn(3, 4, generator=torch.Generator().manual_seed(9))
    offsets, class_ids, prob, pos, bcsr, log_n, mass, log_n_max = cpu
    args = (log_n, mass, log_n_max, offsets, class_ids, prob, pos, bcsr)
    want = fb.midx_sample_seeded(s1, s2, *args, 64, 5, 8)
    got = fb.midx_sample_seeded(s1.cuda(), s2.cuda(), *[t.cuda() for t in args], 64, 5, 8)
    assert torch.equal(want[0], got[0].cpu())
    torch.testing.assert_close(want[1], got[1].cpu(), rtol=0, atol=1e-5)
    x, w, b, target, ids, log_q, tlq = make_loss_inputs(B=4, N=40, d=5, M=6)
    all_ids = torch.cat([target[:, None], ids], 1)
    all_lq = torch.cat([tlq[:, None], log_q], 1).double()
    want = fb.sampled_softmax_forward(x.detach(), w.detach(), b.detach(), all_ids, all_lq, True, -100, False)
    got = fb.sampled_softmax_forward(x.detach().cuda(), w.detach().cuda(), b.detach().cuda(), all_ids.cuda(),
                                     all_lq.cuda(), True, -100, False)
    torch.testing.assert_close(want[0], got[0].cpu())


def test_library_built_for_another_torch_falls_back_and_says_so(tmp_path):
    """A stale imi_softmax._C (ImportError 'undefined symbol') is named in the one warning."""
    import shutil
    shutil.copytree(os.path.join(ROOT, "imi_softmax"), tmp_path / "imi_softmax",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    (tmp_path / "imi_softmax" / "_C.py").write_text(
        "raise ImportError('_C.so: undefined symbol: _ZN3c104cuda9SetDeviceEa')\n")
    child = textwrap.dedent("""
        import warnings
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            import imi_softmax
        msgs = [str(w.message) for w in seen if "imi_softmax" in str(w.message)]
        assert len(msgs) == 1, msgs
        assert "built for another torch version" in msgs[0] and "pip install --no-build-isolation ." in msgs[0]
        assert imi_softmax._loader.USING_FALLBACK
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMI_")}
    env["PYTHONPATH"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", child], cwd=tmp_path, capture_output=True, text=True, timeout=180,
                         env=env)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]
