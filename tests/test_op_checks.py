"""The raw ops (imi_softmax.ops) check everything they index with, so a bad id, code, offset,
alias table or size raises instead of reading out of bounds. These calls bypass the Python
validation on purpose; each must raise (a segfault would kill pytest, which fails the suite too).
"""
import pytest
import torch

from imi_softmax import MIDXSampler, ops

N, D, K, B, M = 20, 6, 4, 3, 5
BAD = (RuntimeError, IndexError)


@pytest.fixture(scope="module")
def index():
    """A small valid MIDX index with a bias (alias tables present) and matching query scores."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(N, D, generator=g)
    b = torch.randn(N, generator=g)
    s = MIDXSampler(K, kmeans_iters=2).build(w, b)
    q = torch.randn(B, D, generator=g)
    s1, s2 = s.scores(q)
    return s, s1.contiguous(), s2.contiguous()


def on(device, args):
    """args moved to device (None stays None)."""
    return [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]


def sample_args(index, **over):
    s, s1, s2 = index
    args = dict(s1=s1, s2=s2, log_n=s.log_n, cell_mass=s.cell_mass, log_n_max=s.log_n_max, offsets=s.offsets,
                class_ids=s.class_ids, alias_prob=s.alias_prob, alias_pos=s.alias_pos, beta_csr=s.beta_csr)
    args.update(over)
    return list(args.values())


def log_prob_args(index, ids, **over):
    s, s1, s2 = index
    args = dict(s1=s1, s2=s2, log_n=s.log_n, cell_mass=s.cell_mass, log_n_max=s.log_n_max, beta=s.beta,
                code1=s.code1, code2=s.code2)
    args.update(over)
    return list(args.values()) + [ids]


def test_valid_index_samples(index):
    """The fixture is valid: both sampling ops and log_prob run (the cases below differ by one field)."""
    ids, log_q, _ = ops.midx_sample_seeded(*sample_args(index), M, 7, 0)
    assert ids.shape == (B, M) and bool(((ids >= 0) & (ids < N)).all())
    torch.testing.assert_close(ops.midx_log_prob(*log_prob_args(index, ids)), log_q)


@pytest.mark.parametrize("impl", ["op", "fallback"])
@pytest.mark.parametrize("which", ["s1", "s2"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_proposal_ops_reject_non_finite_scores(index, impl, which, bad):
    """The CPU proposal ops check the scores of every row they prepare (the sampler skips its own
    check, and sync, on CPU): one NaN / Inf entry raises naming the row, for sampling with and
    without targets and for log_prob; the fallback raises the same."""
    from imi_softmax._fallback import proposal as fb

    s, s1, s2 = index
    scores = {"s1": s1.clone(), "s2": s2.clone()}
    scores[which][1, 2] = bad
    sample = ops.midx_sample_seeded if impl == "op" else fb.midx_sample_seeded
    log_prob = ops.midx_log_prob if impl == "op" else fb.midx_log_prob
    targets = torch.zeros(B, 1, dtype=torch.long)
    msg = r"scores s1/s2 of row 1 hold NaN or Inf"
    with pytest.raises(RuntimeError, match=msg):
        sample(*sample_args(index, **scores), M, 7, 0)
    with pytest.raises(RuntimeError, match=msg):
        sample(*sample_args(index, **scores), 0, 7, 0, targets, s.beta, s.code1, s.code2)
    with pytest.raises(RuntimeError, match=msg):
        log_prob(*log_prob_args(index, targets, **scores))
    # the other rows alone are fine
    keep = [0, 2]
    ok = {"s1": scores["s1"][keep], "s2": scores["s2"][keep]}
    if which == "s1":
        ok["s2"] = s2[keep]
    else:
        ok["s1"] = s1[keep]
    ids, log_q, _ = sample(*sample_args(index, **ok), M, 7, 0)
    assert bool(torch.isfinite(log_q).all())


# ---- midx_sample / midx_sample_seeded: offsets, tables, sizes -------------------------------------

def _offsets_cases(s):
    off = s.offsets
    not_zero = off.clone()
    not_zero[0] = 1
    short_end = off.clone()
    short_end[-1] -= 1
    decreasing = off.clone()
    decreasing[K * K // 2] = off[-1] + 5  # goes up past N, then back down
    return {
        "wrong length": (off[:-1], "offsets must be contiguous int64"),
        "int32": (off.int(), "offsets must be contiguous int64"),
        "non-contiguous": (torch.stack([off, off], 1)[:, 0], "offsets must be contiguous"),
        "first != 0": (not_zero, "offsets must start at 0"),
        "last != N": (short_end, "end at len\\(class_ids\\)"),
        "decreasing": (decreasing, "never decrease"),
    }


@pytest.mark.parametrize("case", ["wrong length", "int32", "non-contiguous", "first != 0", "last != N", "decreasing"])
@pytest.mark.parametrize("seeded", [True, False])
def test_sample_rejects_bad_offsets(index, case, seeded, device):
    offsets, msg = _offsets_cases(index[0])[case]
    if case == "non-contiguous" and device.type == "cuda":
        pytest.skip("the CUDA glue makes its inputs contiguous")
    args = on(device, sample_args(index, offsets=offsets))
    with pytest.raises(BAD, match=msg):
        if seeded:
            ops.midx_sample_seeded(*args, M, 7, 0)
        else:
            ops.midx_sample(*args, M, None)


def test_sample_rejects_bad_tables(index, device):
    s = index[0]
    cases = [
        (dict(alias_pos=None), "given together"),
        (dict(beta_csr=None), "given together"),
        (dict(alias_prob=s.alias_prob[:-1]), "len\\(class_ids\\)"),
        (dict(alias_pos=s.alias_pos[:-1]), "len\\(class_ids\\)"),
        (dict(beta_csr=torch.cat([s.beta_csr, s.beta_csr])), "len\\(class_ids\\)"),
        (dict(alias_pos=s.alias_pos.long()), "alias_pos must be int32"),
        (dict(class_ids=s.class_ids[:0], offsets=torch.zeros(K * K + 1, dtype=torch.long)), "no class"),
        (dict(class_ids=s.class_ids[:-1]), "end at len\\(class_ids\\) = 19"),
        (dict(class_ids=s.class_ids.float()), "class_ids must be int32"),
        (dict(class_ids=s.class_ids.long()), "class_ids must be int32.*convert"),
        (dict(log_n=s.log_n.reshape(-1)[:-1]), "K\\*K"),
        (dict(cell_mass=s.cell_mass.double()), "float32"),
        (dict(log_n_max=torch.zeros(2)), "log_n_max"),
    ]
    for over, msg in cases:
        with pytest.raises(BAD, match=msg):
            ops.midx_sample_seeded(*on(device, sample_args(index, **over)), M, 7, 0)


def test_sample_rejects_bad_num_codewords(index):
    s, s1, s2 = index
    empty = torch.zeros(B, 0)
    with pytest.raises(BAD, match="num_codewords"):
        ops.midx_sample_seeded(*sample_args(index, s1=empty, s2=empty), M, 7, 0)
    # K = 2^14: the K*K tables would take 2 GiB per thread; refused before anything is allocated.
    wide = torch.zeros(0, 1 << 14)
    with pytest.raises(BAD, match="num_codewords"):
        ops.midx_sample_seeded(*sample_args(index, s1=wide, s2=wide), M, 7, 0)
    with pytest.raises(BAD, match="s1 and s2"):
        ops.midx_sample_seeded(*sample_args(index, s2=s2[:, :-1]), M, 7, 0)


def test_sample_rejects_output_sizes_that_overflow(index):
    with pytest.raises(BAD, match="overflow"):
        ops.midx_sample_seeded(*sample_args(index), 2**62, 7, 0)  # B * M * 8 bytes


# ---- midx_log_prob: ids and the codes they read ----------------------------------------------------

@pytest.mark.parametrize("bad_id", [N, -1, -5, 10**12, -(2**63)])
def test_log_prob_rejects_bad_ids(index, bad_id, device):
    ids = torch.zeros(B, 2, dtype=torch.long)
    ids[1, 1] = bad_id
    with pytest.raises(BAD, match=f"class id {bad_id} at \\[1, 1\\]"):
        ops.midx_log_prob(*on(device, log_prob_args(index, ids)))


@pytest.mark.parametrize("bad_code", [K, -1, 2**31 - 1])  # the codes are int32
def test_log_prob_rejects_bad_codes_of_the_ids_it_reads(index, bad_code, device):
    s = index[0]
    ids = torch.tensor([[3, 4]] * B)
    for field in ("code1", "code2"):
        codes = getattr(s, field).clone()
        codes[4] = bad_code
        with pytest.raises(BAD, match=f"class 4 .* has codes .*{bad_code}.* outside \\[0, K = {K}\\)"):
            ops.midx_log_prob(*on(device, log_prob_args(index, ids, **{field: codes})))
        # a bad code of a class that is not asked for is never read: no error, exact values
        ok = ops.midx_log_prob(*on(device, log_prob_args(index, torch.tensor([[3, 5]] * B), **{field: codes})))
        ref = ops.midx_log_prob(*on(device, log_prob_args(index, torch.tensor([[3, 5]] * B))))
        assert torch.equal(ok, ref)


def test_log_prob_rejects_bad_class_tables(index):
    s = index[0]
    ids = torch.zeros(B, 1, dtype=torch.long)
    with pytest.raises(BAD, match="beta must be contiguous float32"):
        ops.midx_log_prob(*log_prob_args(index, ids, beta=s.beta[:-1]))
    with pytest.raises(BAD, match="code1/code2"):
        ops.midx_log_prob(*log_prob_args(index, ids, code2=s.code2[:-1]))
    with pytest.raises(BAD, match="ids must be int64"):
        ops.midx_log_prob(*log_prob_args(index, ids.int()))


# ---- build_cells / assign_codewords --------------------------------------------------------------

@pytest.mark.parametrize("bad_code", [4, -1, 2**31 - 1, -(2**31)])  # the codes are int32
def test_build_cells_rejects_bad_codes(bad_code, device):
    c1 = torch.tensor([0, 1, 2, 3], dtype=torch.int32, device=device)
    c2 = torch.tensor([0, 1, bad_code, 3], dtype=torch.int32, device=device)
    with pytest.raises(BAD, match="out of range"):
        ops.build_cells(c1, c2, None, 4)
    with pytest.raises(BAD, match="out of range"):
        ops.build_cells(c2, c1, torch.zeros(4, device=device), 4)


@pytest.mark.parametrize("k", [0, -3, 8193, 2**32, 2**62])
def test_build_cells_rejects_bad_num_codewords(k):
    c = torch.zeros(3, dtype=torch.int32)
    with pytest.raises(BAD, match="num_codewords"):
        ops.build_cells(c, c, None, k)


def test_build_cells_rejects_bad_beta_and_codes():
    c = torch.zeros(3, dtype=torch.int32)
    with pytest.raises(BAD, match="beta must be float32"):
        ops.build_cells(c, c, torch.zeros(2), 2)
    with pytest.raises(BAD, match="beta must be float32"):
        ops.build_cells(c, c, torch.zeros(3, dtype=torch.float64), 2)
    with pytest.raises(BAD, match="equal length"):
        ops.build_cells(c, c[:2], None, 2)


def test_assign_codewords_rejects_bad_shapes():
    with pytest.raises(BAD, match="no centroids"):
        ops.assign_codewords(torch.randn(4, 3), torch.randn(0, 3))
    with pytest.raises(BAD, match="x \\[N, d\\] and centroids \\[K, d\\]"):
        ops.assign_codewords(torch.randn(4, 3), torch.randn(2, 4))


# ---- fused loss: ids, shapes ---------------------------------------------------------------------

def _loss_args(ids, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(ids.shape[0], D, generator=g, dtype=dtype)
    w = torch.randn(N, D, generator=g, dtype=dtype)
    b = torch.randn(N, generator=g, dtype=dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return on(device, (x, w, b, ids, torch.zeros(ids.shape, dtype=acc)))


@pytest.mark.parametrize("col", [0, 2])
@pytest.mark.parametrize("bad_id", [N, -5, 10**12, -(2**63)])
def test_loss_ops_reject_bad_ids(col, bad_id, device):
    ids = torch.randint(0, N, (B, 1 + M), generator=torch.Generator().manual_seed(2))
    ids[2, col] = bad_id
    x, w, b, ids, lq = _loss_args(ids, device=device)
    msg = f"class id {bad_id} at \\[2, {col}\\] outside \\[0, {N}\\)"
    with pytest.raises(BAD, match=msg):
        ops.sampled_softmax_forward(x, w, b, ids, lq, True, -1, False)
    with pytest.raises(BAD, match=msg):
        ops.sampled_softmax_backward(torch.ones(B, device=device), x, w, b, ids, lq, torch.zeros(B, device=device),
                                     True, -1)
    with pytest.raises(BAD, match=msg):
        ops.sampled_softmax_train(x, w, b, ids, lq, True, -1, False)


def test_loss_ignore_marker_only_in_column_0(device):
    ids = torch.randint(0, N, (B, 1 + M), generator=torch.Generator().manual_seed(3))
    ids[1, 0] = -100
    x, w, b, ids, lq = _loss_args(ids, device=device)
    loss, _ = ops.sampled_softmax_forward(x, w, b, ids, lq, True, -100, False)
    assert loss[1] == 0 and bool(torch.isfinite(loss).all())
    with pytest.raises(BAD, match="class id -100 at \\[1, 0\\]"):  # -100 is not this call's marker
        ops.sampled_softmax_forward(x, w, b, ids, lq, True, -1, False)
    ids[0, 3] = -100  # the marker is not a valid sample id
    with pytest.raises(BAD, match="class id -100 at \\[0, 3\\]"):
        ops.sampled_softmax_forward(x, w, b, ids, lq, True, -100, False)


def test_loss_ops_reject_bad_shapes():
    ids = torch.zeros(B, 0, dtype=torch.long)  # no target column
    x, w, b, ids, lq = _loss_args(ids)
    with pytest.raises(BAD, match="ids must be int64 \\[B, 1\\+M\\]"):
        ops.sampled_softmax_forward(x, w, b, ids, lq, True, -1, False)
    with pytest.raises(BAD, match="ids must be int64 \\[B, 1\\+M\\]"):
        ops.sampled_softmax_train(x, w, b, ids, lq, True, -1, False)
    ids = torch.zeros(B, 2, dtype=torch.long)
    x, w, b, ids, lq = _loss_args(ids)
    with pytest.raises(BAD, match="grad_loss and lse must be \\[B\\]"):
        ops.sampled_softmax_backward(torch.ones(B + 1), x, w, b, ids, lq, torch.zeros(B), True, -1)
    with pytest.raises(BAD, match="floating point"):
        ops.sampled_softmax_backward(torch.ones(B, dtype=torch.long), x, w, b, ids, lq, torch.zeros(B), True, -1)


@pytest.mark.parametrize("grad_dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_backward_with_grad_loss_of_another_dtype(grad_dtype, device):
    """grad_loss / lse of another dtype are converted into named tensors that outlive the kernel
    (the converted temporaries used to be freed before it read them): the result equals the one
    from float32 grad_loss, and a float64 reference of the gradient of x."""
    ids = torch.randint(0, N, (B, 1 + M), generator=torch.Generator().manual_seed(4))
    x, w, b, ids, lq = _loss_args(ids, device=device)
    lq = torch.randn(lq.shape, generator=torch.Generator().manual_seed(5)).to(device)
    _, lse = ops.sampled_softmax_forward(x, w, b, ids, lq, True, -1, False)
    g32 = torch.tensor([0.5, -2.0, 1.25], device=device)  # exact in every dtype tested
    want_gx, want_coef = ops.sampled_softmax_backward(g32, x, w, b, ids, lq, lse, True, -1)
    for _ in range(3):  # allocations in between would reuse freed blocks
        junk = [torch.full((B,), 1e4, dtype=grad_dtype, device=device) for _ in range(8)]
        gx, coef = ops.sampled_softmax_backward(g32.to(grad_dtype), x, w, b, ids, lq, lse.double(), True, -1)
        del junk
        assert torch.equal(gx, want_gx) and torch.equal(coef, want_coef)
    # float64 reference: d/dx of sum_b g_b * loss_b with accidental hits masked
    xd = x.double().requires_grad_()
    o = torch.einsum("bd,bmd->bm", xd, w.double()[ids]) + b.double()[ids] - lq.double()
    hits = torch.cat([torch.zeros(B, 1, dtype=torch.bool, device=device), ids[:, 1:] == ids[:, :1]], 1)
    u = o.masked_fill(hits, float("-inf"))
    rows = torch.logsumexp(u, 1) - u[:, 0]
    (ref,) = torch.autograd.grad((rows * g32.double()).sum(), xd)
    torch.testing.assert_close(gx.double(), ref, rtol=1e-5, atol=1e-5)


# ---- weight gradients ----------------------------------------------------------------------------

@pytest.mark.parametrize("op_name", ["dense_weight_grad", "sparse_weight_grad"])
@pytest.mark.parametrize("bad_id", [N, -5, 10**12, -(2**63)])
def test_weight_grad_rejects_bad_ids(op_name, bad_id, device):
    op = getattr(ops, op_name)
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(0, N, (B, 1 + M), generator=g)
    coef = torch.rand(B, 1 + M, generator=g) + 0.5
    x = torch.randn(B, D, generator=g)
    ids[1, 2] = bad_id
    with pytest.raises(BAD, match=f"class id {bad_id} at \\[1, 2\\] outside \\[0, num_classes = {N}\\)"):
        op(*on(device, (coef, ids, x)), N)


@pytest.mark.parametrize("op_name", ["dense_weight_grad", "sparse_weight_grad"])
def test_weight_grad_skips_marker_and_zero_coef_entries(op_name, device):
    """-1 (the loss's ignore marker) and any entry with coef exactly 0 (an ignored row, whatever its
    marker) are skipped; the other entries give the float64 reference."""
    op = getattr(ops, op_name)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, N, (B, 1 + M), generator=g)
    coef = torch.rand(B, 1 + M, generator=g) + 0.5
    x = torch.randn(B, D, generator=g)
    ids[0, 0] = -1
    ids[1, 0], coef[1, 0] = 10**12, 0.0
    ids[2, 0], coef[2, 0] = -100, 0.0
    keep = (ids >= 0) & (ids < N)
    ref_w = torch.zeros(N, D, dtype=torch.float64).index_add_(
        0, ids[keep], (coef.double()[:, :, None] * x.double()[:, None, :])[keep])
    ref_b = torch.zeros(N, dtype=torch.float64).index_add_(0, ids[keep], coef.double()[keep])
    out = [t.cpu() for t in op(*on(device, (coef, ids, x)), N)]
    if op_name == "sparse_weight_grad":
        uniq, rows, brows = out
        assert torch.equal(uniq, torch.unique(ids[keep]))
        gw, gb = torch.zeros(N, D), torch.zeros(N)
        gw[uniq], gb[uniq] = rows, brows
    else:
        gw, gb = out
    torch.testing.assert_close(gw.double(), ref_w, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gb.double(), ref_b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("op_name", ["dense_weight_grad", "sparse_weight_grad"])
def test_weight_grad_rejects_sizes_that_overflow(op_name):
    op = getattr(ops, op_name)
    ids = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(BAD, match="num_classes \\* d"):
        op(torch.zeros(1, 2), ids, torch.zeros(1, 4), 2**62)


# ---- devices -------------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="device mismatch needs a CUDA GPU (meta inputs "
                    "dispatch to the fake kernels, never to the C++ ops)")
def test_ops_reject_mixed_devices(index):
    cuda = torch.device("cuda")
    s, s1, s2 = index
    ids = torch.zeros(B, 1 + M, dtype=torch.long)
    x, w, b, ids, lq = _loss_args(ids)
    cases = [
        (lambda: ops.sampled_softmax_forward(x.to(cuda), w.to(cuda), b, ids.to(cuda), lq.to(cuda), True, -1, False),
         "bias is on cpu"),
        (lambda: ops.sampled_softmax_forward(x.to(cuda), w.to(cuda), b.to(cuda), ids, lq.to(cuda), True, -1, False),
         "ids is on cpu"),
        (lambda: ops.sampled_softmax_backward(torch.ones(B), x.to(cuda), w.to(cuda), b.to(cuda), ids.to(cuda),
                                              lq.to(cuda), torch.zeros(B, device=cuda), True, -1),
         "grad_loss is on cpu"),
        (lambda: ops.dense_weight_grad(torch.zeros(B, 1 + M, device=cuda), ids, x.to(cuda), N), "ids is on cpu"),
        (lambda: ops.sparse_weight_grad(torch.zeros(B, 1 + M), ids.to(cuda), x.to(cuda), N), "coef is on cpu"),
        (lambda: ops.assign_codewords(x.to(cuda), w), "centroids is on cpu"),
        (lambda: ops.build_cells(s.code1.to(cuda), s.code2, None, K), "code2 is on cpu"),
        (lambda: ops.midx_sample_seeded(*[t.to(cuda) if t is not None and name != "offsets" else t
                                          for name, t in zip(["s1", "s2", "log_n", "cell_mass", "log_n_max",
                                                              "offsets", "class_ids", "alias_prob", "alias_pos",
                                                              "beta_csr"], sample_args(index))], M, 7, 0),
         "offsets is on cpu"),
        (lambda: ops.midx_log_prob(*[t.to(cuda) for t in log_prob_args(index, torch.zeros(B, 1, dtype=torch.long))[:-1]],
                                   torch.zeros(B, 1, dtype=torch.long)), "ids is on cpu"),
    ]
    for call, msg in cases:
        with pytest.raises(BAD, match=msg):
            call()


@pytest.mark.parametrize("bad_id", [-7, N, 2**31 - 1])
@pytest.mark.parametrize("with_bias", [True, False])
def test_sample_rejects_class_ids_outside_the_classes(index, bad_id, with_bias):
    """class_ids entries are read per draw (no O(N) scan per call): an entry outside [0, N) fails the
    draw that reads it, with and without alias tables, instead of being handed out as a drawn id."""
    s, _, _ = index
    bad = s.class_ids.clone()
    bad.fill_(bad_id)  # every position: any draw reads one
    over = dict(class_ids=bad) if with_bias else dict(class_ids=bad, alias_prob=None, alias_pos=None, beta_csr=None)
    with pytest.raises(BAD, match=r"a class id outside \[0, N\).*class_ids"):
        ops.midx_sample_seeded(*sample_args(index, **over), 50, 7, 0)
    one = s.class_ids.clone()
    one[0] = bad_id  # one position: only the draws that land there fail, the others are the same
    ids, _, _ = ops.midx_sample_seeded(*sample_args(index), 50, 7, 0)
    hit = bool((ids == s.class_ids[0]).any())
    if hit:
        with pytest.raises(BAD, match="a class id outside"):
            ops.midx_sample_seeded(*sample_args(index, class_ids=one), 50, 7, 0)
    else:
        ids_one, _, _ = ops.midx_sample_seeded(*sample_args(index, class_ids=one), 50, 7, 0)
        assert torch.equal(ids_one, ids)


@pytest.mark.parametrize("alias", ["huge", "other_cell"])
def test_sample_rejects_alias_positions_outside_their_cell(index, alias):
    """alias_pos is read per draw (no O(N) scan per call): an entry outside its cell, even a valid
    position of another cell (which would bias the draw silently), raises after the loop."""
    s, _, _ = index
    bad_pos = s.alias_pos.clone()
    if alias == "huge":
        bad_pos.fill_(2**31 - 1)  # int32: the largest position the table can hold
    else:
        bad_pos.copy_(torch.roll(torch.arange(N), 1))  # every alias points at a neighbouring position
        sizes = s.offsets.diff()
        assert bool((sizes[sizes > 0] < N).all())  # several non-empty cells: a neighbour may leave its cell
    always_alias = torch.zeros_like(s.alias_prob)  # u_accept < 0 never holds: every draw takes its alias
    with pytest.raises(BAD, match="alias outside its cell"):
        ops.midx_sample_seeded(*sample_args(index, alias_pos=bad_pos, alias_prob=always_alias), 200, 7, 0)
