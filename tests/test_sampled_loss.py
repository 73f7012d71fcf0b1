"""Fused sampled-softmax op: float64 reference, gradcheck, opcheck, sparse grads, convergence."""
import io
import math

import pytest
import torch
import torch.nn.functional as F

import imi_softmax.functional as IF
from imi_softmax import ExactSampler, ops
from conftest import make_loss_inputs as make_inputs, reference_loss


@pytest.mark.parametrize("remove_hits", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_loss_and_grads_match_float64_reference(device, remove_hits, bias):
    x, w, b, t, ids, lq, tlq = make_inputs(dtype=torch.float32, device=device, bias=bias)
    t[2] = -100
    loss = IF.sampled_softmax_loss(x, w, b, t, ids, lq, tlq, remove_accidental_hits=remove_hits)
    params = [x, w] + ([b] if bias else [])
    grads = torch.autograd.grad(loss, params)
    ref_rows = reference_loss(x, w, b, t, ids, lq, tlq, remove_hits)
    ref = ref_rows.sum() / (t != -100).sum()
    ref_grads = torch.autograd.grad(ref, params)
    torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r.double(), atol=1e-5, rtol=1e-4)
    none = IF.sampled_softmax_loss(x, w, b, t, ids, lq, tlq, remove_accidental_hits=remove_hits, reduction="none")
    torch.testing.assert_close(none.double(), ref_rows, atol=1e-5, rtol=1e-5)
    total = IF.sampled_softmax_loss(x, w, b, t, ids, lq, tlq, remove_accidental_hits=remove_hits, reduction="sum")
    torch.testing.assert_close(total.double(), ref_rows.sum(), atol=1e-4, rtol=1e-5)


def test_gradcheck_float64(device):
    x, w, b, t, ids, lq, tlq = make_inputs(device=device)
    t[1] = -100

    def f(x, w, b):
        return IF.sampled_softmax_loss(x, w, b, t, ids, lq, tlq)

    assert torch.autograd.gradcheck(f, (x, w, b))


def test_gradcheck_float64_without_bias_and_keeping_hits(device):
    x, w, _, t, ids, lq, tlq = make_inputs(device=device, bias=False)

    def f(x, w):
        return IF.sampled_softmax_loss(x, w, None, t, ids, lq, tlq, remove_accidental_hits=False, reduction="sum")

    assert torch.autograd.gradcheck(f, (x, w))


def test_sparse_grad_equals_dense(device):
    x, w, b, t, ids, lq, tlq = make_inputs(dtype=torch.float32, device=device)
    dense = torch.autograd.grad(IF.sampled_softmax_loss(x, w, b, t, ids, lq, tlq), (w, b))
    sparse = torch.autograd.grad(IF.sampled_softmax_loss(x, w, b, t, ids, lq, tlq, sparse_grad=True), (w, b))
    for s, dn in zip(sparse, dense):
        assert s.is_sparse and s.is_coalesced()
        torch.testing.assert_close(s.to_dense(), dn)
    touched = torch.unique(torch.cat([t, ids.flatten()]))
    assert torch.equal(sparse[0].indices()[0], touched)


@pytest.mark.parametrize("remove_hits", [True, False])
def test_training_forward_saves_gradients_that_match_the_backward_op(device, remove_hits):
    """sampled_softmax_train's coef and grad_x (for grad_loss = 1) equal what the backward op computes
    from the forward's lse, its loss equals the forward's, and ignored rows get zeros; with a
    non-uniform grad_loss the autograd gradients equal the float64 reference."""
    x, w, b, t, ids, lq, tlq = make_inputs(device=device)
    t[4] = -100
    all_ids = torch.cat([torch.where(t == -100, -1, t)[:, None], ids], 1)
    all_lq = torch.cat([torch.where(t == -100, 0.0, tlq)[:, None], lq], 1).double()
    xd, wd, bd = x.detach(), w.detach(), b.detach()
    loss, lse, coef, gx = ops.sampled_softmax_train(xd, wd, bd, all_ids, all_lq, remove_hits, -1, False)
    f_loss, f_lse = ops.sampled_softmax_forward(xd, wd, bd, all_ids, all_lq, remove_hits, -1, False)
    assert torch.equal(loss, f_loss) and torch.equal(lse, f_lse)
    one = torch.ones_like(lse)
    b_gx, b_coef = ops.sampled_softmax_backward(one, xd, wd, bd, all_ids, all_lq, lse, remove_hits, -1)
    assert torch.equal(coef, b_coef)
    torch.testing.assert_close(gx, b_gx, rtol=1e-12, atol=1e-12)
    assert (coef[4] == 0).all() and (gx[4] == 0).all()
    weights = torch.linspace(-1.5, 2.0, t.shape[0], dtype=torch.float64, device=device)
    rows = IF.sampled_softmax_loss(x, w, b, t, ids, lq, tlq, remove_accidental_hits=remove_hits, reduction="none")
    grads = torch.autograd.grad((rows * weights).sum(), (x, w, b))
    ref = (reference_loss(x, w, b, t, ids, lq, tlq, remove_hits) * weights).sum()
    for g, r in zip(grads, torch.autograd.grad(ref, (x, w, b))):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_training_forward_only_when_a_gradient_is_needed(device, monkeypatch):
    """Under no_grad, or with nothing requiring grad, the loss runs the forward-only op (no grad_x
    and coefficients are computed); with a gradient the training op. Both give the same loss."""
    x, w, b, t, ids, lq, tlq = make_inputs(device=device)
    calls = []
    for name in ("sampled_softmax_forward", "sampled_softmax_train"):
        real = getattr(ops, name)
        monkeypatch.setattr(IF.ops, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    with torch.no_grad():
        a = IF.sampled_softmax_loss(x, w, b, t, ids, lq, tlq)
    c = IF.sampled_softmax_loss(x.detach(), w.detach(), b.detach(), t, ids, lq, tlq)
    d = IF.sampled_softmax_loss(x.detach(), w, None, t, ids, lq, tlq)
    e = IF.sampled_softmax_loss(x.detach(), w.detach(), b, t, ids, lq, tlq)
    assert calls == ["sampled_softmax_forward", "sampled_softmax_forward", "sampled_softmax_train",
                     "sampled_softmax_train"]
    assert torch.equal(a, c) and not a.requires_grad and d.requires_grad and e.requires_grad


# double backward (an error wherever a gradient is differentiated again): tests/test_double_backward.py


# opcheck of every op (this one included): tests/test_opcheck.py


def test_exact_sampler_gradient_converges_to_full_softmax():
    """With Q = P, the sampled gradient w.r.t. the query is an unbiased-in-the-limit estimate of
    E_P[w] - w_y; its error shrinks like sqrt(tr Cov_P(w) / M)."""
    torch.manual_seed(0)
    N, d = 60, 6
    w = torch.randn(N, d, dtype=torch.float64)
    b = torch.randn(N, dtype=torch.float64)
    h = torch.randn(1, d, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([3])
    full = torch.autograd.grad(F.cross_entropy(F.linear(h, w, b), y), h)[0]
    p = torch.softmax(F.linear(h, w, b), 1)[0].detach()
    mean_w = p @ w
    spread = math.sqrt(float(p @ ((w - mean_w) ** 2).sum(1)))
    sampler = ExactSampler().build(w, b)
    errors = []
    for M in (16, 256, 4096, 65536):
        ids, lq = sampler.sample(h.detach(), M, generator=torch.Generator().manual_seed(M))
        tlq = sampler.log_prob(h.detach(), y.unsqueeze(1)).squeeze(1)
        loss = IF.sampled_softmax_loss(h, w, b, y, ids, lq.double(), tlq.double(), remove_accidental_hits=False)
        g = torch.autograd.grad(loss, h)[0]
        err = (g - full).norm().item()
        bound = 5 * spread / math.sqrt(M) + (w[3] - mean_w).norm().item() / (M + 1)
        assert err < bound, f"M={M}: |g - g_full| = {err:.4g} >= {bound:.4g}"
        errors.append(err)
    assert errors[-1] < errors[0] / 8


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_inputs_accumulate_in_float32(dtype):
    x, w, b, t, ids, lq, tlq = make_inputs(B=8, N=50, d=16, M=12, dtype=torch.float32)
    xs, ws, bs = (v.detach().to(dtype).requires_grad_() for v in (x, w, b))
    loss = IF.sampled_softmax_loss(xs, ws, bs, t, ids, lq, tlq)
    assert loss.dtype == dtype
    grads = torch.autograd.grad(loss, (xs, ws, bs))
    # reference on the same rounded inputs, in float64
    ref = reference_loss(xs.detach(), ws.detach(), bs.detach(), t, ids, lq, tlq).mean()
    xr, wr, br = (v.detach().double().requires_grad_() for v in (xs, ws, bs))
    ref_grads = torch.autograd.grad(reference_loss(xr, wr, br, t, ids, lq, tlq).mean(), (xr, wr, br))
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(loss.double(), ref, atol=4 * eps * max(1.0, ref.abs().item()), rtol=0)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), r, atol=4 * eps, rtol=4 * eps)


def test_non_contiguous_inputs():
    x, w, b, t, ids, lq, tlq = make_inputs(dtype=torch.float32)
    xt = x.detach().t().contiguous().t().requires_grad_()  # same values, column-major
    wide = torch.stack([ids, ids], 2)[:, :, 0]
    assert not xt.is_contiguous() and not wide.is_contiguous()
    a = IF.sampled_softmax_loss(xt, w, b, t, wide, lq, tlq)
    ref = IF.sampled_softmax_loss(x, w, b, t, ids, lq, tlq)
    torch.testing.assert_close(a, ref)
    ga = torch.autograd.grad(a, (xt, w))
    gr = torch.autograd.grad(ref, (x, w))
    for u, v in zip(ga, gr):
        torch.testing.assert_close(u, v)


def test_large_dense_weight_grad_from_fresh_zero_pages():
    """At >= 64 MiB the CPU dense weight gradient comes from kernel-zeroed pages instead of a fill:
    touched rows equal a float64 index_add reference, untouched rows are exactly zero, and the
    tensor behaves like any other gradient (in-place ops, save/load, shared memory)."""
    n, d, b, m1 = 131072, 128, 16, 9  # n * d * 4 bytes = 64 MiB
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, d, generator=g)
    ids = torch.randint(0, n, (b, m1), generator=g)
    ids[0, 1] = -1  # padding entries are skipped
    coef = torch.randn(b, m1, generator=g)
    grad_w, grad_b = ops.dense_weight_grad(coef, ids, x, n)
    keep = ids >= 0
    rows = ids[keep]
    contrib = coef.double()[:, :, None] * x.double()[:, None, :]
    ref_w = torch.zeros(n, d, dtype=torch.float64).index_add_(0, rows, contrib[keep])
    ref_b = torch.zeros(n, dtype=torch.float64).index_add_(0, rows, coef.double()[keep])
    torch.testing.assert_close(grad_w.double(), ref_w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_b.double(), ref_b, atol=1e-5, rtol=1e-5)
    untouched = torch.ones(n, dtype=torch.bool)
    untouched[rows] = False
    assert grad_w[untouched].abs().sum() == 0 and untouched.sum() > n - b * m1
    buf = io.BytesIO()
    torch.save(grad_w, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf), grad_w)
    grad_w.add_(1.0).zero_()
    assert grad_w.abs().sum() == 0
    grad_w.share_memory_()
    assert grad_w.is_shared() and grad_w.abs().sum() == 0


def test_sparse_weight_grad_rows_from_recycled_mappings():
    """The CPU sparse weight gradient's rows (>= 4 MiB) come from mappings that freed gradients handed
    back, with stale contents: every row is still the float64 reference, a gradient still alive is
    never overwritten by the next call, and smaller or larger calls in between get correct rows."""
    n, d = 200_000, 64
    g = torch.Generator().manual_seed(1)

    def call(b, m1):
        x = torch.randn(b, d, generator=g)
        ids = torch.randint(0, n, (b, m1), generator=g)
        coef = torch.randn(b, m1, generator=g)
        uniq, rows, brows = ops.sparse_weight_grad(coef, ids, x, n)
        ref = torch.zeros(n, d, dtype=torch.float64).index_add_(
            0, ids.flatten(), (coef.double()[:, :, None] * x.double()[:, None, :]).reshape(-1, d))
        ref_b = torch.zeros(n, dtype=torch.float64).index_add_(0, ids.flatten(), coef.double().flatten())
        return uniq, rows, brows, ref[uniq], ref_b[uniq]

    kept = call(128, 257)  # 32k rows x 64 x 4 bytes = 8 MiB
    kept_rows = kept[1].clone()
    for b, m1 in ((128, 257), (64, 257), (128, 257), (200, 257), (128, 257)):
        uniq, rows, brows, ref, ref_b = call(b, m1)
        assert rows.shape == (uniq.shape[0], d)
        torch.testing.assert_close(rows.double(), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(brows.double(), ref_b, atol=1e-5, rtol=1e-5)
        del uniq, rows, brows  # hands the mapping back for the next call
    assert torch.equal(kept[1], kept_rows)
    torch.testing.assert_close(kept[1].double(), kept[3], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["three_digits", "high_digit_shared", "low_digit_shared", "one_class"])
def test_weight_grad_grouping_sums_each_class_in_position_order(layout):
    """The weight gradients group entries by class with an LSD radix sort, 11 bits a digit. For
    class-id layouts that take three digits, share one digit, or are one class, each row must be the
    sum of its entries in increasing position: bitwise equal to that float32 sum (a stable sort), and
    close to float64; the sparse rows come out unique and ascending, the dense ones equal them."""
    g = torch.Generator().manual_seed(7)
    b, m1, d = 24, 9, 5
    n = {"three_digits": (1 << 23) + 5, "high_digit_shared": 1_000_000, "low_digit_shared": 1_000_000,
         "one_class": 1_000_000}[layout]
    if layout == "three_digits":
        ids = torch.randint(0, n, (b, m1), generator=g)
        ids[0, :4] = torch.tensor([n - 1, n - 1, 0, 1 << 22])  # repeats and every digit's extremes
    elif layout == "high_digit_shared":  # ids < 2048: the second digit is 0 for all
        ids = torch.randint(0, 2048, (b, m1), generator=g)
    elif layout == "low_digit_shared":  # ids = 2048 * k + 5: the first digit is 5 for all
        ids = torch.randint(0, n // 2048, (b, m1), generator=g) * 2048 + 5
    else:
        ids = torch.full((b, m1), 123_457)
    x = torch.randn(b, d, generator=g)
    coef = torch.randn(b, m1, generator=g)
    uniq, rows, brows = ops.sparse_weight_grad(coef, ids, x, n)
    assert torch.equal(uniq, torch.unique(ids.flatten()))
    flat_ids, flat_coef = ids.flatten().tolist(), coef.flatten()
    for u, c in enumerate(uniq.tolist()):
        acc, acc_b = torch.zeros(d), torch.zeros(())
        for e in (e for e, i in enumerate(flat_ids) if i == c):  # increasing position, float32
            acc = acc + flat_coef[e] * x[e // m1]
            acc_b = acc_b + flat_coef[e]
        assert torch.equal(rows[u], acc), (c, rows[u], acc)
        assert torch.equal(brows[u], acc_b)
    ref = torch.zeros(uniq.numel(), d, dtype=torch.float64).index_add_(
        0, torch.searchsorted(uniq, ids.flatten()), (coef.double()[:, :, None] * x.double()[:, None, :]).reshape(-1, d))
    torch.testing.assert_close(rows.double(), ref, atol=1e-5, rtol=1e-5)
    if n <= 1_000_000:
        gw, gb = ops.dense_weight_grad(coef, ids, x, n)
        assert torch.equal(gw[uniq], rows) and torch.equal(gb[uniq], brows)
        untouched = torch.ones(n, dtype=torch.bool)
        untouched[uniq] = False
        assert not gw[untouched].any() and not gb[untouched].any()
