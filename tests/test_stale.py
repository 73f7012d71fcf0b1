"""imi_softmax.stale: the embedding corrector, the stale-cache index schedule, and the exactness of the
two-tower loss path (fresh vectors of the step's items on a local weight, log Q of the index used)."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import reference_loss, reference_midx_log_q
from imi_softmax import MIDXSampler
from imi_softmax.stale import EmbeddingCorrector, StaleEmbeddingIndex, fresh_sampled_softmax_loss

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def synthetic_drift(n=3000, d=16, seed=0):
    """Cached vectors X and their 'current' versions Y = X A + 0.5 tanh(X B): a smooth drift that a
    residual MLP can learn and the identity cannot."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    a = torch.eye(d) + 0.3 * torch.randn(d, d, generator=g) / d ** 0.5
    b = torch.randn(d, d, generator=g) / d ** 0.5
    y = x @ a + 0.5 * torch.tanh(x @ b)
    return x, y


def mse64(pred, y):
    return float((pred.double() - y.double()).pow(2).mean())


# -- corrector ---------------------------------------------------------------------------------------
def test_corrector_starts_as_identity():
    x, y = synthetic_drift(200)
    c = EmbeddingCorrector(16)
    assert torch.equal(c(x), x)
    assert c.error(x, y) == pytest.approx(mse64(x, y), rel=1e-5)


def test_corrector_trains_to_lower_error_on_synthetic_drift():
    torch.manual_seed(0)
    x, y = synthetic_drift()
    train, held = torch.arange(2400), torch.arange(2400, 3000)  # held-out items: it learns the map, not rows
    c = EmbeddingCorrector(16, 64, lr=3e-3)
    before_held = mse64(x[held], y[held])
    g = torch.Generator().manual_seed(1)
    for _ in range(400):
        ids = train[torch.randint(0, len(train), (256,), generator=g)]
        ref = mse64(c(x[ids]).detach(), y[ids])
        got = c.fit_step(x[ids], y[ids])
        assert got == pytest.approx(ref, rel=1e-4)  # fit_step reports the error before its update
    with torch.no_grad():
        after_held = mse64(c(x[held]), y[held])
        after_train = mse64(c(x[train]), y[train])
    assert after_held < 0.25 * before_held, (before_held, after_held)
    assert after_train < 0.25 * mse64(x[train], y[train])
    assert c.num_updates == 400


def test_corrector_state_dict_resumes_bit_exactly():
    x, y = synthetic_drift(512)
    a = EmbeddingCorrector(16, lr=1e-2)
    for s in range(0, 256, 64):
        a.fit_step(x[s:s + 64], y[s:s + 64])
    b = EmbeddingCorrector(16, lr=1e-2)
    b.load_state_dict(a.state_dict())
    assert b.num_updates == a.num_updates
    for s in range(256, 512, 64):  # Adam moments came along: same next steps
        assert a.fit_step(x[s:s + 64], y[s:s + 64]) == b.fit_step(x[s:s + 64], y[s:s + 64])
    assert torch.equal(a(x), b(x))


def test_corrector_reset_is_identity_again():
    x, y = synthetic_drift(128)
    c = EmbeddingCorrector(16, lr=1e-2)
    c.fit_step(x, y)
    assert not torch.equal(c(x), x)
    c.reset()
    assert torch.equal(c(x), x) and c.num_updates == 0


def test_index_reset_on_refresh():
    """With reset_on_refresh, every refresh after the first puts the corrector back to the identity;
    without, the corrector keeps what it learned."""
    x, y = synthetic_drift(100, 8)
    for reset in (False, True):
        c = EmbeddingCorrector(8, lr=1e-2)
        idx = StaleEmbeddingIndex(MIDXSampler(4, kmeans_iters=1), 3, c, correct_every=5, reset_on_refresh=reset)
        idx.begin_step(lambda: x)
        idx.observe(torch.arange(100), y)
        idx.begin_step(lambda: x)
        idx.begin_step(lambda: x)
        assert not torch.equal(c(x), x)
        assert idx.begin_step(lambda: x) == "refresh"
        assert torch.equal(c(x), x) == reset


def test_corrector_device_dtype_kwargs():
    c = EmbeddingCorrector(8, device="cpu", dtype=torch.float64)
    assert c.mlp[0].weight.dtype == torch.float64
    assert c(torch.randn(3, 8)).dtype == torch.float64
    assert "embedding_dim=8" in repr(c)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(embedding_dim=0), ValueError, "embedding_dim must be >= 1"),
    (dict(embedding_dim=4.0), TypeError, "embedding_dim must be an int"),
    (dict(embedding_dim=4, hidden=0), ValueError, "hidden must be >= 1"),
    (dict(embedding_dim=4, lr=0.0), ValueError, "lr must be a positive number"),
])
def test_corrector_constructor_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        EmbeddingCorrector(**kwargs)


def test_corrector_shape_errors():
    c = EmbeddingCorrector(4)
    with pytest.raises(ValueError, match=r"cached must be \[\*, 4\]"):
        c(torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"fresh must be \[N, 4\]"):
        c.fit_step(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="must be the same items"):
        c.fit_step(torch.randn(3, 4), torch.randn(2, 4))
    with pytest.raises(TypeError, match="cached must have dtype"):
        c.fit_step(torch.zeros(3, 4, dtype=torch.int64), torch.randn(3, 4))
    with pytest.raises(ValueError, match="fresh contains NaN"):
        c.fit_step(torch.randn(3, 4), torch.full((3, 4), float("nan")))


# -- the stale index ------------------------------------------------------------------------------
class CountingEncoder:
    def __init__(self, w):
        self.w, self.calls = w, 0

    def __call__(self):
        self.calls += 1
        return self.w


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(refresh_every=0), ValueError, "refresh_every must be >= 1, got 0"),
    (dict(refresh_every=-5), ValueError, "refresh_every must be >= 1, got -5"),
    (dict(refresh_every=2.5), TypeError, "refresh_every must be an int"),
    (dict(refresh_every=10, correct_every=0), ValueError, "correct_every must be >= 1"),
    (dict(refresh_every=10, corrector="mlp"), TypeError, "corrector must be an EmbeddingCorrector"),
    (dict(refresh_every=10, reset_on_refresh=1), TypeError, "reset_on_refresh must be a bool"),
])
def test_index_constructor_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        StaleEmbeddingIndex(MIDXSampler(4), **kwargs)


def test_index_rejects_non_sampler():
    with pytest.raises(TypeError, match="sampler must be a Sampler"):
        StaleEmbeddingIndex(object(), 5)


def test_index_shape_errors():
    w = torch.randn(50, 6)
    idx = StaleEmbeddingIndex(MIDXSampler(4), 5, EmbeddingCorrector(6))
    with pytest.raises(RuntimeError, match="call begin_step"):
        idx.observe(torch.arange(3), torch.randn(3, 6))
    with pytest.raises(ValueError, match=r"the corrector's embedding_dim"):
        idx.refresh(torch.randn(50, 5))
    idx.begin_step(lambda: w)
    with pytest.raises(ValueError, match=r"like the cache"):
        idx.refresh(torch.randn(49, 6))
    with pytest.raises(ValueError, match=r"fresh must be \[N, 6\]"):
        idx.observe(torch.arange(3), torch.randn(3, 7))
    with pytest.raises(ValueError, match="one row per id"):
        idx.observe(torch.arange(3), torch.randn(4, 6))
    with pytest.raises(TypeError, match="int64"):
        idx.observe(torch.arange(3, dtype=torch.int32), torch.randn(3, 6))
    with pytest.raises((ValueError, IndexError), match="ids"):
        idx.observe(torch.tensor([0, 50]), torch.randn(2, 6))


@pytest.mark.parametrize("with_corrector", [False, True])
def test_index_schedule(with_corrector):
    """Refresh at steps 0, T, 2T..., encode_all only then; with a corrector, a rebuild over
    corrector(cache) every correct_every steps in between; without, the index object stays put."""
    t, every = 7, 3
    enc = CountingEncoder(torch.randn(60, 4))
    idx = StaleEmbeddingIndex(MIDXSampler(4, kmeans_iters=2), t,
                              EmbeddingCorrector(4) if with_corrector else None, correct_every=every)
    actions = [idx.begin_step(enc) for _ in range(20)]
    want = []
    for s in range(20):
        since = s % t
        want.append("refresh" if since == 0 else ("corrected" if with_corrector and since % every == 0 else "none"))
    assert actions == want
    assert enc.calls == 3 and idx.num_refreshes == 3
    assert idx.num_corrected_builds == (want.count("corrected"))
    if not with_corrector:
        before = idx.sampler.index
        idx.begin_step(enc)  # step 20: not due
        assert idx.sampler.index is before


def test_corrected_index_is_built_over_corrector_outputs():
    torch.manual_seed(0)
    x, y = synthetic_drift(400, 8)
    c = EmbeddingCorrector(8, lr=1e-2)
    idx = StaleEmbeddingIndex(MIDXSampler(4, kmeans_iters=3, seed=3), 100, c, correct_every=2)
    idx.begin_step(lambda: x)
    for _ in range(20):
        idx.observe(torch.arange(400), y)
    idx.begin_step(lambda: x)  # step 1: nothing due
    idx.begin_step(lambda: x)  # step 2: rebuild over c(x)
    ref = MIDXSampler(4, kmeans_iters=3, seed=3)
    ref.build(x)
    with torch.no_grad():
        ref.build(c(x))  # the same warm start and generator path as the index's sampler
    got, want = idx.sampler.index, ref.index
    assert torch.equal(got.code1, want.code1) and torch.equal(got.code2, want.code2)
    assert torch.equal(got.codebook1, want.codebook1)


def test_index_state_dict_round_trip():
    w = torch.randn(80, 6)
    a = StaleEmbeddingIndex(MIDXSampler(4, kmeans_iters=2), 5, EmbeddingCorrector(6), correct_every=2)
    for _ in range(3):
        a.begin_step(lambda: w)
        a.observe(torch.arange(10), w[:10] + 0.1)
    b = StaleEmbeddingIndex(MIDXSampler(4, kmeans_iters=2), 5, EmbeddingCorrector(6), correct_every=2)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.cache, b.cache) and b.step == a.step == 3
    q = torch.randn(5, 6)
    ia, qa = a.sample(q, 9, generator=torch.Generator().manual_seed(4))
    ib, qb = b.sample(q, 9, generator=torch.Generator().manual_seed(4))
    assert torch.equal(ia, ib) and torch.equal(qa, qb)
    assert [a.begin_step(lambda: w) for _ in range(4)] == [b.begin_step(lambda: w) for _ in range(4)]


# -- the two-tower loss path ------------------------------------------------------------------------
def two_tower_setup(n=300, f=10, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, f, generator=g)
    enc = torch.nn.Linear(f, d)
    with torch.no_grad():
        enc.weight.copy_(torch.randn(d, f, generator=g) / f ** 0.5)
        enc.bias.copy_(0.1 * torch.randn(d, generator=g))
    return feats, enc


@pytest.mark.parametrize("with_corrector", [False, True])
def test_fresh_loss_log_q_is_the_index_actually_used(with_corrector):
    """The loss path's log Q equals the sampler's log_prob (and a float64 reference of the proposal)
    for the ids drawn, the ids map back through the local remap, the encoder saw only the step's
    unique items, and loss + gradients equal the same sampled loss on the full catalogue in float64."""
    torch.manual_seed(0)
    n, d, b, m = 300, 8, 12, 16
    feats, enc = two_tower_setup(n, d=d)
    idx = StaleEmbeddingIndex(MIDXSampler(8, kmeans_iters=3), 50,
                              EmbeddingCorrector(d, lr=1e-2) if with_corrector else None, correct_every=2)
    idx.begin_step(lambda: enc(feats).detach())
    with torch.no_grad():  # drift the encoder: the cache is now stale
        enc.weight.add_(0.3 * torch.randn_like(enc.weight))
    if with_corrector:
        for _ in range(5):
            idx.observe(torch.arange(n), enc(feats).detach())
        idx.begin_step(lambda: enc(feats).detach())
        assert idx.begin_step(lambda: enc(feats).detach()) == "corrected"
    q = torch.randn(b, d, requires_grad=True)
    target = torch.randint(0, n, (b,))
    seen = []

    def encode(ids):
        seen.append(ids.clone())
        return enc(feats[ids])

    out = fresh_sampled_softmax_loss(q, target, idx, encode, m, generator=torch.Generator().manual_seed(5))
    assert len(seen) == 1 and torch.equal(seen[0], out.unique_ids)
    assert torch.equal(out.unique_ids, torch.unique(torch.cat([target, out.sample_ids.reshape(-1)])))
    assert out.unique_ids.numel() < n  # the catalogue was not encoded
    assert torch.equal(out.unique_ids[out.local_samples], out.sample_ids)
    assert torch.equal(out.unique_ids[out.local_target], target)
    # log Q of the index the draws came from, not a recomputation over fresh vectors
    assert torch.equal(out.sample_log_q, idx.sampler.log_prob(q.detach(), out.sample_ids))
    assert torch.equal(out.target_log_q, idx.sampler.log_prob(q.detach(), target[:, None])[:, 0])
    ref_lq = reference_midx_log_q(idx.sampler, q.detach())
    torch.testing.assert_close(out.sample_log_q.double(), ref_lq.gather(1, out.sample_ids), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.target_log_q.double(), ref_lq.gather(1, target[:, None])[:, 0], atol=1e-5, rtol=0)
    # loss and gradients against the float64 formula over the full catalogue with the global ids
    out.loss.backward()
    q64 = q.detach().double().requires_grad_()
    enc64 = torch.nn.Linear(feats.shape[1], d).double()
    enc64.load_state_dict({k: v.double() for k, v in enc.state_dict().items()})
    w64 = enc64(feats.double())
    rows = reference_loss(q64, w64, None, target, out.sample_ids, out.sample_log_q, out.target_log_q)
    ref = rows.mean()
    ref.backward()
    assert float(out.loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    torch.testing.assert_close(q.grad.double(), q64.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(enc.weight.grad.double(), enc64.weight.grad, atol=1e-5, rtol=1e-4)


def test_fresh_loss_errors():
    feats, enc = two_tower_setup(50, d=4)
    s = MIDXSampler(4).build(enc(feats).detach())
    q = torch.randn(3, 4)
    good = lambda ids: enc(feats[ids])  # noqa: E731
    with pytest.raises(ValueError, match=r"target must be \[3\]"):
        fresh_sampled_softmax_loss(q, torch.zeros(4, dtype=torch.int64), s, good, 5)
    with pytest.raises(TypeError, match="target must hold int64"):
        fresh_sampled_softmax_loss(q, torch.zeros(3, dtype=torch.int32), s, good, 5)
    with pytest.raises((ValueError, IndexError), match="target"):
        fresh_sampled_softmax_loss(q, torch.tensor([0, 1, 50]), s, good, 5)
    with pytest.raises(ValueError, match=r"encode\(ids \[U\]\) must return \[U, 4\]"):
        fresh_sampled_softmax_loss(q, torch.zeros(3, dtype=torch.int64), s, lambda ids: torch.randn(2, 4), 5)
    with pytest.raises(ValueError, match="num_samples must be >= 0"):
        fresh_sampled_softmax_loss(q, torch.zeros(3, dtype=torch.int64), s, good, -1)
    with pytest.raises(RuntimeError, match="no index yet"):
        fresh_sampled_softmax_loss(q, torch.zeros(3, dtype=torch.int64), MIDXSampler(4), good, 5)


# -- the example ------------------------------------------------------------------------------------
def test_two_tower_example_smoke():
    from examples.recommender.data import Interactions, make_split
    from examples.two_tower.train import StaleConfig, train_stale

    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(120), 12)
    items = (rng.zipf(1.3, users.size) - 1) % 200
    data = Interactions(users.astype(np.int64), items.astype(np.int64), 120, 200, "toy")
    split = make_split(data, 0.2, 0)
    cfg = StaleConfig(refresh_every=4, corrector=True, correct_every=2, num_samples=8, num_codewords=4,
                      kmeans_iters=2, dim=8, feature_dim=6, epochs=1, batch_users=16, targets_per_user=2,
                      probe_users=20, probe_every=3, max_steps=7, progress=False)
    res = train_stale(cfg, split, log=None)
    assert res["steps"] == 7 and res["refreshes"] == 2  # steps 0 and 4
    assert res["corrected_builds"] == 2                  # steps 2 and 6
    assert [p["step"] for p in res["probes"]] == [0, 3, 6]
    assert all(p["kl"] >= -1e-6 for p in res["probes"])
    assert 0 <= res["metrics"]["ndcg@10"] <= 1
    assert res["encoded_items_mean"] <= 200
