"""MixtureSampler, TopCellsSampler and InBatchSampler: exact log Q of the mixture (float64
references built from the definitions), the law of the draws (chi-square, fixed seeds, p > 1e-4
with bins of expected count < 5 pooled), the in-batch frequency estimator on a stream with known
rates (tolerance from the estimator's variance), the errors, and training inside IMISoftmax."""
import math

import pytest
import torch

from imi_softmax import (IMISoftmax, InBatchSampler, MIDXSampler, MixtureSampler, TopCellsSampler, UniformSampler,
                         UnigramSampler)
from conftest import chi_square_p_value, reference_midx_log_q

P_MIN = 1e-4
N, D, K = 300, 8, 6


def _weights(bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, D, generator=g)
    b = torch.randn(N, generator=g) * 0.5 if bias else None
    return w, b


def _query(b=4, seed=1, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, D, generator=g) * scale


def _counts(seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50, (N,), generator=g).to(torch.float64)


def _midx(bias=True):
    w, b = _weights(bias)
    return MIDXSampler(num_codewords=K, kmeans_iters=3).build(w, b)


def _unigram_ref(counts, alpha=0.75):
    p = counts.clamp_min(1.0).pow(alpha)
    return (p / p.sum()).log()


def _top_cells_ref(midx, query, budget):
    """float64 log Q of TopCellsSampler from its definition: rank the cells by s1 + s2, keep the
    smallest prefix holding >= budget classes, exp(beta) within. Ties here go by cell number, the
    sampler's by codeword rank: random float queries have none (test_top_cells_visit_equals_...
    checks that its inputs have none)."""
    s1, s2 = (s.double() for s in midx.scores(query))
    code1, code2 = midx.code1, midx.code2
    cell_of = code1 * K + code2
    counts = torch.bincount(cell_of, minlength=K * K)
    beta = midx.beta.double() if midx.beta is not None else torch.zeros(N, dtype=torch.float64)
    out = torch.full((query.shape[0], N), -math.inf, dtype=torch.float64)
    for r in range(query.shape[0]):
        scores = [(float(s1[r, c // K] + s2[r, c % K]), c) for c in range(K * K)]
        ranked = [c for _, c in sorted(scores, key=lambda t: (-t[0], t[1]))]
        chosen, total = set(), 0
        for c in ranked:
            if total >= budget:
                break
            chosen.add(c)
            total += int(counts[c])
        inside = torch.tensor([int(cell_of[i]) in chosen for i in range(N)])
        out[r, inside] = torch.log_softmax(beta[inside], 0)
    return out


def _mixture(bias=True, with_top=False, budget=40):
    midx = _midx(bias)
    uni = UnigramSampler(_counts())
    comps = [(midx, 0.7), (uni, 0.1), (UniformSampler(N), 0.1)]
    comps.append((TopCellsSampler(midx, budget=budget), 0.1) if with_top else (midx, 0.1))
    return MixtureSampler(comps), midx


def _mixture_ref(mix, midx, query, budget=40):
    parts = []
    for s, w in zip(mix.samplers, mix.weights):
        if isinstance(s, MIDXSampler):
            lq = reference_midx_log_q(s, query)
        elif isinstance(s, UnigramSampler):
            lq = _unigram_ref(_counts()).expand(query.shape[0], N)
        elif isinstance(s, UniformSampler):
            lq = torch.full((query.shape[0], N), -math.log(N), dtype=torch.float64)
        else:
            lq = _top_cells_ref(midx, query, budget)
        parts.append(lq + math.log(w))
    return torch.logsumexp(torch.stack(parts), 0)


# -- exact log Q ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("with_top", [False, True])
def test_mixture_log_q_normalizes_and_matches_float64_reference(bias, with_top):
    mix, midx = _mixture(bias, with_top)
    query = _query(scale=2.0)
    all_ids = torch.arange(N).expand(query.shape[0], N)
    lq = mix.log_prob(query, all_ids)
    assert lq.dtype == torch.float32 and lq.shape == (query.shape[0], N)
    assert torch.logsumexp(lq.double(), 1).abs().max() < 1e-5
    torch.testing.assert_close(lq.double(), _mixture_ref(mix, midx, query), atol=2e-5, rtol=0)


@pytest.mark.parametrize("bias", [True, False])
def test_top_cells_log_q_normalizes_and_matches_float64_reference(bias):
    midx = _midx(bias)
    top = TopCellsSampler(midx, budget=50)
    query = _query(scale=2.0)
    lq = top.log_prob(query, torch.arange(N).expand(query.shape[0], N)).double()
    ref = _top_cells_ref(midx, query, 50)
    assert torch.equal(lq.isneginf(), ref.isneginf())  # the same support
    assert torch.logsumexp(lq, 1).abs().max() < 1e-5
    torch.testing.assert_close(lq[~ref.isneginf()], ref[~ref.isneginf()], atol=2e-5, rtol=0)


def test_sample_returns_log_prob_of_its_ids():
    query = _query()
    g = torch.Generator().manual_seed(0)
    mix, midx = _mixture(with_top=True)
    samplers = [mix, TopCellsSampler(midx, budget=30)]
    for s in samplers:
        ids, log_q = s.sample(query, 64, generator=g)
        assert ids.shape == (4, 64) and ids.dtype == torch.int64 and log_q.dtype == torch.float32
        torch.testing.assert_close(log_q, s.log_prob(query, ids), atol=0, rtol=0)
        targets = torch.randint(0, N, (4, 3), generator=g)
        ids, log_q, tlq = s.sample_with_targets(query, 16, targets, generator=g)
        torch.testing.assert_close(log_q, s.log_prob(query, ids), atol=0, rtol=0)
        torch.testing.assert_close(tlq, s.log_prob(query, targets), atol=0, rtol=0)
    for mixed in (None, _midx()):
        inb = InBatchSampler(N, mix_with=mixed).build(*_weights())
        targets = torch.randint(0, N, (4, 1), generator=g)
        ids, log_q, tlq = inb.sample_with_targets(query, 0 if mixed is None else 8, targets, generator=g)
        assert ids.shape == (4, 4 + (0 if mixed is None else 8))
        assert torch.equal(ids[:, :4], targets.reshape(1, 4).expand(4, 4))
        torch.testing.assert_close(log_q, inb.log_prob(query, ids), atol=0, rtol=0)
        torch.testing.assert_close(tlq, inb.log_prob(query, targets), atol=0, rtol=0)


def test_mixed_in_batch_log_q_is_the_balance_heuristic():
    """log q = log((n_ib Q_ib + n_s Q_s) / (n_ib + n_s)) with Q_ib = p_hat / sum p_hat, float64."""
    midx = _midx()
    inb = InBatchSampler(N, alpha=0.1, mix_with=midx).build(*_weights())
    g = torch.Generator().manual_seed(5)
    query = _query(b=6)
    for _ in range(30):  # a history for the estimator
        inb.sample_with_targets(query, 4, torch.randint(0, N // 3, (6, 1), generator=g), generator=g)
    targets = torch.randint(0, N, (6, 1), generator=g)
    valid = torch.tensor([True, True, False, True, True, True])
    ids, log_q, tlq = inb.sample_with_targets(query, 5, targets, generator=g, valid=valid)
    assert torch.equal(ids[0, :5], targets.reshape(-1)[valid])  # the ignored row's placeholder is no negative
    # reference: p_hat from the estimator's state, normalized over all classes in float64
    p_hat = torch.where(inb.last_seen > 0, 1.0 / inb.gap, torch.full((N,), 1.0 / (inb.step + 1), dtype=torch.float64))
    q_ib = p_hat / p_hat.sum()
    q_s = reference_midx_log_q(midx, query).exp()
    n_ib, n_s = 5, 5
    ref = ((n_ib * q_ib.unsqueeze(0) + n_s * q_s) / (n_ib + n_s)).log()
    torch.testing.assert_close(log_q.double(), ref.gather(1, ids), atol=2e-5, rtol=0)
    torch.testing.assert_close(tlq.double(), ref.gather(1, targets), atol=2e-5, rtol=0)
    assert abs(torch.logsumexp(ref, 1).max()) < 1e-9  # the mixture is a normalized law


# -- laws of the draws -----------------------------------------------------------------------------
@pytest.mark.parametrize("with_top", [False, True])
def test_mixture_draws_follow_the_mixture(with_top):
    """Power: 120k draws per row over 300 classes; a 5% relative error on a class of 1% mass
    (expected 1200) adds about 3 to chi2 and a wrong component weight shifts hundreds of bins."""
    mix, midx = _mixture(with_top=with_top)
    query = _query(b=3, scale=2.0)
    draws = 120_000
    ids, log_q = mix.sample(query, draws, generator=torch.Generator().manual_seed(3))
    ref = _mixture_ref(mix, midx, query)
    torch.testing.assert_close(log_q.double(), ref.gather(1, ids), atol=2e-5, rtol=0)
    for row in range(3):
        p_value, chi2, dof = chi_square_p_value(torch.bincount(ids[row], minlength=N), ref[row].exp() * draws)
        assert p_value > P_MIN, f"row {row}: chi2={chi2:.1f} dof={dof} p={p_value:.2e}"


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("budget", [1, 40, 10_000])
def test_top_cells_support_and_law(bias, budget):
    """Every draw lies in the selected cells, the selection is the smallest prefix reaching the
    budget, and the class frequencies fit exp(beta) within it (uniform without bias)."""
    midx = _midx(bias)
    top = TopCellsSampler(midx, budget=budget)
    query = _query(b=3, scale=2.0)
    draws = 60_000
    ids, log_q = top.sample(query, draws, generator=torch.Generator().manual_seed(9))
    ref = _top_cells_ref(midx, query, budget)
    assert bool(torch.isfinite(ref.gather(1, ids)).all())  # support
    selected, _ = top.selection(query)
    counts = (midx.offsets[1:] - midx.offsets[:-1])
    for row in range(3):
        held = int(counts[selected[row]].sum())
        assert held >= min(budget, N)
        # dropping the lowest-scored selected cell that holds classes must fall under the budget
        nonempty = selected[row] & (counts > 0)
        cell_scores = midx.scores(query)[0][row].repeat_interleave(K) + midx.scores(query)[1][row].repeat(K)
        last = torch.argmin(torch.where(nonempty, cell_scores, torch.tensor(math.inf)))
        assert held - int(counts[last]) < budget or held == N, f"row {row}: not the smallest prefix"
        support = torch.isfinite(ref[row]).nonzero().flatten()
        if support.numel() == 1:  # one class: every draw is it
            assert bool((ids[row] == support[0]).all())
            continue
        p_value, chi2, dof = chi_square_p_value(torch.bincount(ids[row], minlength=N), ref[row].exp() * draws)
        assert p_value > P_MIN, f"row {row}: chi2={chi2:.1f} dof={dof} p={p_value:.2e}"
    torch.testing.assert_close(log_q.double(), ref.gather(1, ids), atol=2e-5, rtol=0)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("budget", [1, 7, 40, 299, 10_000])
def test_top_cells_visit_equals_sort_based_prefix(bias, budget):
    """The multi-sequence visit (ops.midx_search_cells) selects exactly the cells that a sort of all
    K*K cell scores selects (the smallest prefix reaching the budget, empty cells dropped) and the
    same log mass, on queries whose cell scores have no ties; many cells are empty (K*K ~ N / 2)."""
    k, b = 12, 16
    w, bb = _weights(bias)
    midx = MIDXSampler(num_codewords=k, kmeans_iters=3).build(w, bb)
    top = TopCellsSampler(midx, budget=budget)
    query = _query(b=b, seed=5, scale=2.0)
    s1, s2 = midx.scores(query)
    cells = (s1.unsqueeze(2) + s2.unsqueeze(1)).reshape(b, k * k)  # the float32 sums the visit compares
    assert all(torch.unique(row).numel() == k * k for row in cells), "the input must be tie-free"
    counts = midx.offsets[1:] - midx.offsets[:-1]
    assert int((counts == 0).sum()) > 0
    order = torch.sort(cells, dim=1, descending=True).indices
    ranked_counts = counts[order]
    take = torch.cumsum(ranked_counts, 1) - ranked_counts < budget
    expected = torch.zeros(b, k * k, dtype=torch.bool).scatter_(1, order, take) & (counts > 0)
    selected, log_mass = top.selection(query)
    assert torch.equal(selected, expected)
    log_n = midx.log_n.reshape(k * k).double().expand(b, k * k)
    ref_mass = torch.logsumexp(torch.where(expected, log_n, -math.inf), 1)
    torch.testing.assert_close(log_mass.double(), ref_mass, atol=1e-5, rtol=0)
    # the draws and the targets' log Q see that same set
    ids, log_q = top.sample(query, 200, generator=torch.Generator().manual_seed(3))
    assert bool(expected.gather(1, midx.code1[ids].long() * k + midx.code2[ids].long()).all())
    all_lq = top.log_prob(query, torch.arange(N).expand(b, N))
    in_cells = expected.gather(1, (midx.code1.long() * k + midx.code2.long()).expand(b, N))
    assert torch.equal(torch.isfinite(all_lq), in_cells)
    torch.testing.assert_close(log_q, all_lq.gather(1, ids), atol=0, rtol=0)


def test_same_generator_seed_same_draws():
    mix, _ = _mixture(with_top=True)
    query = _query()
    a = mix.sample(query, 50, generator=torch.Generator().manual_seed(7))
    b = mix.sample(query, 50, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# -- the in-batch frequency estimator ----------------------------------------------------------------
def test_frequency_estimator_converges_on_a_stream_with_known_rates():
    """Class j is in each step's batch with probability p_j, independently: its gaps are geometric
    with mean 1/p_j and variance (1-p_j)/p_j^2, and the first gap (counted from step 0) too. After
    n updates the EMA B has relative variance v_n = ((1-a)^(2n) + a^2 (1 - (1-a)^(2n)) / (1 - (1-a)^2))
    (1 - p); the mean of p_hat = 1/B over the 100 classes of a rate must lie within 6 standard
    deviations (plus the Jensen bias v_n of 1/B) of p_j."""
    rates = [0.5, 0.2, 0.05, 0.02]
    per_rate, steps, alpha = 100, 10_000, 0.01
    n = per_rate * len(rates)
    p = torch.tensor(rates, dtype=torch.float64).repeat_interleave(per_rate)
    est = InBatchSampler(n, alpha=alpha)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        present = torch.rand(n, generator=g, dtype=torch.float64) < p
        est.observe(present.nonzero().flatten())
    p_hat = est.log_p_hat(torch.arange(n)).exp()
    for i, rate in enumerate(rates):
        updates = rate * steps - 1
        decay = (1 - alpha) ** (2 * updates)
        v = (decay + alpha ** 2 * (1 - decay) / (1 - (1 - alpha) ** 2)) * (1 - rate)
        tol = 6 * math.sqrt(v / per_rate) + v
        mean = float(p_hat[i * per_rate:(i + 1) * per_rate].mean())
        assert abs(mean / rate - 1) < tol, f"rate {rate}: mean p_hat {mean:.4g}, tolerance {tol:.3g}"
    # the normalizer is the sum of the estimates (kept incrementally)
    assert abs(est.log_normalizer() - math.log(float(p_hat.sum()))) < 1e-9


# -- errors -------------------------------------------------------------------------------------------
def test_bad_input_errors():
    midx = _midx()
    with pytest.raises(ValueError, match="sum to 1"):
        MixtureSampler([(midx, 0.5), (UniformSampler(N), 0.4)])
    with pytest.raises(ValueError, match="weight"):
        MixtureSampler([(midx, 1.0), (UniformSampler(N), 0.0)])
    with pytest.raises(ValueError, match="weight"):
        MixtureSampler([(midx, 1.5), (UniformSampler(N), -0.5)])
    with pytest.raises(ValueError, match="num_classes"):
        MixtureSampler([(midx, 0.5), (UniformSampler(N + 1), 0.5)])
    with pytest.raises(ValueError, match="num_classes"):
        MixtureSampler([(UniformSampler(10), 0.5), (UniformSampler(20), 0.5)])
    unbuilt = MixtureSampler([(MIDXSampler(num_codewords=K), 0.5), (UniformSampler(N + 1), 0.5)])
    with pytest.raises(ValueError, match=str(N + 1)):
        unbuilt.build(*_weights())
    with pytest.raises(RuntimeError, match="build"):
        MixtureSampler([(MIDXSampler(num_codewords=K), 1.0)]).sample(_query(), 3)
    with pytest.raises(TypeError, match="Sampler"):
        MixtureSampler([("midx", 1.0)])
    with pytest.raises(ValueError, match="at least one"):
        MixtureSampler([])
    with pytest.raises(ValueError, match="positive probability"):
        MixtureSampler([(TopCellsSampler(midx, budget=10), 1.0)])
    with pytest.raises(TypeError, match="mix_with"):
        MixtureSampler([(InBatchSampler(N), 0.5), (midx, 0.5)])
    with pytest.raises(ValueError, match="budget"):
        TopCellsSampler(midx, budget=0)
    with pytest.raises(TypeError, match="MIDXSampler"):
        TopCellsSampler(UniformSampler(N))
    with pytest.raises(ValueError, match="alpha"):
        InBatchSampler(N, alpha=0.0)
    with pytest.raises(ValueError, match="same classes"):
        InBatchSampler(N + 1, mix_with=midx)
    inb = InBatchSampler(N).build(*_weights())
    with pytest.raises(ValueError, match="num_samples=0"):
        inb.sample_with_targets(_query(), 5, torch.zeros(4, 1, dtype=torch.int64))
    with pytest.raises(TypeError, match="sample_with_targets"):
        inb.sample(_query(), 0)
    with pytest.raises(IndexError, match="outside"):
        inb.sample_with_targets(_query(), 0, torch.full((4, 1), N, dtype=torch.int64))
    mix, _ = _mixture()
    with pytest.raises(IndexError, match="outside"):
        mix.log_prob(_query(), torch.full((4, 2), -1, dtype=torch.int64))


# -- inside IMISoftmax --------------------------------------------------------------------------------
def _head_sampler(kind):
    if kind == "mixture":
        midx = MIDXSampler(num_codewords=K, kmeans_iters=2)
        return MixtureSampler([(midx, 0.8), (UnigramSampler(_counts()), 0.1), (UniformSampler(N), 0.1)]), 16
    if kind == "hard":
        midx = MIDXSampler(num_codewords=K, kmeans_iters=2)
        return MixtureSampler([(midx, 0.9), (TopCellsSampler(midx, budget=30), 0.1)]), 16
    if kind == "in_batch":
        return InBatchSampler(N), 0
    return InBatchSampler(N, mix_with=MIDXSampler(num_codewords=K, kmeans_iters=2)), 16


@pytest.mark.parametrize("kind", ["mixture", "hard", "in_batch", "in_batch_midx"])
def test_trains_inside_imisoftmax(kind):
    torch.manual_seed(0)
    sampler, m = _head_sampler(kind)
    head = IMISoftmax(D, N, num_samples=m, sampler=sampler, refresh_every=10)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    # a learnable map: target = class whose weight row best matches a fixed random projection of x
    proj = torch.randn(D, N, generator=g)
    losses = []
    for step in range(30):
        x = torch.randn(32, D, generator=g)
        y = (x @ proj).argmax(1)
        y[:2] = -100  # ignored rows: no loss, no in-batch negative
        x.requires_grad_()
        loss = head(x, y)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        assert x.grad is not None and bool(x.grad[2:].abs().sum() > 0) and bool((x.grad[:2] == 0).all())
        assert head.weight.grad is not None and bool(head.weight.grad.abs().sum() > 0)
        opt.step()
        losses.append(float(loss.detach()))
    first, last = sum(losses[:6]) / 6, sum(losses[-6:]) / 6
    assert last < first, f"{kind}: mean loss of the first 6 steps {first:.3f}, of the last 6 {last:.3f}"
    logits, ids = head.sampled_logits(torch.randn(5, D, generator=g), torch.randint(0, N, (5,), generator=g))
    assert ids.shape[0] == 5 and logits.shape == (5, 1 + ids.shape[1])


@pytest.mark.parametrize("kind", ["mixture", "hard", "in_batch_midx"])
def test_state_dict_round_trip_gives_the_same_draws(kind, tmp_path):
    torch.manual_seed(0)
    sampler, m = _head_sampler(kind)
    head = IMISoftmax(D, N, num_samples=m, sampler=sampler, refresh_every=0)
    x, y = torch.randn(8, D), torch.randint(0, N, (8,))
    head(x, y).backward()
    path = tmp_path / "head.pt"
    torch.save(head.state_dict(), path)
    sampler2, _ = _head_sampler(kind)
    head2 = IMISoftmax(D, N, num_samples=m, sampler=sampler2, refresh_every=0)
    head2.load_state_dict(torch.load(path, weights_only=True))
    assert not head2._index_stale
    a = head.sampled_logits(x, y, generator=torch.Generator().manual_seed(4))
    b = head2.sampled_logits(x, y, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a[1], b[1])
    torch.testing.assert_close(a[0], b[0], atol=0, rtol=0)


def test_composed_samplers_on_device(device):
    """Built on the device (CUDA where there is one): normalized, and each draw's log Q is log_prob."""
    w, b = (t.to(device) for t in _weights())
    midx = MIDXSampler(num_codewords=K, kmeans_iters=3)
    mix = MixtureSampler([(midx, 0.8), (TopCellsSampler(midx, budget=40), 0.1), (UniformSampler(N), 0.1)]).build(w, b)
    inb = InBatchSampler(N, mix_with=mix).build(w, b).to(device)
    query = _query().to(device)
    g = torch.Generator(device=device).manual_seed(0)
    lq = mix.log_prob(query, torch.arange(N, device=device).expand(4, N))
    assert lq.device.type == device.type and torch.logsumexp(lq.double(), 1).abs().max() < 1e-5
    ids, log_q = mix.sample(query, 32, generator=g)
    assert ids.device.type == device.type
    torch.testing.assert_close(log_q, mix.log_prob(query, ids), atol=0, rtol=0)
    targets = torch.randint(0, N, (4, 1), device=device, generator=g)
    ids, log_q, _ = inb.sample_with_targets(query, 8, targets, generator=g)
    torch.testing.assert_close(log_q, inb.log_prob(query, ids), atol=0, rtol=0)
