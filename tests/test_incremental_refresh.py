"""Incremental index refresh: the update_cells op equals build_cells on the new codes bit for bit,
MIDXSampler.update re-assigns exactly the changed rows against the frozen codebooks, log Q stays
exact for the index in use, and the head's touched set, schedule and checkpoints are right."""
import io

import pytest
import torch

from imi_softmax import IMISoftmax, MIDXSampler, _fallback as fb, ops
from imi_softmax.kmeans import assign, assign_residual
from conftest import random_index, reference_midx_log_q

CELL_NAMES = ("offsets", "class_ids", "alias_prob", "alias_pos", "beta_csr", "log_n", "cell_mass", "log_n_max")


def _update_args(old, cells, changed, new1, new2, new_beta):
    code1, code2, beta = old
    return (*cells[:5], *cells[5:], code1, code2, beta, changed, new1, new2, new_beta)


def _random_change(n, k, count, bias, seed, beta_scale=2.0):
    g = torch.Generator().manual_seed(seed)
    changed = torch.randperm(n, generator=g)[:count].sort().values
    new1 = torch.randint(0, k, (count,), generator=g).int()  # the index's codes are int32
    new2 = torch.randint(0, k, (count,), generator=g).int()
    new_beta = torch.randn(count, generator=g) * beta_scale if bias else None
    return changed, new1, new2, new_beta


def _expected(old, changed, new1, new2, new_beta, k):
    code1, code2, beta = (t.clone() if t is not None else None for t in old)
    code1[changed], code2[changed] = new1, new2
    if beta is not None:
        beta[changed] = new_beta
    return (code1, code2, beta), ops.build_cells(code1, code2, beta, k)


def _assert_update_equals_build(got, old, changed, new1, new2, new_beta, k, bias):
    (code1, code2, beta), cells = _expected(old, changed, new1, new2, new_beta, k)
    assert torch.equal(got[0], code1) and torch.equal(got[1], code2)
    assert torch.equal(got[2], beta) if bias else got[2].numel() == 0
    for name, a, b in zip(CELL_NAMES, got[3:], cells):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a, b), name


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("n, k, count", [(500, 4, 0), (500, 4, 1), (500, 4, 37), (500, 4, 500),
                                          (2000, 8, 200), (60, 16, 30)])  # (60, 16): mostly empty cells
def test_update_cells_equals_build_cells(device, bias, n, k, count):
    old, cells = random_index(n, k, bias, seed=n + count, device=device)
    changed, new1, new2, new_beta = (None if t is None else t.to(device)
                                     for t in _random_change(n, k, count, bias, seed=count))
    got = ops.update_cells(*_update_args(old, cells, changed, new1, new2, new_beta, ), k)
    _assert_update_equals_build(got, old, changed, new1, new2, new_beta, k, bias)


def test_update_cells_when_the_largest_cell_mass_changes(device):
    """A new bias that raises log_n_max rescales every cell's scaled mass; one that lowers it too."""
    n, k = 400, 4
    old, cells = random_index(n, k, True, seed=5, device=device)
    for scale in (50.0, 0.01):
        changed, new1, new2, new_beta = (t.to(device) for t in _random_change(n, k, 10, True, 6, scale))
        got = ops.update_cells(*_update_args(old, cells, changed, new1, new2, new_beta), k)
        _assert_update_equals_build(got, old, changed, new1, new2, new_beta, k, True)
        old, cells = got[:3], got[3:]  # chain: updates of updates


def test_update_cells_fallback_matches():
    n, k = 700, 5
    for bias in (True, False):
        old, cells = random_index(n, k, bias, seed=11)
        change = _random_change(n, k, 90, bias, 12)
        got = fb.update_cells(*_update_args(old, cells, *change), k)
        want = ops.update_cells(*_update_args(old, cells, *change), k)
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("impl", ["ops", "fallback"])
def test_update_cells_refuses_bad_input(impl):
    fn = ops.update_cells if impl == "ops" else fb.update_cells
    n, k = 100, 4
    old, cells = random_index(n, k, True, seed=1)
    changed, new1, new2, new_beta = _random_change(n, k, 5, True, 2)

    def call(**kw):
        args = dict(changed=changed, new1=new1, new2=new2, new_beta=new_beta)
        args.update(kw)
        return fn(*_update_args(old, cells, args["changed"], args["new1"], args["new2"], args["new_beta"]), k)

    with pytest.raises(RuntimeError, match="strictly ascending"):
        call(changed=changed.flip(0))
    with pytest.raises(RuntimeError, match="strictly ascending"):
        call(changed=torch.tensor([3, 3, 4, 5, 6]))
    with pytest.raises(RuntimeError, match="changed"):
        call(changed=torch.tensor([1, 2, 3, 4, n]))
    with pytest.raises(RuntimeError, match="out of range"):
        call(new1=torch.tensor([0, 1, k, 0, 0], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="new_code1"):
        call(new1=new1[:3])
    with pytest.raises(RuntimeError, match="new_beta"):
        call(new_beta=None)
    with pytest.raises(RuntimeError, match="new_beta"):
        call(new_beta=new_beta.double())


@pytest.mark.parametrize("impl", ["ops", "fallback"])
def test_update_cells_refuses_codes_that_do_not_match_the_index(impl):
    """The fallback rebuilds from the codes, but refuses such an index as the kernel does."""
    fn = ops.update_cells if impl == "ops" else fb.update_cells
    n, k = 100, 4
    (code1, code2, beta), cells = random_index(n, k, True, seed=1)
    changed, new1, new2, new_beta = _random_change(n, k, 5, True, 2)
    wrong = code1.clone()
    wrong[changed] = (wrong[changed] + 1) % k  # not the codes the cells were built from
    with pytest.raises(RuntimeError, match="old"):
        fn(*_update_args((wrong, code2, beta), cells, changed, new1, new2, new_beta), k)


# -- the sampler ----------------------------------------------------------------------------------
def _built_sampler(quantizer, bias, n=900, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, d, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    s = MIDXSampler(num_codewords=5, quantizer=quantizer, kmeans_iters=4).build(w, b)
    return s, w, b


def _perturb(w, b, changed, seed):
    g = torch.Generator().manual_seed(seed)
    w, b = w.clone(), None if b is None else b.clone()
    w[changed] += torch.randn(len(changed), w.shape[1], generator=g) * 1.5
    if b is not None:
        b[changed] += torch.randn(len(changed), generator=g)
    return w, b


def _frozen_assignment(s, w):
    c1, c2 = s.codebooks
    if s.quantizer == "rq":
        a1, _ = assign(w, c1)
        return a1, assign_residual(w, c1, a1, c2)
    h = w.shape[1] // 2
    return assign(w[:, :h].contiguous(), c1)[0], assign(w[:, h:].contiguous(), c2)[0]


@pytest.mark.parametrize("quantizer", ["rq", "pq"])
@pytest.mark.parametrize("bias", [True, False])
def test_sampler_update_reassigns_only_the_changed_rows(quantizer, bias):
    """(The codes do not depend on the block of rows that computes them: tests/test_assign_rows.py.)"""
    s, w, b = _built_sampler(quantizer, bias)
    old = s.index
    changed = torch.randperm(w.shape[0], generator=torch.Generator().manual_seed(1))[:90]
    w2, b2 = _perturb(w, b, changed, 2)
    gen_state = s._generator.get_state()
    s.update(w2, b2, torch.cat([changed, changed[:5]]))  # repeats are fine
    new = s.index
    assert new is not old and torch.equal(s._generator.get_state(), gen_state)  # no k-means ran
    assert new.codebook1 is old.codebook1 and new.codebook2 is old.codebook2  # frozen
    full1, full2 = _frozen_assignment(s, w2)  # what a full assignment with these codebooks gives
    mask = torch.zeros(w.shape[0], dtype=torch.bool)
    mask[changed] = True
    assert torch.equal(new.code1[mask], full1[mask]) and torch.equal(new.code2[mask], full2[mask])
    assert torch.equal(new.code1[~mask], old.code1[~mask]) and torch.equal(new.code2[~mask], old.code2[~mask])
    assert (new.code1[mask] != old.code1[mask]).any() or (new.code2[mask] != old.code2[mask]).any()
    if bias:
        want_beta = old.beta.clone()
        want_beta[mask] = b2[mask]
        assert torch.equal(new.beta, want_beta)
    cells = ops.build_cells(new.code1, new.code2, new.beta, s.num_codewords)
    got = (new.offsets, new.class_ids, new.alias_prob, new.alias_pos, new.beta_csr, new.log_n, new.cell_mass,
           new.log_n_max)
    for name, a, c in zip(CELL_NAMES, got, cells):
        if a is None:
            assert not bias and name in ("alias_prob", "alias_pos", "beta_csr")
            continue
        assert torch.equal(a, c), name


@pytest.mark.parametrize("quantizer", ["rq", "pq"])
@pytest.mark.parametrize("bias", [True, False])
def test_log_q_is_exact_for_the_updated_index(quantizer, bias):
    s, w, b = _built_sampler(quantizer, bias, n=700)
    for step in range(3):  # chained incremental updates
        changed = torch.randint(0, w.shape[0], (60,), generator=torch.Generator().manual_seed(step))
        w, b = _perturb(w, b, changed, 10 + step)
        s.update(w, b, changed)
    q = torch.randn(6, w.shape[1], generator=torch.Generator().manual_seed(7)) * 2
    all_ids = torch.arange(w.shape[0]).expand(6, -1)
    lp = s.log_prob(q, all_ids)
    assert torch.logsumexp(lp.double(), 1).abs().max() < 1e-5
    torch.testing.assert_close(lp.double(), reference_midx_log_q(s, q), rtol=0, atol=2e-5)
    ids, log_q = s.sample(q, 300, generator=torch.Generator().manual_seed(3))
    assert torch.equal(log_q, s.log_prob(q, ids))


def test_sampler_update_refuses_what_needs_a_full_build():
    s, w, b = _built_sampler("rq", True, n=200)
    ok = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="full build"):
        s.update(w[:100], b[:100], ok)
    with pytest.raises(ValueError, match="bias must be given exactly"):
        s.update(w, None, ok)
    with pytest.raises(IndexError, match="changed has class id 200"):
        s.update(w, b, torch.tensor([1, 200]))
    with pytest.raises(TypeError, match="int64"):
        s.update(w, b, ok.int())
    with pytest.raises(RuntimeError, match="no index"):
        MIDXSampler(4).update(w, b, ok)


# -- the head -------------------------------------------------------------------------------------
N, D = 400, 8


def _head(full_refresh_every=4, refresh_every=2, bias=True, seed=0):
    torch.manual_seed(seed)
    return IMISoftmax(D, N, bias=bias, num_samples=16, num_codewords=4, refresh_every=refresh_every,
                      full_refresh_every=full_refresh_every, kmeans_iters=2).train()


def _data(steps, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(24, D, generator=g), torch.randint(0, N, (24,), generator=g)) for _ in range(steps)]


def test_head_tracks_targets_and_samples():
    head = _head(refresh_every=0)
    head.refresh_index()
    x, y = _data(1)[0]
    y[3] = -100
    _, ids = head.sampled_logits(x, y)
    want = torch.zeros(N, dtype=torch.bool)
    want[ids.flatten()] = True
    want[y[y >= 0]] = True
    want[0] = True  # ignored rows are drawn for class 0 (a harmless extra refresh)
    assert torch.equal(head._touched, want)


def test_head_schedule_full_every_k_refreshes(monkeypatch):
    head = _head(full_refresh_every=3, refresh_every=1)
    calls = []
    build, update = head.sampler.build, head.sampler.update
    monkeypatch.setattr(head.sampler, "build", lambda *a: calls.append("full") or build(*a))
    monkeypatch.setattr(head.sampler, "update", lambda *a: calls.append("inc") or update(*a))
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    for x, y in _data(7):
        opt.zero_grad()
        head(x, y).backward()
        opt.step()
    assert calls == ["full", "inc", "inc", "full", "inc", "inc", "full"]
    head.refresh_index(full=True)
    head.refresh_index()
    assert calls[-2:] == ["full", "inc"]
    head.full_refresh_every = 0  # every refresh full: nothing tracked
    head.refresh_index()
    assert calls[-1] == "full" and head._touched is None


def test_incremental_refresh_updates_only_touched_rows_of_the_head():
    head = _head(full_refresh_every=10, refresh_every=0)
    head.refresh_index()
    before = head.sampler.index
    opt = torch.optim.SGD(head.parameters(), lr=0.5)  # row-sparse in effect: only touched rows move
    for x, y in _data(2):
        opt.zero_grad()
        head(x, y).backward()
        opt.step()
    touched = head._touched.clone()
    moved = (head.weight.grad.abs().sum(1) > 0)
    assert bool((touched | ~moved).all())  # every row with a gradient was recorded
    head.refresh_index()
    after = head.sampler.index
    assert after.codebook1 is before.codebook1
    full1, full2 = _frozen_assignment(head.sampler, head.weight.detach())
    assert torch.equal(after.code1[touched], full1[touched]) and torch.equal(after.code2[touched], full2[touched])
    assert torch.equal(after.code1[~touched], before.code1[~touched])
    assert torch.equal(after.beta[touched], head.bias.detach()[touched])
    assert not head._touched.any()  # a fresh set after the refresh


def _save_load(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_resume_between_incremental_refreshes_is_bit_exact():
    data = _data(9)

    def train(head, opt, batches):
        out = []
        for x, y in batches:
            opt.zero_grad()
            loss = head(x, y)
            loss.backward()
            opt.step()
            out.append(loss.detach())
        return out

    head = _head(full_refresh_every=3, refresh_every=2)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    torch.manual_seed(1234)
    full = train(head, opt, data)
    final = head.sampler.index

    head = _head(full_refresh_every=3, refresh_every=2)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    torch.manual_seed(1234)
    first = train(head, opt, data[:5])  # refreshes at calls 0 (full), 2 (inc), 4 (inc): next is full at 6
    assert head._refreshes_since_full == 2 and head._touched.any()
    ckpt = _save_load({"head": head.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state()})
    fresh = _head(full_refresh_every=3, refresh_every=2, seed=9)
    opt = torch.optim.Adam(fresh.parameters(), lr=0.05)
    fresh.load_state_dict(ckpt["head"])
    opt.load_state_dict(ckpt["opt"])
    torch.set_rng_state(ckpt["rng"])
    rest = train(fresh, opt, data[5:])
    for i, (a, b) in enumerate(zip(full, first + rest)):
        assert torch.equal(a, b), f"step {i}"
    for name, a in final._asdict().items():
        b = getattr(fresh.sampler.index, name)
        assert (a == b) if not isinstance(a, torch.Tensor) else torch.equal(a, b), name


def test_resume_would_differ_without_the_touched_set(monkeypatch):
    """Dropping the saved touched set (an old checkpoint) makes the next refresh full instead, so the
    test above does pin it."""
    head = _head(full_refresh_every=3, refresh_every=0)
    head.refresh_index()
    for x, y in _data(1):
        head(x, y).backward()
    state = head.state_dict()
    state["_extra_state"] = {k: v for k, v in state["_extra_state"].items() if k != "touched"}
    fresh = _head(full_refresh_every=3, refresh_every=0, seed=3)
    fresh.load_state_dict(state)
    assert fresh._touched is None
    calls = []
    build = fresh.sampler.build
    monkeypatch.setattr(fresh.sampler, "build", lambda *a: calls.append("full") or build(*a))
    fresh.refresh_index()
    assert calls == ["full"]


@pytest.mark.parametrize("bad, exc", [(-1, ValueError), (2.0, TypeError), (True, TypeError), ("3", TypeError)])
def test_full_refresh_every_validation(bad, exc):
    with pytest.raises(exc, match="full_refresh_every"):
        IMISoftmax(D, N, full_refresh_every=bad)
    head = IMISoftmax(D, N)
    with pytest.raises(exc, match="full_refresh_every"):
        head.full_refresh_every = bad
    assert head.full_refresh_every == 10 and "full_refresh_every=10" in repr(head)


def test_touched_set_of_wrong_size_is_refused_on_load():
    head = _head()
    head.refresh_index()
    state = head.state_dict()
    state["_extra_state"]["touched"] = torch.zeros(N + 1, dtype=torch.bool)
    with pytest.raises(ValueError, match="touched"):
        _head().load_state_dict(state)
