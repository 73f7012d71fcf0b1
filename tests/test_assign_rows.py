"""Op assign_rows, the incremental refresh's re-assignment: gathered rows widened to float32, the
nearest codeword of each (float64 reference), the second codebook on the residual (rq) or on the
second half (pq), the same codes as assign_codewords for the same float32 rows whatever block or
thread computes them, the finite flag, and the errors of bad input."""
import pytest
import torch

from imi_softmax import MIDXSampler, ops
from imi_softmax import _fallback as fb
from imi_softmax._loader import USING_FALLBACK

BAD = (RuntimeError, IndexError)
N, D, K = 3000, 24, 37


def _inputs(quantizer, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(N, D, generator=g, dtype=torch.float64) * 2).to(dtype)
    width = D if quantizer == "rq" else D // 2
    c1 = torch.randn(K, width, generator=g)
    c2 = torch.randn(K - 5, width, generator=g) * (0.5 if quantizer == "rq" else 1.0)
    # 2,500 rows: two full blocks of 1,024 and a short one; repeats and any order
    rows = torch.cat([torch.randperm(N, generator=g)[:2400], torch.randint(0, N, (100,), generator=g)])
    return w.to(device), rows.to(device), c1.to(device), c2.to(device)


def _nearest64(x, c):
    return torch.cdist(x.double(), c.double()).argmin(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("quantizer", ["rq", "pq"])
def test_codes_are_the_float64_nearest_codewords_of_the_float32_rows(device, quantizer, dtype):
    w, rows, c1, c2 = _inputs(quantizer, dtype, device=device)
    code1, code2, finite = ops.assign_rows(w, rows, c1, c2, quantizer == "rq")
    assert code1.dtype == code2.dtype == torch.int32 and code1.shape == code2.shape == rows.shape
    assert finite.dtype == torch.bool and finite.dim() == 0 and bool(finite)
    x = w[rows].to(torch.float32).double().cpu()
    c1, c2 = c1.double().cpu(), c2.double().cpu()
    if quantizer == "rq":
        want1 = _nearest64(x, c1)
        want2 = _nearest64(x - c1[want1], c2)
    else:
        want1, want2 = _nearest64(x[:, :D // 2], c1), _nearest64(x[:, D // 2:], c2)
    assert torch.equal(code1.long().cpu(), want1) and torch.equal(code2.long().cpu(), want2)


@pytest.mark.skipif(USING_FALLBACK, reason="the compiled library is not loaded: nothing to compare with")
@pytest.mark.parametrize("quantizer", ["rq", "pq"])
def test_codes_equal_assign_codewords_any_thread_count_and_the_fallback(quantizer):
    """What a full build's assignment gives these rows (assign_codewords on the float32 rows, the
    residual subtracted in float32), bit for bit, on 1 or 2 threads; the pure-PyTorch op agrees."""
    w, rows, c1, c2 = _inputs(quantizer, seed=3)
    x = w[rows]
    if quantizer == "rq":
        want1 = ops.assign_codewords(x, c1)[0]
        want2 = ops.assign_codewords(x - c1[want1], c2)[0]
    else:
        want1 = ops.assign_codewords(x[:, :D // 2].contiguous(), c1)[0]
        want2 = ops.assign_codewords(x[:, D // 2:].contiguous(), c2)[0]
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            code1, code2, _ = ops.assign_rows(w, rows, c1, c2, quantizer == "rq")
            assert torch.equal(code1.long(), want1) and torch.equal(code2.long(), want2), threads
    finally:
        torch.set_num_threads(before)
    f1, f2, ff = fb.assign_rows(w, rows, c1, c2, quantizer == "rq")
    assert torch.equal(f1, code1) and torch.equal(f2, code2) and bool(ff)


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "overflow"])
def test_finite_is_false_for_a_bad_row_and_only_when_it_is_gathered(device, bad):
    w, rows, c1, c2 = _inputs("rq", device=device)
    target = int(rows[1500])
    # 1e20 is a finite float32 whose square is not: the float32 squared norm overflows
    w[target, 3] = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "overflow": 1e20}[bad]
    assert not bool(ops.assign_rows(w, rows, c1, c2, True)[2])
    assert not bool(ops.assign_rows(w, rows, c1[:, :12].contiguous(), c2[:, 12:].contiguous(), False)[2])
    assert not bool(fb.assign_rows(w, rows, c1, c2, True)[2])
    others = rows[rows != target]
    assert bool(ops.assign_rows(w, others, c1, c2, True)[2])


def test_no_rows(device):
    w, _, c1, c2 = _inputs("rq", device=device)
    code1, code2, finite = ops.assign_rows(w, torch.empty(0, dtype=torch.int64, device=device), c1, c2, True)
    assert code1.shape == code2.shape == (0,) and bool(finite)


@pytest.mark.parametrize("bad_id", [N, -1, 2 ** 40, -(2 ** 62)])
def test_rows_out_of_range_are_refused_with_their_position(device, bad_id):
    w, rows, c1, c2 = _inputs("rq", device=device)
    rows[1777] = bad_id
    rows[2300] = N + 1  # in a later block: the first position is the one named, whatever thread saw which
    for op in (ops.assign_rows, fb.assign_rows):
        with pytest.raises(BAD, match=rf"rows has class id {bad_id} at \[1777\] outside \[0, {N}\)"):
            op(w, rows, c1, c2, True)


def test_bad_arguments_are_refused():
    w, rows, c1, c2 = _inputs("rq")
    for op in (ops.assign_rows, fb.assign_rows):
        with pytest.raises(BAD, match="rows must be int64"):
            op(w, rows.int(), c1, c2, True)
        with pytest.raises(BAD, match="codebook1 and codebook2 must be float32"):
            op(w, rows, c1.double(), c2, True)
        with pytest.raises(BAD, match="num_codewords"):
            op(w, rows, c1[:0], c2, True)
        with pytest.raises(BAD, match="weight must be"):
            op(w.int(), rows, c1, c2, True)
        with pytest.raises(BAD, match="weight must be"):
            op(w[0], rows, c1, c2, True)
        with pytest.raises(BAD, match=r"residual=True both codebooks must be \[K, 24\]"):
            op(w, rows, c1[:, :12], c2, True)
        with pytest.raises(BAD, match="widths must add up to weight's d = 24"):
            op(w, rows, c1[:, :12], c2[:, :11], False)


def test_a_strided_weight_gives_the_codes_of_its_values():
    w, rows, c1, c2 = _inputs("rq")
    wide = torch.zeros(N, 2 * D)
    wide[:, ::2] = w  # column stride 2: copied first
    got = ops.assign_rows(wide[:, ::2], rows, c1, c2, True)
    want = ops.assign_rows(w, rows, c1, c2, True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    tall = torch.zeros(N, D + 5)
    tall[:, :D] = w  # row stride D + 5, columns contiguous: read in place
    got = ops.assign_rows(tall[:, :D], rows, c1, c2, True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("bad", ["nan", "overflow"])
@pytest.mark.parametrize("quantizer", ["rq", "pq"])
def test_update_names_a_bad_changed_row_as_a_build_does(quantizer, bad):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(500, 16, generator=g)
    s = MIDXSampler(8, quantizer, seed=0).build(w)
    w2 = w.clone()
    w2[123, 5] = float("nan") if bad == "nan" else 1e20
    message = "weight contains NaN or Inf" if bad == "nan" else "squared row norms .* overflows float32"
    with pytest.raises(ValueError, match=message):
        s.update(w2, None, torch.tensor([7, 123, 400]))
    with pytest.raises(ValueError, match=message):
        MIDXSampler(8, quantizer).build(w2)
    s.update(w2, None, torch.tensor([7, 400]))  # the bad row is not re-assigned: nothing to refuse
