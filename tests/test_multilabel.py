"""Multi-label targets (issue 12, part 1): the fused op multilabel_softmax_forward/backward against a
float64 brute force (loss and gradients of x, w, b), CSR == padded, gradcheck and opcheck, the
pure-PyTorch fallback against the compiled op, the head with every sampler (exact log Q of the
proposal used), sparse and dense gradients, torch.compile, the eval-mode exact loss over class
chunks, and clear errors for bad input."""
import math

import pytest
import torch

import imi_softmax
import imi_softmax.functional as IF
from imi_softmax import IMISoftmax, ops
from imi_softmax import _fallback as fb
from imi_softmax._loader import USING_FALLBACK
from imi_softmax._ops import acc_dtype
from imi_softmax.chunked import chunked_multilabel_loss

ALL_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]
PAD = -100
N, D, M = 30, 5, 8


def make_case(dtype=torch.float64, device="cpu", bias=True, seed=0):
    """x [6, D], w [N, D], b [N] (leaves requiring grad), padded positives [6, 5] (pad = PAD), negatives
    [6, M] and log Q. Row 0: every positive is also among the negatives; row 1: one positive; row 2:
    five positives; row 3: no positive (all pads); row 4: two positives, one sampled twice; row 5: three."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, D, generator=g, dtype=torch.float64)
    w = torch.randn(N, D, generator=g, dtype=torch.float64)
    b = torch.randn(N, generator=g, dtype=torch.float64) if bias else None
    rows = [[3, 7, 11], [5], [0, 1, 2, 3, 4], [], [9, 21], [28, 29, 17]]
    target = torch.full((6, 5), PAD, dtype=torch.int64)
    for r, labels in enumerate(rows):
        target[r, :len(labels)] = torch.tensor(labels, dtype=torch.int64)
    ids = torch.randint(0, N, (6, M), generator=g)
    ids[0, :3] = torch.tensor([11, 3, 7])       # all of row 0's positives sampled
    ids[4, 2] = ids[4, 5] = 21                   # one positive sampled twice
    log_q = torch.rand(6, M, generator=g, dtype=torch.float64) * -3 - 1
    tlq = torch.rand(6, 5, generator=g, dtype=torch.float64) * -3 - 1
    leaf = lambda t: None if t is None else t.to(dtype).to(device).requires_grad_()  # noqa: E731
    return (leaf(x), leaf(w), leaf(b), target.to(device), ids.to(device), log_q.to(device),
            tlq.to(device), rows)


def reference_losses(x, w, b, rows, ids, log_q, tlq, remove_hits=True):
    """Per-positive losses [(row, p, loss)] straight from the definition, float64, differentiable:
    for each positive p, logsumexp over {p} and the row's negatives (every positive of the row
    removed from them) minus u_p."""
    out = []
    for r, labels in enumerate(rows):
        o = lambda c: x[r] @ w[c] + (b[c] if b is not None else 0)  # noqa: E731
        negs = [o(int(c)) - log_q[r, j] for j, c in enumerate(ids[r].tolist())
                if not (remove_hits and c in labels)]
        for p, c in enumerate(labels):
            u_p = o(c) - tlq[r, p]
            out.append((r, p, torch.logsumexp(torch.stack([u_p] + negs), 0) - u_p))
    return out


def reduce_reference(losses, rows, reduction):
    if reduction == "sum":
        return sum(l for _, _, l in losses)
    per_row = {}
    for r, _, l in losses:
        per_row.setdefault(r, []).append(l)
    return sum(sum(v) / len(v) for v in per_row.values()) / len(per_row)


def _f64(*ts):
    return [None if t is None else t.detach().cpu().double().requires_grad_() for t in ts]


# --- loss and gradients against the brute force ----------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("remove_hits", [True, False])
def test_loss_and_grads_match_float64_reference(device, dtype, bias, reduction, remove_hits):
    x, w, b, target, ids, log_q, tlq, rows = make_case(dtype, device, bias)
    loss = IF.multilabel_sampled_softmax_loss(x, w, b, target, ids, log_q, tlq, ignore_index=PAD,
                                              reduction=reduction, remove_accidental_hits=remove_hits)
    loss.backward()
    rx, rw, rb = _f64(x, w, b)
    ref = reduce_reference(reference_losses(rx, rw, rb, rows, ids.cpu(), log_q.cpu(), tlq.cpu(), remove_hits),
                           rows, reduction)
    ref.backward()
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(loss.detach().cpu().double(), ref.detach(), **tol)
    torch.testing.assert_close(x.grad.cpu().double(), rx.grad, **tol)
    torch.testing.assert_close(w.grad.cpu().double(), rw.grad, **tol)
    if bias:
        torch.testing.assert_close(b.grad.cpu().double(), rb.grad, **tol)


@pytest.mark.parametrize("device", DEVICES)
def test_none_reduction_is_per_positive_and_zero_at_pads(device):
    x, w, b, target, ids, log_q, tlq, rows = make_case(device=device)
    per = IF.multilabel_sampled_softmax_loss(x, w, b, target, ids, log_q, tlq, ignore_index=PAD, reduction="none")
    assert per.shape == (6, 5)
    want = torch.zeros(6, 5, dtype=torch.float64)
    for r, p, l in reference_losses(*_f64(x, w, b), rows, ids.cpu(), log_q.cpu(), tlq.cpu()):
        want[r, p] = l.detach()
    torch.testing.assert_close(per.detach().cpu(), want, rtol=1e-10, atol=1e-10)
    assert torch.all(per[3] == 0)  # the all-pad row adds nothing


def test_all_positives_sampled_row_equals_no_negatives_of_its_own():
    """Row 0's negatives include every positive: removing them leaves exactly the other negatives,
    so the loss equals the one computed with those columns dropped."""
    x, w, b, target, ids, log_q, tlq, rows = make_case()
    per = IF.multilabel_sampled_softmax_loss(x, w, b, target, ids, log_q, tlq, ignore_index=PAD, reduction="none")
    keep = ~torch.isin(ids[0], torch.tensor(rows[0]))
    dropped = IF.multilabel_sampled_softmax_loss(x[:1], w, b, target[:1], ids[:1, keep], log_q[:1, keep], tlq[:1],
                                                 ignore_index=PAD, reduction="none")
    torch.testing.assert_close(per[0], dropped[0], rtol=0, atol=0)


def test_mean_with_no_positive_is_nan_like_cross_entropy():
    x, w, b, target, ids, log_q, tlq, _ = make_case()
    loss = IF.multilabel_sampled_softmax_loss(x[3:4], w, b, target[3:4], ids[3:4], log_q[3:4], tlq[3:4],
                                              ignore_index=PAD)
    assert torch.isnan(loss)


# --- CSR == padded ------------------------------------------------------------------------------------

def _csr(rows, device="cpu"):
    offsets = torch.tensor([0] + [sum(len(r) for r in rows[:i + 1]) for i in range(len(rows))], dtype=torch.int64)
    labels = torch.tensor([c for r in rows for c in r], dtype=torch.int64)
    return offsets.to(device), labels.to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_csr_equals_padded(device):
    x, w, b, target, ids, log_q, tlq, rows = make_case(device=device)
    padded = IF.multilabel_sampled_softmax_loss(x, w, b, target, ids, log_q, tlq, ignore_index=PAD)
    grads = torch.autograd.grad(padded, (x, w, b))
    offsets, labels = _csr(rows, device)
    flat_tlq = torch.cat([tlq[r, :len(rows[r])] for r in range(6)])
    csr = IF.multilabel_sampled_softmax_loss(x, w, b, (offsets, labels), ids, log_q, flat_tlq, ignore_index=PAD)
    csr_grads = torch.autograd.grad(csr, (x, w, b))
    torch.testing.assert_close(csr, padded, rtol=0, atol=0)
    for a, c in zip(grads, csr_grads):
        torch.testing.assert_close(a, c, rtol=0, atol=0)


# --- the op: gradcheck, opcheck, fallback -------------------------------------------------------------

def _op_inputs(device="cpu", dtype=torch.float64, bias=True):
    x, w, b, target, ids, log_q, tlq, _ = make_case(dtype, device, bias)
    pos = torch.where(target == PAD, -1, target)
    all_ids = torch.cat([pos, ids], 1)
    acc = acc_dtype(dtype)
    all_lq = torch.cat([torch.where(pos < 0, 0.0, tlq), log_q], 1).to(acc)
    return x, w, b, all_ids, all_lq, pos.shape[1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck(device, bias):
    x, w, b, ids, lq, L = _op_inputs(device, bias=bias)

    def f(x, w, *rest):
        b = rest[0] if rest else None
        loss, _ = ops.multilabel_softmax_forward(x, w, b, ids, lq, L, True, False)
        return loss

    inputs = (x, w, b) if bias else (x, w)
    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("remove_hits,sparse_grad", [(True, False), (False, True)])
def test_opcheck_forward(device, dtype, bias, remove_hits, sparse_grad):
    x, w, b, ids, lq, L = _op_inputs(device, dtype, bias)
    torch.library.opcheck(ops.multilabel_softmax_forward, (x, w, b, ids, lq, L, remove_hits, sparse_grad),
                          test_utils=ALL_UTILS)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_backward(device, dtype):
    x, w, b, ids, lq, L = (t.detach() if torch.is_tensor(t) else t for t in _op_inputs(device, dtype))
    loss, lse = ops.multilabel_softmax_forward(x, w, b, ids, lq, L, True, False)
    grad = torch.rand(loss.shape, generator=torch.Generator().manual_seed(3), dtype=loss.dtype).to(device)
    torch.library.opcheck(ops.multilabel_softmax_backward, (grad, x, w, b, ids, lq, lse, L, True),
                          test_utils=ALL_UTILS)


def _pos_weight(ids, L, dtype, mean=True):
    pad = ids[:, :L] < 0
    count = (~pad).sum(1, keepdim=True).clamp_min(1).to(dtype)
    w = 1.0 / count if mean else torch.ones_like(count)
    return torch.where(pad, torch.zeros((), dtype=dtype, device=ids.device), w.expand(pad.shape))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("remove_hits", [True, False])
@pytest.mark.parametrize("mean", [True, False])
def test_train_op_equals_forward_then_backward(device, dtype, bias, remove_hits, mean):
    """multilabel_softmax_train's row loss, coefficients and query gradient (read once from W) equal the
    forward op's per-positive losses weighted by pos_weight and the backward op run with grad_loss =
    pos_weight: the same formulas in the same order, up to the vectorized dot products' rounding (a
    different call site may split the sum differently)."""
    x, w, b, ids, lq, L = (t.detach() if torch.is_tensor(t) else t for t in _op_inputs(device, dtype, bias))
    acc = acc_dtype(dtype)
    pw = _pos_weight(ids, L, acc, mean)
    row_loss, coef, gx = ops.multilabel_softmax_train(x, w, b, ids, lq, pw, L, remove_hits, False)
    loss, lse = ops.multilabel_softmax_forward(x, w, b, ids, lq, L, remove_hits, False)
    ref_gx, ref_coef = ops.multilabel_softmax_backward(pw, x, w, b, ids, lq, lse, L, remove_hits)
    assert row_loss.dtype == coef.dtype == gx.dtype == acc and gx.shape == x.shape
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(coef, ref_coef, **tol)
    if dtype == torch.bfloat16:  # the backward op rounds grad_x to bf16; the training op keeps float32
        torch.testing.assert_close(gx.to(dtype), ref_gx, rtol=1e-2, atol=1e-2)
    else:
        torch.testing.assert_close(gx, ref_gx, **tol)
    torch.testing.assert_close(row_loss, (loss * pw).sum(1), rtol=1e-6 if acc == torch.float32 else 1e-12, atol=0)
    assert torch.all(coef[3] == 0) and torch.all(gx[3] == 0) and row_loss[3] == 0  # the all-pad row


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("sparse_grad", [False, True])
def test_opcheck_train(device, dtype, bias, sparse_grad):
    x, w, b, ids, lq, L = _op_inputs(device, dtype, bias)
    pw = _pos_weight(ids, L, acc_dtype(dtype))
    torch.library.opcheck(ops.multilabel_softmax_train, (x, w, b, ids, lq, pw, L, True, sparse_grad),
                          test_utils=ALL_UTILS)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("sparse_grad", [False, True])
def test_loss_takes_the_training_op_only_when_a_gradient_is_needed(monkeypatch, reduction, sparse_grad):
    """With a gradient to compute, "mean"/"sum" run the training op (W read once); under no_grad, or with
    nothing requiring grad, the forward-only op. Both give the same loss, and the training op's gradients
    equal those of the forward/backward pair (reduction "none", reduced by hand)."""
    import imi_softmax.multilabel as ml
    x, w, b, target, ids, log_q, tlq, rows = make_case(torch.float32)
    calls = []
    for name in ("multilabel_softmax_forward", "multilabel_softmax_train"):
        real = getattr(ops, name)
        monkeypatch.setattr(ml.ops, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    kw = dict(ignore_index=PAD, reduction=reduction, sparse_grad=sparse_grad)
    with torch.no_grad():
        a = IF.multilabel_sampled_softmax_loss(x, w, b, target, ids, log_q, tlq, **kw)
    c = IF.multilabel_sampled_softmax_loss(x, w, b, target, ids, log_q, tlq, **kw)
    gc = torch.autograd.grad(c, (x, w, b))
    per = IF.multilabel_sampled_softmax_loss(x, w, b, target, ids, log_q, tlq, **{**kw, "reduction": "none"})
    count = (target != PAD).sum(1)
    ref = per.sum() if reduction == "sum" else (per.sum(1)[count > 0] / count[count > 0]).mean()
    gref = torch.autograd.grad(ref, (x, w, b))
    assert calls == ["multilabel_softmax_forward", "multilabel_softmax_train", "multilabel_softmax_forward"]
    torch.testing.assert_close(c, a, rtol=1e-6, atol=0)
    torch.testing.assert_close(c, ref, rtol=1e-6, atol=0)
    for g, r in zip(gc, gref):
        g, r = (t.to_dense() if t.is_sparse else t for t in (g, r))
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(USING_FALLBACK, reason="the compiled library is not loaded: nothing to compare with")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("remove_hits", [True, False])
def test_fallback_equals_compiled_op(device, dtype, remove_hits):
    x, w, b, ids, lq, L = (t.detach() if torch.is_tensor(t) else t for t in _op_inputs(device, dtype))
    loss, lse = ops.multilabel_softmax_forward(x, w, b, ids, lq, L, remove_hits, False)
    f_loss, f_lse = fb.multilabel_softmax_forward(x, w, b, ids, lq, L, remove_hits, False)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f_loss, loss, **tol)
    torch.testing.assert_close(f_lse, lse, **tol)
    grad = torch.rand(loss.shape, generator=torch.Generator().manual_seed(4), dtype=loss.dtype).to(device)
    gx, coef = ops.multilabel_softmax_backward(grad, x, w, b, ids, lq, lse, L, remove_hits)
    f_gx, f_coef = fb.multilabel_softmax_backward(grad, x, w, b, ids, lq, lse, L, remove_hits)
    torch.testing.assert_close(f_gx, gx, **tol)
    torch.testing.assert_close(f_coef, coef, **tol)
    pw = _pos_weight(ids, L, loss.dtype)
    for got, want in zip(fb.multilabel_softmax_train(x, w, b, ids, lq, pw, L, remove_hits, False),
                         ops.multilabel_softmax_train(x, w, b, ids, lq, pw, L, remove_hits, False)):
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_equals_cpu(dtype):
    cpu = _op_inputs("cpu", dtype)
    gpu = _op_inputs("cuda", dtype)
    loss, lse = ops.multilabel_softmax_forward(*cpu, True, False)
    g_loss, g_lse = ops.multilabel_softmax_forward(*gpu, True, False)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_loss.cpu(), loss, **tol)
    grad = torch.ones_like(loss)
    gx, coef = ops.multilabel_softmax_backward(grad, *[t.detach() if torch.is_tensor(t) else t for t in cpu[:5]],
                                               lse, cpu[5], True)
    g_gx, g_coef = ops.multilabel_softmax_backward(grad.cuda(), *[t.detach() if torch.is_tensor(t) else t
                                                                  for t in gpu[:5]], g_lse, gpu[5], True)
    torch.testing.assert_close(g_gx.cpu(), gx, **tol)
    torch.testing.assert_close(g_coef.cpu(), coef, **tol)


# --- the head: samplers, exact log Q, sparse and dense grads, compile -------------------------------

def _head(sampler, sparse_grad=False, device="cpu", seed=0):
    torch.manual_seed(seed)
    kw = dict(class_counts=torch.arange(1, N + 1).double()) if sampler == "unigram" else {}
    head = IMISoftmax(D, N, num_samples=M, num_codewords=3, sampler=sampler, refresh_every=0, ignore_index=PAD,
                      sparse_grad=sparse_grad, device=device, dtype=torch.float64, **kw)
    head.train()
    head.refresh_index()
    return head


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sampler", ["midx", "uniform", "unigram", "exact"])
def test_head_uses_the_exact_log_q_of_its_draws(device, sampler):
    """The head's loss equals the brute force on the negatives its sampler drew (same seed), with
    the positives' log Q from log_prob: the proposal actually used."""
    head = _head(sampler, device=device)
    x, _, _, target, _, _, _, rows = make_case(device=device)
    x = x.detach()
    torch.manual_seed(11)
    loss = head(x, target)
    torch.manual_seed(11)
    safe = torch.where(target == PAD, 0, target)
    ids, log_q, tlq = head.sampler.sample_with_targets(x, M, safe)
    torch.testing.assert_close(tlq, head.sampler.log_prob(x, safe))
    ref = reduce_reference(reference_losses(x.cpu(), head.weight.detach().cpu(), head.bias.detach().cpu(), rows,
                                            ids.cpu(), log_q.cpu().double(), tlq.cpu().double()), rows, "mean")
    torch.testing.assert_close(loss.detach().cpu(), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sampler", ["midx", "uniform"])
def test_head_sparse_grad_equals_dense(device, sampler):
    x, _, _, target, _, _, _, rows = make_case(device=device)
    x = x.detach()
    offsets, labels = _csr(rows, device)
    grads = []
    for sparse in (False, True):
        head = _head(sampler, sparse_grad=sparse, device=device)
        torch.manual_seed(5)
        head(x, (offsets, labels)).backward()
        g = head.weight.grad
        assert g.is_sparse == sparse
        grads.append((g.to_dense() if sparse else g, head.bias.grad.to_dense() if sparse else head.bias.grad))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-12, atol=1e-12)


def test_head_multilabel_under_torch_compile():
    """One graph (fullgraph=True) for the padded multi-label training step; same loss and grads as
    eager with the same seed."""
    x, _, _, target, _, _, _, _ = make_case()
    x = x.detach()
    eager, compiled = _head("midx"), _head("midx")
    forward = torch.compile(compiled, backend="aot_eager", fullgraph=True)
    torch.manual_seed(2)
    le = eager(x, target)
    le.backward()
    torch.manual_seed(2)
    lc = forward(x, target)
    lc.backward()
    torch.testing.assert_close(lc, le)
    torch.testing.assert_close(compiled.weight.grad, eager.weight.grad)


def test_compiled_functional_raises_on_bad_positive():
    """Under torch.compile the Python checks are off: the op itself rejects a bad id."""
    x, w, b, target, ids, log_q, tlq, _ = make_case()
    fn = torch.compile(IF.multilabel_sampled_softmax_loss, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(fn(x, w, b, target, ids, log_q, tlq, ignore_index=PAD),
                               IF.multilabel_sampled_softmax_loss(x, w, b, target, ids, log_q, tlq, ignore_index=PAD))
    target[2, 1] = N + 3
    with pytest.raises(RuntimeError, match=f"class id {N + 3} at \\[2, 1\\]"):
        fn(x, w, b, target, ids, log_q, tlq, ignore_index=PAD)


# --- eval: the exact multi-label loss over class chunks ----------------------------------------------

def brute_force_exact(x, w, b, rows):
    """Full logits in float64: per positive p, log(exp(o_p) + sum over non-positives exp(o_j)) - o_p;
    mean over the row's positives, then over rows with positives."""
    o = x @ w.T + (b if b is not None else 0)
    per_row = []
    for r, labels in enumerate(rows):
        if not labels:
            continue
        neg = torch.ones(w.shape[0], dtype=torch.bool)
        neg[labels] = False
        s = torch.logsumexp(o[r][neg], 0)
        per_row.append(sum(torch.logaddexp(o[r, p], s) - o[r, p] for p in labels) / len(labels))
    return sum(per_row) / len(per_row)


@pytest.mark.parametrize("chunk_size", [None, 7, 1])
@pytest.mark.parametrize("bias", [True, False])
def test_eval_equals_brute_force_exact_loss(chunk_size, bias):
    head = _head("midx")
    if not bias:
        head.bias = None
    head.eval_chunk_size = chunk_size
    head.eval()
    x, _, _, target, _, _, _, rows = make_case()
    loss = head(x, target)
    loss.backward()
    rx, rw = _f64(x, head.weight)
    rb = None if not bias else head.bias.detach().clone().requires_grad_()
    ref = brute_force_exact(rx, rw, rb, rows)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, rx.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(head.weight.grad, rw.grad, rtol=1e-10, atol=1e-12)
    if bias:
        torch.testing.assert_close(head.bias.grad, rb.grad, rtol=1e-10, atol=1e-12)
    # the CSR form gives the same number
    with torch.no_grad():
        torch.testing.assert_close(head(x, _csr(rows)), loss.detach(), rtol=0, atol=0)


def test_eval_row_whose_labels_are_every_class():
    """No negative class at all: S = -inf and each positive's loss is 0 (no NaN, also in backward)."""
    w = torch.randn(4, D, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, D, dtype=torch.float64, requires_grad=True)
    pos = torch.tensor([[0, 1, 2, 3], [1, -1, -1, -1]])
    loss = chunked_multilabel_loss(x, w, None, pos, chunk_size=3, reduction="none")
    assert torch.all(loss[0] == 0)
    loss.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()


# --- bad input ----------------------------------------------------------------------------------------

def _head_and_x():
    head = _head("uniform")
    return head, torch.randn(3, D, dtype=torch.float64)


@pytest.mark.parametrize("offsets,labels,err,match", [
    ([0, 2, 1, 3], [1, 2, 3], ValueError, "non-decreasing"),                       # out of order
    ([0, 1, 2, 5], [1, 2, 3], ValueError, "must equal the number of labels"),       # ragged: nnz mismatch
    ([1, 1, 2, 3], [1, 2, 3], ValueError, "must start at 0"),
    ([0, 1, 3], [1, 2, 3], ValueError, "B\\+1 = 4"),                                # wrong row count
    ([0, 1, 2, 3], [1, N, 3], IndexError, f"class id {N} outside \\[0, {N}\\)"),    # label out of range
    ([0, 1, 2, 3], [1, -2, 3], IndexError, "class id -2"),
])
def test_bad_csr_targets(offsets, labels, err, match):
    head, x = _head_and_x()
    with pytest.raises(err, match=match):
        head(x, (torch.tensor(offsets), torch.tensor(labels)))


def test_bad_padded_targets_and_dtypes():
    head, x = _head_and_x()
    with pytest.raises(IndexError, match=f"class id {N} outside"):
        head(x, torch.tensor([[1, N], [2, PAD], [PAD, PAD]]))
    with pytest.raises(TypeError, match="int64"):
        head(x, torch.tensor([[1, 2], [2, 3], [4, 5]], dtype=torch.int32))
    with pytest.raises(TypeError, match="int64"):
        head(x, (torch.tensor([0, 1, 2, 3], dtype=torch.int32), torch.tensor([1, 2, 3])))
    with pytest.raises(TypeError, match="int64"):
        head(x, (torch.tensor([0, 1, 2, 3]), torch.tensor([1.0, 2.0, 3.0])))
    with pytest.raises(ValueError, match="a CSR target is a pair"):
        head(x, (torch.tensor([0, 1, 2, 3]),))
    with pytest.raises(ValueError, match="multi-label target must be \\[3, L\\]"):
        head(x, torch.tensor([[1, 2], [2, 3]]))


def test_functional_bad_target_log_q_shape():
    x, w, b, target, ids, log_q, tlq, rows = make_case()
    with pytest.raises(ValueError, match="target_log_q must match"):
        IF.multilabel_sampled_softmax_loss(x, w, b, target, ids, log_q, tlq[:, :2], ignore_index=PAD)
    with pytest.raises(ValueError, match="for a CSR target"):
        IF.multilabel_sampled_softmax_loss(x, w, b, _csr(rows), ids, log_q, tlq, ignore_index=PAD)
    with pytest.raises(ValueError, match="reduction"):
        IF.multilabel_sampled_softmax_loss(x, w, b, target, ids, log_q, tlq, ignore_index=PAD, reduction="avg")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("column,value", [(0, -5), (1, N), (5, -1), (7, N + 2)])
def test_op_checks_ids(device, column, value):
    """The op names the bad id and its [row, column]: positives may be -1 (padding), negatives not."""
    x, w, b, ids, lq, L = (t.detach() if torch.is_tensor(t) else t for t in _op_inputs(device))
    ids[2, column] = value
    with pytest.raises(RuntimeError, match=f"class id {value} at \\[2, {column}\\]"):
        ops.multilabel_softmax_forward(x, w, b, ids, lq, L, True, False)
    grad = torch.ones(x.shape[0], L, dtype=x.dtype, device=device)
    with pytest.raises(RuntimeError, match=f"class id {value} at \\[2, {column}\\]"):
        ops.multilabel_softmax_backward(grad, x, w, b, ids, lq, torch.zeros_like(grad), L, True)
    with pytest.raises(RuntimeError, match=f"class id {value} at \\[2, {column}\\]"):
        ops.multilabel_softmax_train(x, w, b, ids, lq, grad, L, True, False)


def test_op_checks_num_positives_and_shapes():
    x, w, b, ids, lq, L = (t.detach() if torch.is_tensor(t) else t for t in _op_inputs())
    with pytest.raises(RuntimeError, match="num_positives must be in"):
        ops.multilabel_softmax_forward(x, w, b, ids, lq, ids.shape[1] + 1, True, False)
    with pytest.raises(RuntimeError, match="log_q must match"):
        ops.multilabel_softmax_forward(x, w, b, ids, lq[:, 1:], L, True, False)
    with pytest.raises(RuntimeError, match="grad_loss and lse must be \\[B, L\\]"):
        ops.multilabel_softmax_backward(torch.ones(x.shape[0]), x, w, b, ids, lq, torch.ones(x.shape[0]), L, True)
    pw = _pos_weight(ids, L, x.dtype)
    with pytest.raises(RuntimeError, match="pos_weight must be \\[B, L\\]"):
        ops.multilabel_softmax_train(x, w, b, ids, lq, pw[:, 1:], L, True, False)
    with pytest.raises(RuntimeError, match="pos_weight must have the accumulation dtype"):
        ops.multilabel_softmax_train(x, w, b, ids, lq, pw.float(), L, True, False)


# --- metrics: the propensity-scored ones take the CSR form too -----------------------------------------

def test_propensity_metrics_csr_equals_padded():
    """precision/nDCG already compare CSR with padded (test_package_metrics.py); PSP@k and PSnDCG@k
    with Jain et al.'s A and B read the same label sets from both forms."""
    from imi_softmax import metrics

    _, _, _, target, _, _, _, rows = make_case()
    scores = torch.randn(6, N, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    prop = metrics.propensity(torch.arange(N).double(), 1000, A=0.6, B=2.6)
    csr = _csr(rows)
    for k in (1, 3, 5):
        for fn in (metrics.psp_at_k, metrics.psndcg_at_k):
            torch.testing.assert_close(fn(scores, csr, k, prop), fn(scores, target, k, prop), equal_nan=True,
                                       rtol=0, atol=0)


def test_batch_dims_and_empty_label_width():
    """x [2, 3, d] with target [2, 3, L] is the same as the flattened [6, d] / [6, L]; a target with
    no label column at all (L = 0) is a batch without positives (NaN mean, 0 sum)."""
    x, w, b, target, ids, log_q, tlq, _ = make_case()
    flat = IF.multilabel_sampled_softmax_loss(x, w, b, target, ids, log_q, tlq, ignore_index=PAD)
    nested = IF.multilabel_sampled_softmax_loss(x.reshape(2, 3, D), w, b, target.reshape(2, 3, 5),
                                                ids.reshape(2, 3, M), log_q.reshape(2, 3, M), tlq.reshape(2, 3, 5),
                                                ignore_index=PAD)
    torch.testing.assert_close(nested, flat, rtol=0, atol=0)
    empty = torch.empty(6, 0, dtype=torch.int64)
    args = (x, w, b, empty, ids, log_q, torch.empty(6, 0, dtype=torch.float64))
    assert torch.isnan(IF.multilabel_sampled_softmax_loss(*args, ignore_index=PAD))
    assert IF.multilabel_sampled_softmax_loss(*args, ignore_index=PAD, reduction="sum").item() == 0


def test_non_tensor_x_is_rejected_by_name():
    head, _ = _head_and_x()
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        head([[0.0] * D] * 3, torch.tensor([[1, 2], [3, PAD], [4, 5]]))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        head([[0.0] * D] * 3, _csr([[1], [2], [3]]))
