"""Trust in training jobs: safe concurrent refresh, autocast, from_linear adoption, clear errors."""
import threading

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from imi_softmax import ExactSampler, IMISoftmax, MIDXSampler, UniformSampler, UnigramSampler

BF16_EPS = 2.0 ** -8  # unit roundoff of bfloat16 (8 significant bits)


def _reference_log_q(index, query):
    """float64 log Q(i | query) over all classes from one index snapshot (DESIGN.md, "Proposal")."""
    q = query.double()
    s1, s2 = q @ index.codebook1.double().T, q @ index.codebook2.double().T
    logits = s1[:, index.code1] + s2[:, index.code2]
    if index.beta is not None:
        logits = logits + index.beta.double()
    return torch.log_softmax(logits, dim=1)


# -- safe refresh -------------------------------------------------------------------------------
def test_rebuild_while_sampling_never_exposes_a_half_built_index():
    """A thread rebuilds the index in a loop from two very different weight sets while the main
    thread samples. Every sample call must be consistent with ONE index built around that call:
    its log_q equals that snapshot's exact log Q of the drawn ids. A torn read (codebooks of one
    build, cells/masses of another) matches no snapshot."""
    torch.manual_seed(0)
    n, d = 300, 12
    weights = [(torch.randn(n, d), torch.randn(n)), (3 * torch.randn(n, d) + 1, 2 * torch.randn(n))]
    sampler = MIDXSampler(8, kmeans_iters=1)
    sampler.build(*weights[0])
    built = [sampler.index]
    stop = threading.Event()
    errors = []

    def rebuild():
        i = 1
        try:
            while not stop.is_set():
                sampler.build(*weights[i % 2])
                built.append(sampler.index)  # only this thread builds: this is the index it swapped in
                i += 1
        except Exception as exc:  # surfaced in the main thread
            errors.append(exc)

    query = torch.randn(48, d)
    records = []
    thread = threading.Thread(target=rebuild, daemon=True)
    thread.start()
    try:
        for _ in range(20000):  # bounded; normally ends once 60 rebuilds overlapped sampling
            first = len(built) - 1  # the index read by sample() is built[first] or a later one
            ids, log_q = sampler.sample(query, 16)
            lp_ids = torch.randint(0, n, (48, 5))
            lp = sampler.log_prob(query, lp_ids)
            records.append((first, len(built), ids, log_q, lp_ids, lp))
            if len(built) >= 60 or errors:
                break
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not errors, errors
    assert len(built) >= 60, "the rebuild thread made too little progress to test anything"
    refs = [_reference_log_q(index, query) for index in built]
    for first, last, ids, log_q, lp_ids, lp in records:
        # the index used was swapped in before the call returned; at most one swap is not yet
        # appended when len(built) is read, hence last + 1
        candidates = range(first, min(last + 1, len(built)))
        assert any(torch.allclose(log_q.double(), refs[c].gather(1, ids), atol=1e-4) for c in candidates)
        assert any(torch.allclose(lp.double(), refs[c].gather(1, lp_ids), atol=1e-4) for c in candidates)
    # the two weight sets give different proposals, so a mix of snapshots would have been caught
    assert (refs[0] - refs[1]).abs().max() > 0.5


@pytest.mark.parametrize("method", ["sample", "log_prob"])
def test_a_rebuild_during_a_call_does_not_change_what_that_call_uses(monkeypatch, method):
    """Deterministic version of the race: a rebuild lands right after the call computed its
    codeword scores (where an index read attribute by attribute would mix two builds)."""
    torch.manual_seed(0)
    n, d = 200, 10
    sampler = MIDXSampler(4, kmeans_iters=1).build(torch.randn(n, d), torch.randn(n))
    before = sampler.index
    query = torch.randn(8, d)
    original = MIDXSampler.scores

    def scores_then_rebuild(self, q, index=None, **kw):
        out = original(self, q, index, **kw)
        self.build(3 * torch.randn(n, d) + 1, 2 * torch.randn(n))
        return out

    monkeypatch.setattr(MIDXSampler, "scores", scores_then_rebuild)
    ref = _reference_log_q(before, query)
    if method == "sample":
        ids, log_q = sampler.sample(query, 64)
    else:
        ids = torch.randint(0, n, (8, 64))
        log_q = sampler.log_prob(query, ids)
    assert sampler.index is not before  # the rebuild happened inside the call
    torch.testing.assert_close(log_q.double(), ref.gather(1, ids), atol=1e-4, rtol=0)
    assert not torch.allclose(_reference_log_q(sampler.index, query).gather(1, ids), ref.gather(1, ids), atol=1e-2)


def test_index_attributes_stay_readable():
    s = MIDXSampler(4).build(torch.randn(40, 6), torch.randn(40))
    index = s.index
    assert s.offsets is index.offsets and s.codebooks == (index.codebook1, index.codebook2)
    assert s.num_classes == 40 and s.in_features == 6 and s.beta is index.beta
    assert s.alias_prob is index.alias_prob and s.log_n is index.log_n
    s.build(torch.randn(40, 6))
    assert s.index is not index and s.beta is None and s.alias_prob is None
    assert index.beta is not None  # the old snapshot is untouched by the rebuild


# -- float32 log Q, meta tensors, chunk_size, NaN, overflow ----------------------------------------
def _samplers(n, d):
    w = torch.randn(n, d)
    return [MIDXSampler(4).build(w, torch.randn(n)), UniformSampler(n),
            UnigramSampler(torch.arange(n, dtype=torch.float32)).build(w), ExactSampler().build(w)]


def test_log_q_is_float32_under_a_float64_default_dtype():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        for s in _samplers(30, 4):
            q = torch.randn(3, 4, dtype=torch.float32)
            ids, log_q = s.sample(q, 5)
            assert log_q.dtype == torch.float32, type(s).__name__
            assert s.log_prob(q, ids).dtype == torch.float32, type(s).__name__
    finally:
        torch.set_default_dtype(old)


def test_meta_tensors_get_a_clear_error():
    head = IMISoftmax(8, 50, num_samples=4, num_codewords=4, device="meta")
    with pytest.raises(ValueError, match="meta device.*to_empty"):
        head(torch.randn(3, 8), torch.randint(0, 50, (3,)))
    with pytest.raises(ValueError, match="meta device"):
        head.refresh_index()
    real = IMISoftmax(8, 50, num_samples=4, num_codewords=4)
    with pytest.raises(ValueError, match="x is on the meta device"):
        real(torch.randn(3, 8, device="meta"))
    with pytest.raises(ValueError, match="weight is on the meta device"):
        MIDXSampler(4).build(torch.randn(20, 8, device="meta"))
    head.to_empty(device="cpu")
    head.reset_parameters()  # the fix named in the message works
    assert torch.isfinite(head(torch.randn(3, 8), torch.randint(0, 50, (3,))))


@pytest.mark.parametrize("chunk_size", [0, -5])
def test_topk_chunk_size_must_be_positive(chunk_size):
    head = IMISoftmax(8, 50, num_samples=4, num_codewords=4)
    with pytest.raises(ValueError, match="chunk_size"):
        head.topk(torch.randn(2, 8), 3, chunk_size=chunk_size)


def test_nan_in_x_is_named_x():
    head = IMISoftmax(8, 50, num_samples=4, num_codewords=4)
    x = torch.randn(3, 8)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN"):
        head(x, torch.randint(0, 50, (3,)))


def test_huge_weights_get_a_clear_error_naming_the_weight():
    head = IMISoftmax(16, 50, num_samples=4, num_codewords=4)
    with torch.no_grad():
        head.weight.mul_(0).add_(1e19)  # finite in fp32, but squared norms overflow
    with pytest.raises(ValueError, match=r"weight.*overflows float32.*largest \|entry\| is 1e\+19.*learning rate"):
        head(torch.randn(3, 16), torch.randint(0, 50, (3,)))
    s = MIDXSampler(4).build(torch.randn(50, 16))
    with pytest.raises(ValueError, match="scores.*weight.*overflows float32"):
        s.sample(torch.full((2, 16), 3e38), 3)


# -- autocast -----------------------------------------------------------------------------------
def _logit_scale(x, w, b):
    """max over rows and classes of sum_i |x_i w_ci| + |b_c|: the size the rounding is relative to."""
    return float((x.abs().double() @ w.abs().double().T + b.abs().double()).max())


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
def test_autocast_training_matches_fp32(device, amp_dtype):
    if device.type == "cpu" and amp_dtype == torch.float16:
        pytest.skip("CPU autocast is bf16 in practice")
    torch.manual_seed(0)
    head = IMISoftmax(16, 400, num_samples=32, num_codewords=4, refresh_every=0, device=device)
    head.train()
    x_low = torch.randn(64, 16, device=device).to(amp_dtype)  # activations of a low-precision layer
    target = torch.randint(0, 400, (64,), device=device)
    head.refresh_index()

    gen_seed = 1234
    torch.manual_seed(gen_seed)
    x32 = x_low.float().requires_grad_()
    loss32 = head(x32, target)
    loss32.backward()
    w_grad32 = head.weight.grad.clone()
    head.weight.grad = None
    head.bias.grad = None

    torch.manual_seed(gen_seed)  # same draws
    x_ac = x_low.clone().requires_grad_()
    with torch.autocast(device.type, dtype=amp_dtype):
        loss_ac = head(x_ac, target)
    assert loss_ac.dtype == torch.float32  # the loss is computed in fp32, as autocast's cross-entropy
    tol = 2 * BF16_EPS * _logit_scale(x32.detach(), head.weight.detach(), head.bias.detach())
    assert abs(float(loss_ac.detach()) - float(loss32.detach())) <= tol
    loss_ac.backward()
    assert x_ac.grad.dtype == amp_dtype and head.weight.grad.dtype == torch.float32
    torch.testing.assert_close(head.weight.grad, w_grad32, atol=tol, rtol=0)

    # fp32 activations under autocast: the sampled loss is not downcast at all
    x_fine = torch.randn(64, 16, device=device)
    torch.manual_seed(gen_seed)
    plain = head(x_fine, target)
    torch.manual_seed(gen_seed)
    with torch.autocast(device.type, dtype=amp_dtype):
        under = head(x_fine, target)
        logits, ids = head.sampled_logits(x_low, target)
    assert torch.equal(plain, under)
    assert logits.dtype == torch.float32 and logits.shape == (64, 33) and ids.shape == (64, 32)


def test_autocast_eval_and_logits_follow_f_linear(device):
    torch.manual_seed(0)
    head = IMISoftmax(16, 300, num_samples=8, num_codewords=4, device=device).eval()
    x = torch.randn(32, 16, device=device)
    target = torch.randint(0, 300, (32,), device=device)
    amp = torch.bfloat16
    with torch.autocast(device.type, dtype=amp):
        ce = head(x, target)
        ref = F.cross_entropy(F.linear(x, head.weight, head.bias), target)
        logits = head(x)
        ref_logits = F.linear(x, head.weight, head.bias)
    assert torch.equal(ce, ref) and ce.dtype == ref.dtype
    assert torch.equal(logits, ref_logits) and logits.dtype == amp
    ce32 = F.cross_entropy(F.linear(x, head.weight, head.bias), target)
    # bf16 rounding of x, W (inputs) and of the logits (output): relative 3 * eps of the logit scale
    tol = 2 * 3 * BF16_EPS * _logit_scale(x, head.weight.detach(), head.bias.detach())
    assert abs(float(ce.detach()) - float(ce32.detach())) <= tol


def test_index_build_is_not_autocast():
    torch.manual_seed(0)
    w, b = torch.randn(200, 16), torch.randn(200)
    plain, under = MIDXSampler(4, kmeans_iters=3), MIDXSampler(4, kmeans_iters=3)
    plain.build(w, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under.build(w, b)
        q = torch.randn(5, 16)
        s1, s2 = under.scores(q)
    for a, c in zip(plain.index, under.index):
        assert a == c if not isinstance(a, torch.Tensor) else torch.equal(a, c)
    assert s1.dtype == torch.float32 and torch.equal(s1, plain.scores(q)[0])


def test_wrong_dtype_without_autocast_is_still_refused():
    head = IMISoftmax(8, 50, num_samples=4, num_codewords=4)
    with pytest.raises(TypeError, match="autocast"):
        head(torch.randn(3, 8, dtype=torch.bfloat16), torch.randint(0, 50, (3,)))


# -- from_linear --------------------------------------------------------------------------------
def test_from_linear_adopts_a_tied_weight():
    torch.manual_seed(0)
    emb = nn.Embedding(100, 8)
    lm_head = nn.Linear(8, 100, bias=False)
    lm_head.weight = emb.weight  # tied LM head
    head = IMISoftmax.from_linear(lm_head, num_samples=8, num_codewords=4)
    assert head.weight is emb.weight and head.bias is None
    params = list(emb.parameters()) + [p for p in head.parameters() if p is not emb.weight]
    opt = torch.optim.SGD(params, lr=0.5)
    before = emb.weight.detach().clone()
    tokens = torch.randint(0, 100, (16,))
    loss = head(emb(tokens), torch.randint(0, 100, (16,)))
    loss.backward()
    opt.step()
    assert not torch.equal(emb.weight, before)
    assert head.weight.data_ptr() == emb.weight.data_ptr() == lm_head.weight.data_ptr()


def test_from_linear_copy_keeps_its_own_storage():
    lin = nn.Linear(8, 100)
    head = IMISoftmax.from_linear(lin, copy=True, num_samples=8, num_codewords=4)
    assert head.weight is not lin.weight and head.weight.data_ptr() != lin.weight.data_ptr()
    torch.testing.assert_close(head.weight, lin.weight, rtol=0, atol=0)
    torch.testing.assert_close(head.bias, lin.bias, rtol=0, atol=0)
    with torch.no_grad():
        head.weight.add_(1.0)
    assert not torch.equal(head.weight, lin.weight)
    shared = IMISoftmax.from_linear(lin, num_samples=8, num_codewords=4)
    assert shared.weight is lin.weight and shared.bias is lin.bias
