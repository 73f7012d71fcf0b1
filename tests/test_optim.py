"""Row-sparse optimizers (imi_softmax.optim): SparseAdam (lazy Adam) and RowWiseAdagrad against
dense float64 references written here, bit-exact untouched rows and state, state_dict round trips,
a real head training loop, opcheck of the two ops, fallback == compiled, CPU == CUDA, and errors."""
import copy
import io
import math

import pytest
import torch

from imi_softmax import IMISoftmax, ops
from imi_softmax import _fallback as fb
from imi_softmax._loader import USING_FALLBACK
from imi_softmax.optim import RowWiseAdagrad, SparseAdam
from conftest import DEVICES

ALL_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
needs_kernels = pytest.mark.skipif(USING_FALLBACK, reason="the compiled library is not loaded: nothing to compare with")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

N, D = 50, 12
# rows touched per step (duplicates in step 3 come from accumulating two backward calls); rows
# 40..49 are never touched, rows 0..9 are touched in some steps and not in others
STEP_ROWS = [[0, 3, 7, 12, 20], [1, 3, 8, 20, 21, 33], [0, 3, 3, 9, 21, 39, 12], [5, 7, 20, 30]]


def _params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(N, D, generator=g, dtype=torch.float64).to(dtype))
    b = torch.nn.Parameter(torch.randn(N, generator=g, dtype=torch.float64).to(dtype))
    return w, b


def _grads(seed=1):
    """Per step: (rows with duplicates, weight values [len, D], bias values [len]) in float64."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for rows in STEP_ROWS:
        r = torch.tensor(rows)
        scale = torch.rand(len(rows), 1, generator=g, dtype=torch.float64) * 3  # rows of different sizes
        out.append((r, torch.randn(len(rows), D, generator=g, dtype=torch.float64) * scale,
                    torch.randn(len(rows), generator=g, dtype=torch.float64)))
    return out


def _set_sparse_grads(w, b, rows, gw, gb, coalesced):
    """Sparse COO grads as autograd leaves them: coalesced (the head) or not (accumulated)."""
    wg = torch.sparse_coo_tensor(rows.unsqueeze(0), gw.to(w.dtype), w.shape, check_invariants=True)
    bg = torch.sparse_coo_tensor(rows.unsqueeze(0), gb.to(b.dtype), b.shape, check_invariants=True)
    w.grad, b.grad = (wg.coalesce(), bg.coalesce()) if coalesced else (wg, bg)


def _dense_sum(rows, values, n, dtype=torch.float64):
    """Float64 dense gradient of the step as the optimizer receives it: values in the weight dtype,
    duplicates summed (as coalesce does; at most two per row here, an exact sum) and rounded once."""
    out = torch.zeros((n,) + tuple(values.shape[1:]), dtype=torch.float64)
    out.index_add_(0, rows, values.to(dtype).double())
    return out.to(dtype).double()


# --- float64 references (dense loops over rows, independent of the kernels) ----------------------

def reference_lazy_adam(w0, steps, lr, betas, eps, wd, round_to=None):
    """Lazy Adam in float64: a row moves, and its moments change, only in steps that touch it;
    bias correction by the global step t. round_to: weight dtype each step rounds to."""
    w = w0.double().clone()
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    b1, b2 = betas
    for t, (rows, values) in enumerate(steps, 1):
        grad = _dense_sum(rows, values, w.shape[0], round_to or torch.float64)
        for r in sorted(set(rows.tolist())):
            g = grad[r]
            m[r] = b1 * m[r] + (1 - b1) * g
            v[r] = b2 * v[r] + (1 - b2) * g * g
            denom = v[r].sqrt() / math.sqrt(1 - b2 ** t) + eps
            w[r] = w[r] * (1 - lr * wd) - lr / (1 - b1 ** t) * m[r] / denom
            if round_to is not None:
                w[r] = w[r].to(round_to).double()
    return w, m, v


def reference_rowwise_adagrad(w0, steps, lr, eps, wd, init=0.0, round_to=None):
    w = w0.double().clone()
    G = torch.full((w.shape[0],), init, dtype=torch.float64)
    for rows, values in steps:
        grad = _dense_sum(rows, values, w.shape[0], round_to or torch.float64)
        for r in sorted(set(rows.tolist())):
            g = grad[r].reshape(-1)
            G[r] += (g * g).mean()
            new = w[r] * (1 - lr * wd) - lr / (G[r].sqrt() + eps) * grad[r]
            w[r] = new.to(round_to).double() if round_to is not None else new
    return w, G


def _run(opt_cls, dtype, coalesced=True, **hp):
    """Runs the optimizer over STEP_ROWS on a weight and a bias; checks after every step that the
    rows (and state rows) the step did not touch are bit-for-bit what they were."""
    w, b = _params(dtype)
    w0, b0 = w.detach().clone(), b.detach().clone()
    opt = opt_cls([w, b], **hp)
    for rows, gw, gb in _grads():
        before = {k: t.detach().clone() for k, t in (("w", w), ("b", b))}
        state_before = {id(p): {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)}
                        for p in (w, b)}
        _set_sparse_grads(w, b, rows, gw, gb, coalesced)
        opt.step()
        untouched = torch.ones(N, dtype=torch.bool)
        untouched[rows] = False
        assert torch.equal(w.detach()[untouched], before["w"][untouched])
        assert torch.equal(b.detach()[untouched], before["b"][untouched])
        assert not torch.equal(w.detach()[~untouched], before["w"][~untouched])
        for p in (w, b):
            for k, old in state_before[id(p)].items():
                assert torch.equal(opt.state[p][k][untouched], old[untouched]), k
        opt.zero_grad()
    return w0, b0, w.detach(), b.detach(), opt


def _tolerance(dtype):
    # fp32 kernels vs the float64 reference: a few float32 roundings per step, amplified by the
    # division by sqrt(v) + eps; bf16/fp16 weights: the reference rounds at the same points, the
    # float32 update may land on the other side of a rounding boundary (1 ulp = 2^-8 / 2^-11 rel.)
    return {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.bfloat16: dict(rtol=2 ** -7, atol=1e-6),
            torch.float16: dict(rtol=2 ** -10, atol=1e-6)}[dtype]


# --- against the references ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("coalesced", [True, False])
def test_sparse_adam_matches_float64_lazy_adam(dtype, wd, coalesced):
    hp = dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=wd)
    w0, b0, w, b, opt = _run(SparseAdam, dtype, coalesced, **hp)
    grads = _grads()
    rw = reference_lazy_adam(w0, [(r, gw) for r, gw, _ in grads], hp["lr"], hp["betas"], hp["eps"], wd,
                             None if dtype == torch.float32 else dtype)
    rb = reference_lazy_adam(b0, [(r, gb) for r, _, gb in grads], hp["lr"], hp["betas"], hp["eps"], wd,
                             None if dtype == torch.float32 else dtype)
    tol = _tolerance(dtype)
    torch.testing.assert_close(w.double(), rw[0], **tol)
    torch.testing.assert_close(b.double(), rb[0], **tol)
    # the state depends on the gradients only: float32 accuracy whatever the weight dtype
    for p, (_, m, v) in ((w, rw), (b, rb)):
        st = opt.state[opt.param_groups[0]["params"][0 if p.dim() == 2 else 1]]
        assert st["step"] == len(STEP_ROWS) and st["exp_avg"].dtype == torch.float32
        torch.testing.assert_close(st["exp_avg"].double(), m, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(st["exp_avg_sq"].double(), v, rtol=1e-6, atol=1e-7)
    # rows 40.. never touched: exactly the initial values, state exactly zero
    assert torch.equal(w[40:], w0[40:]) and torch.equal(b[40:], b0[40:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("coalesced", [True, False])
def test_rowwise_adagrad_matches_float64_reference(dtype, wd, coalesced):
    hp = dict(lr=0.3, eps=1e-6, weight_decay=wd, initial_accumulator_value=0.05)
    w0, b0, w, b, opt = _run(RowWiseAdagrad, dtype, coalesced, **hp)
    grads = _grads()
    rd = None if dtype == torch.float32 else dtype
    rw, Gw = reference_rowwise_adagrad(w0, [(r, gw) for r, gw, _ in grads], 0.3, 1e-6, wd, 0.05, rd)
    rb, Gb = reference_rowwise_adagrad(b0, [(r, gb) for r, _, gb in grads], 0.3, 1e-6, wd, 0.05, rd)
    tol = _tolerance(dtype)
    torch.testing.assert_close(w.double(), rw, **tol)
    torch.testing.assert_close(b.double(), rb, **tol)
    sw, sb = opt.state[opt.param_groups[0]["params"][0]], opt.state[opt.param_groups[0]["params"][1]]
    assert sw["sum"].shape == (N,) and sw["sum"].dtype == torch.float32  # O(N) state, not O(N * d)
    torch.testing.assert_close(sw["sum"].double(), Gw, rtol=1e-6, atol=0)
    torch.testing.assert_close(sb["sum"].double(), Gb, rtol=1e-6, atol=0)
    assert torch.equal(sw["sum"][40:], torch.full((10,), 0.05))


def test_every_row_touched_is_dense_adam():
    """Lazy Adam with every row in every step, and a dense gradient, both equal torch.optim.Adam."""
    g = torch.Generator().manual_seed(3)
    w_ref = torch.nn.Parameter(torch.randn(20, 6, generator=g))
    w_sparse, w_dense = (torch.nn.Parameter(w_ref.detach().clone()) for _ in range(2))
    hp = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8)
    opts = [torch.optim.Adam([w_ref], **hp), SparseAdam([w_sparse], **hp), SparseAdam([w_dense], **hp)]
    for _ in range(5):
        grad = torch.randn(20, 6, generator=g)
        w_ref.grad, w_dense.grad = grad.clone(), grad.clone()
        w_sparse.grad = grad.to_sparse(1)
        for o in opts:
            o.step()
    torch.testing.assert_close(w_sparse.detach(), w_ref.detach(), rtol=1e-6, atol=1e-7)
    assert torch.equal(w_sparse.detach(), w_dense.detach())


def test_dense_gradient_updates_every_row_of_adagrad():
    w = torch.nn.Parameter(torch.ones(4, 3))
    w.grad = torch.zeros(4, 3)
    w.grad[1] = 2.0
    opt = RowWiseAdagrad([w], lr=0.5, eps=1e-30)
    opt.step()
    assert torch.equal(opt.state[w]["sum"], torch.tensor([0.0, 4.0, 0.0, 0.0]))
    assert torch.allclose(w.detach()[1], torch.full((3,), 0.5)) and torch.equal(w.detach()[0], torch.ones(3))


# --- checkpoints -------------------------------------------------------------------------------

@pytest.mark.parametrize("opt_cls,hp", [(SparseAdam, dict(lr=0.05, weight_decay=0.01)),
                                        (RowWiseAdagrad, dict(lr=0.2, weight_decay=0.01))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_continues_bit_for_bit(opt_cls, hp, dtype):
    grads = _grads()
    w, b = _params(dtype)
    opt = opt_cls([w, b], **hp)
    for rows, gw, gb in grads[:2]:
        _set_sparse_grads(w, b, rows, gw, gb, True)
        opt.step()
    buf = io.BytesIO()
    torch.save({"w": w.detach(), "b": b.detach(), "opt": opt.state_dict()}, buf)
    for rows, gw, gb in grads[2:]:  # uninterrupted run
        _set_sparse_grads(w, b, rows, gw, gb, True)
        opt.step()

    buf.seek(0)
    ckpt = torch.load(buf)
    w2, b2 = torch.nn.Parameter(ckpt["w"].clone()), torch.nn.Parameter(ckpt["b"].clone())
    opt2 = opt_cls([w2, b2], lr=123.0)  # hyperparameters come from the checkpoint
    saved = copy.deepcopy(ckpt["opt"])
    opt2.load_state_dict(ckpt["opt"])
    for st in opt2.state.values():  # torch's loader would have cast these to bf16
        assert all(v.dtype == torch.float32 for v in st.values() if torch.is_tensor(v))
    for rows, gw, gb in grads[2:]:
        _set_sparse_grads(w2, b2, rows, gw, gb, True)
        opt2.step()
    assert torch.equal(w2.detach(), w.detach()) and torch.equal(b2.detach(), b.detach())
    for p, p2 in ((w, w2), (b, b2)):
        for k, v in opt.state[p].items():
            assert torch.equal(opt2.state[p2][k], v) if torch.is_tensor(v) else opt2.state[p2][k] == v
    # the loaded dict was copied, not aliased: later steps did not change it
    for pid, st in ckpt["opt"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, saved["state"][pid][k]) if torch.is_tensor(v) else v == saved["state"][pid][k]


# --- a real head --------------------------------------------------------------------------------

@pytest.mark.parametrize("opt_cls,hp", [(SparseAdam, dict(lr=0.05)), (RowWiseAdagrad, dict(lr=0.5))])
def test_head_training_loop_loss_decreases_and_untouched_rows_stay(opt_cls, hp):
    """IMISoftmax(sparse_grad=True) on a learnable task (classes given by a fixed random teacher);
    the encoder is a plain nn.Linear with torch's Adam. The exact eval loss on held-out queries
    must fall well below its start (log N at init), and classes never sampled nor targeted keep
    their initial weights bit for bit."""
    torch.manual_seed(0)
    n, d, B = 8000, 16, 32
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(d, 300, generator=g)  # classes 300.. are never targets
    enc = torch.nn.Linear(d, d)
    head = IMISoftmax(d, n, num_samples=8, num_codewords=4, sparse_grad=True, sampler="uniform")
    w_init = head.weight.detach().clone()
    opt = opt_cls(head.parameters(), **hp)
    opt_enc = torch.optim.Adam(enc.parameters(), lr=1e-2)
    touched = torch.zeros(n, dtype=torch.bool)
    xv = torch.randn(256, d, generator=g)
    yv = (xv @ teacher).argmax(1)

    def eval_loss():
        head.eval()
        with torch.no_grad():
            out = float(head(enc(xv), yv))
        head.train()
        return out

    start = eval_loss()
    for _ in range(120):
        x = torch.randn(B, d, generator=g)
        y = (x @ teacher).argmax(1)
        head.train()
        loss = head(enc(x), y)
        opt.zero_grad()
        opt_enc.zero_grad()
        loss.backward()
        assert head.weight.grad.is_sparse
        touched[head.weight.grad.coalesce().indices()[0]] = True
        opt.step()
        opt_enc.step()
    end = eval_loss()
    print(f'eval loss {start:.3f} -> {end:.3f}, {int((~touched).sum())} rows never touched')
    assert end < 0.6 * start, (start, end)
    assert bool((~touched).any())  # some classes were never sampled (about 4 uniform draws per class in 120 steps of B * M = 256: ~2% never drawn)
    assert torch.equal(head.weight.detach()[~touched], w_init[~touched])


# --- ops ----------------------------------------------------------------------------------------

def _op_args(device, dtype, two_d=True, rows=True, seed=4):
    g = torch.Generator().manual_seed(seed)
    shape = (30, 7) if two_d else (30,)
    p = torch.randn(shape, generator=g).to(dtype).to(device)
    m = torch.randn(shape, generator=g).to(device)
    v = torch.rand(shape, generator=g).to(device)
    s = torch.rand(30, generator=g).to(device)
    r = torch.tensor([0, 2, 3, 11, 29]).to(device) if rows else None
    gshape = ((5,) if rows else (30,)) + shape[1:]
    grad = torch.randn(gshape, generator=g).to(dtype).to(device)
    return p, m, v, s, r, grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("two_d", [True, False])
@pytest.mark.parametrize("rows", [True, False])
def test_opcheck_row_optim_ops(device, dtype, two_d, rows):
    p, m, v, s, r, grad = _op_args(device, dtype, two_d, rows)
    torch.library.opcheck(ops.row_sparse_adam_, (p, m, v, r, grad, 0.01, 0.9, 0.99, 1e-8, 0.1, 3),
                          test_utils=ALL_UTILS)
    torch.library.opcheck(ops.row_wise_adagrad_, (p, s, r, grad, 0.1, 1e-8, 0.01), test_utils=ALL_UTILS)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("two_d", [True, False])
@pytest.mark.parametrize("rows", [True, False])
def test_fallback_equals_compiled_bit_for_bit(dtype, two_d, rows):
    args = _op_args("cpu", dtype, two_d, rows, seed=5)
    for step in (1, 7):
        a = [t.clone() if torch.is_tensor(t) else t for t in args]
        k = [t.clone() if torch.is_tensor(t) else t for t in args]
        fb.row_sparse_adam_(a[0], a[1], a[2], a[4], a[5], 0.03, 0.9, 0.999, 1e-8, 0.2, step)
        ops.row_sparse_adam_(k[0], k[1], k[2], k[4], k[5], 0.03, 0.9, 0.999, 1e-8, 0.2, step)
        for x, y in zip(a[:3], k[:3]):
            assert torch.equal(x, y)
        fb.row_wise_adagrad_(a[0], a[3], a[4], a[5], 0.1, 1e-8, 0.05)
        ops.row_wise_adagrad_(k[0], k[3], k[4], k[5], 0.1, 1e-8, 0.05)
        assert torch.equal(a[0], k[0]) and torch.equal(a[3], k[3])
        assert not torch.equal(a[0], args[0])


@pytest.mark.parametrize("impl", ["ops", "fallback"])
def test_no_rows_is_a_no_op(impl):
    lib = ops if impl == "ops" else fb
    p, m, v, s, _, _ = _op_args("cpu", torch.float32)
    before = [t.clone() for t in (p, m, v, s)]
    empty, grad = torch.empty(0, dtype=torch.int64), torch.empty(0, 7)
    lib.row_sparse_adam_(p, m, v, empty, grad, 0.1, 0.9, 0.99, 1e-8, 0.1, 1)
    lib.row_wise_adagrad_(p, s, empty, grad, 0.1, 1e-8, 0.1)
    assert all(torch.equal(a, b) for a, b in zip((p, m, v, s), before))


@pytest.mark.parametrize("impl", ["ops", "fallback"])
@pytest.mark.parametrize("device", DEVICES)
def test_rows_of_no_columns_are_a_no_op(impl, device):
    """A weight [N, 0]: nothing to update, and Adagrad's row mean square (0 / 0) must not turn the
    accumulator into NaN."""
    lib = ops if impl == "ops" else fb
    p, m, v = (torch.zeros(6, 0, device=device) for _ in range(3))
    s = torch.full((6,), 0.5, device=device)
    rows, grad = torch.tensor([1, 4], device=device), torch.zeros(2, 0, device=device)
    lib.row_sparse_adam_(p, m, v, rows, grad, 0.1, 0.9, 0.99, 1e-8, 0.1, 1)
    lib.row_wise_adagrad_(p, s, rows, grad, 0.1, 1e-8, 0.1)
    lib.row_wise_adagrad_(p, s, None, torch.zeros(6, 0, device=device), 0.1, 1e-8, 0.1)
    assert torch.equal(s, torch.full((6,), 0.5, device=device))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [True, False])
def test_cuda_equals_cpu_bit_for_bit(dtype, rows):
    """Same bodies, single roundings, IEEE division and square root: identical results; the
    Adagrad row mean is summed in float64 (order-independent up to double rounding)."""
    for two_d in (True, False):
        args = _op_args("cpu", dtype, two_d, rows, seed=6)
        c = [t.clone() if torch.is_tensor(t) else t for t in args]
        gpu = [t.cuda() if torch.is_tensor(t) else t for t in args]
        ops.row_sparse_adam_(c[0], c[1], c[2], c[4], c[5], 0.03, 0.9, 0.999, 1e-8, 0.2, 2)
        ops.row_sparse_adam_(gpu[0], gpu[1], gpu[2], gpu[4], gpu[5], 0.03, 0.9, 0.999, 1e-8, 0.2, 2)
        ops.row_wise_adagrad_(c[0], c[3], c[4], c[5], 0.1, 1e-8, 0.05)
        ops.row_wise_adagrad_(gpu[0], gpu[3], gpu[4], gpu[5], 0.1, 1e-8, 0.05)
        for x, y in zip(c[:4], gpu[:4]):
            assert torch.equal(x, y.cpu())


@needs_cuda
@pytest.mark.parametrize("opt_cls", [SparseAdam, RowWiseAdagrad])
def test_cuda_optimizer_step_equals_cpu(opt_cls):
    w, b = _params(torch.float32)
    wc, bc = torch.nn.Parameter(w.detach().cuda()), torch.nn.Parameter(b.detach().cuda())
    o, oc = opt_cls([w, b], lr=0.05), opt_cls([wc, bc], lr=0.05)
    for rows, gw, gb in _grads():
        _set_sparse_grads(w, b, rows, gw, gb, False)
        _set_sparse_grads(wc, bc, rows.cuda(), gw.cuda(), gb.cuda(), False)
        o.step()
        oc.step()
    assert torch.equal(w.detach(), wc.detach().cpu()) and torch.equal(b.detach(), bc.detach().cpu())


# --- errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,exc,match", [
    (dict(lr=-1.0), ValueError, "lr must be >= 0"),
    (dict(lr=torch.tensor(0.1)), TypeError, "lr must be a Python float"),
    (dict(betas=(1.0, 0.9)), ValueError, r"betas\[0\] must be in \[0.0, 1.0\)"),
    (dict(betas=(0.9, -0.1)), ValueError, r"betas\[1\]"),
    (dict(betas=0.9), ValueError, "betas must be a pair"),
    (dict(eps=float("nan")), ValueError, "eps"),
    (dict(eps=0.0), ValueError, "eps must be > 0"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay"),
])
def test_sparse_adam_rejects_bad_hyperparameters(kw, exc, match):
    with pytest.raises(exc, match=match):
        SparseAdam([torch.nn.Parameter(torch.zeros(3, 2))], **kw)


@pytest.mark.parametrize("kw,match", [(dict(lr=-0.5), "lr"), (dict(eps=-1.0), "eps"), (dict(eps=0), "eps must be > 0"),
                                      (dict(initial_accumulator_value=-1.0), "initial_accumulator_value")])
def test_rowwise_adagrad_rejects_bad_hyperparameters(kw, match):
    with pytest.raises(ValueError, match=match):
        RowWiseAdagrad([torch.nn.Parameter(torch.zeros(3, 2))], **kw)


@pytest.mark.parametrize("opt_cls", [SparseAdam, RowWiseAdagrad])
def test_rejects_bad_parameters_and_gradients(opt_cls):
    with pytest.raises(ValueError, match=r"shape \(2, 3, 4\).*weight \[N, d\] and a bias \[N\]"):
        opt_cls([torch.nn.Parameter(torch.zeros(2, 3, 4))])
    with pytest.raises(TypeError, match="float64.*float32, bfloat16, float16"):
        opt_cls([torch.nn.Parameter(torch.zeros(2, 3, dtype=torch.float64))])
    w = torch.nn.Parameter(torch.zeros(4, 3))
    opt = opt_cls([w])
    w.grad = torch.zeros(4, 3).to_sparse(2)  # element-sparse, not whole rows
    with pytest.raises(ValueError, match="sparse_dim 1"):
        opt.step()
    bad = opt_cls([torch.nn.Parameter(torch.zeros(3, 4).t())])
    bad.param_groups[0]["params"][0].grad = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="not contiguous"):
        bad.step()
    opt.param_groups[0]["lr"] = -1.0  # edited after construction (e.g. by hand): caught at step
    w.grad = torch.zeros(4, 3).to_sparse(1)
    with pytest.raises(ValueError, match="lr must be >= 0"):
        opt.step()


@pytest.mark.parametrize("which", ["adam", "adagrad"])
@pytest.mark.parametrize("impl", ["ops", "fallback"])
def test_ops_check_what_they_index_with_and_write_nothing_on_error(which, impl):
    lib = ops if impl == "ops" else fb
    p, m, v, s, r, grad = _op_args("cpu", torch.float32)

    def call(p=p, m=m, v=v, s=s, r=r, grad=grad, step=1):
        if which == "adam":
            lib.row_sparse_adam_(p, m, v, r, grad, 0.1, 0.9, 0.99, 1e-8, 0.0, step)
        else:
            lib.row_wise_adagrad_(p, s, r, grad, 0.1, 1e-8, 0.0)

    p0 = p.clone()
    cases = [
        (dict(r=torch.tensor([0, 2, 3, 11, 30])), r"rows has 30 at \[4\] outside \[0, N = 30\)"),
        (dict(r=torch.tensor([-1, 2, 3, 11, 12])), r"rows has -1 at \[0\]"),
        (dict(r=torch.tensor([0, 3, 3, 11, 12])), r"strictly increasing.*rows\[2\] = 3 <= rows\[1\] = 3"),
        (dict(r=torch.tensor([0, 5, 3, 11, 12])), r"coalesce"),
        (dict(r=torch.tensor([0, 2, 3, 11], dtype=torch.int32)), "rows must be int64"),
        (dict(grad=torch.zeros(4, 7)), r"grad must hold one row per entry of rows"),
        (dict(grad=torch.zeros(5, 7, dtype=torch.float64)), "grad must have param's dtype"),
        (dict(r=None), "without rows, grad must have param's shape"),
        (dict(p=torch.zeros(7, 30).t()), "param must be contiguous"),
        (dict(p=torch.zeros(30, 7, dtype=torch.float64), grad=torch.zeros(5, 7, dtype=torch.float64)),
         "float32, bfloat16 or float16"),
    ]
    if which == "adam":
        cases += [(dict(m=torch.zeros(30, 7, dtype=torch.bfloat16)), "exp_avg must be contiguous float32"),
                  (dict(v=torch.zeros(29, 7)), "exp_avg_sq must be contiguous float32"),
                  (dict(step=0), "step must be >= 1")]
    else:
        cases += [(dict(s=torch.zeros(30, 7)), r"sum must be contiguous float32 \[30\]")]
    for kw, match in cases:
        with pytest.raises(RuntimeError, match=match):
            call(**kw)
    assert torch.equal(p, p0)  # every error was raised before anything was written


@pytest.mark.parametrize("opt_cls", [SparseAdam, RowWiseAdagrad])
def test_load_state_dict_refuses_state_of_other_shapes(opt_cls):
    """A checkpoint of another model used to load, then fail at the next step inside the fused op."""
    small = torch.nn.Parameter(torch.randn(6, 4))
    opt = opt_cls([small])
    small.grad = torch.randn(6, 4)
    opt.step()
    big = torch.nn.Parameter(torch.randn(100, 4))
    with pytest.raises(ValueError, match=r"load_state_dict: state '(exp_avg|sum)' of parameter 0 must be .*"
                                         r"shape \(100(, 4)?,?\).*got torch.float32 \(6"):
        opt_cls([big]).load_state_dict(opt.state_dict())
    sd = opt.state_dict()
    key = "exp_avg" if opt_cls is SparseAdam else "sum"
    del sd["state"][0][key]
    with pytest.raises(ValueError, match=f"has no '{key}'.*another optimizer"):
        opt_cls([small]).load_state_dict(sd)


def test_load_state_dict_keeps_state_float32():
    p = torch.nn.Parameter(torch.randn(6, 4))
    opt = SparseAdam([p])
    p.grad = torch.randn(6, 4)
    opt.step()
    sd = opt.state_dict()
    for k in ("exp_avg", "exp_avg_sq"):
        sd["state"][0][k] = sd["state"][0][k].double()
    opt2 = SparseAdam([p])
    opt2.load_state_dict(sd)
    assert opt2.state[p]["exp_avg"].dtype == opt2.state[p]["exp_avg_sq"].dtype == torch.float32
    p.grad = torch.randn(6, 4)
    opt2.step()  # the fused op takes the cast state
