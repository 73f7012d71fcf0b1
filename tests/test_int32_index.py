"""The MIDX index's per-class arrays (code1, code2, class_ids, alias_pos) are int32: what the build
and update produce, what every op accepts (int32 only, with an error naming the dtype and the fix),
the 2^31 class limit (error before any allocation), and checkpoints of the int64 era still loading."""
import io

import pytest
import torch

from imi_softmax import IMISoftmax, MIDXSampler, _fallback as fb, ops
from imi_softmax._loader import USING_FALLBACK
from imi_softmax.samplers.midx import MAX_INDEX_CLASSES
from conftest import random_index, sample_args

INT32_FIELDS = ("code1", "code2", "class_ids", "alias_pos")
# the ops and the pure-PyTorch fallbacks give the same errors (test_fallback compares the values)
IMPLS = [pytest.param(ops, id="ops"), pytest.param(fb, id="fallback")]


def _sampler(n=3000, d=16, k=8, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, d, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    return MIDXSampler(num_codewords=k, kmeans_iters=3, seed=seed).build(w, b), w, b


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("quantizer", ["rq", "pq"])
def test_build_and_update_produce_int32_arrays(bias, quantizer):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(2000, 16, generator=g)
    b = torch.randn(2000, generator=g) if bias else None
    s = MIDXSampler(num_codewords=8, quantizer=quantizer, kmeans_iters=2).build(w, b)
    for index in (s.index, s.update(w * 1.5, b, torch.arange(0, 2000, 7)).index):
        for f in INT32_FIELDS:
            t = getattr(index, f)
            if t is None:
                assert f == "alias_pos" and not bias
                continue
            assert t.dtype == torch.int32 and t.shape == (2000,), f
        assert index.offsets.dtype == torch.int64  # offsets stay int64 (K*K + 1 entries, up to N)
        # every class exactly once, and its cell is the one its codes name
        assert torch.equal(index.class_ids.long().sort().values, torch.arange(2000))
        cell = index.code1.long() * 8 + index.code2.long()
        counts = torch.bincount(cell, minlength=64)
        assert torch.equal(index.offsets[1:] - index.offsets[:-1], counts)


def test_sampled_ids_stay_int64():
    s, _, _ = _sampler()
    q = torch.randn(5, 16, generator=torch.Generator().manual_seed(2))
    ids, log_q = s.sample(q, 40, generator=torch.Generator().manual_seed(3))
    assert ids.dtype == torch.int64 and log_q.dtype == torch.float32
    torch.testing.assert_close(s.log_prob(q, ids), log_q, rtol=0, atol=0)
    found, _ = s.search(q, 3, budget=200)  # (ids, scores)
    assert found.dtype == torch.int64


@pytest.mark.parametrize("impl", IMPLS)
def test_ops_reject_int64_index_arrays_naming_the_dtype(impl):
    if impl is ops and USING_FALLBACK:
        pytest.skip("the compiled ops are not built")
    (code1, code2, beta), cells = random_index(300, 4, True, seed=4)
    offsets, class_ids, alias_prob, alias_pos, beta_csr, log_n, cell_mass, log_n_max = cells
    s1 = torch.randn(3, 4)
    s2 = torch.randn(3, 4)
    wide = "must be int32.*got (torch\\.)?(int64|Long)"
    with pytest.raises(RuntimeError, match="build_cells: code1 and code2 must be int32"):
        impl.build_cells(code1.long(), code2.long(), beta, 4)
    base = dict(log_n=log_n, cell_mass=cell_mass, log_n_max=log_n_max, offsets=offsets, class_ids=class_ids,
                alias_prob=alias_prob, alias_pos=alias_pos, beta_csr=beta_csr)
    for field in ("class_ids", "alias_pos"):
        args = dict(base, **{field: base[field].long()})
        with pytest.raises(RuntimeError, match=f"{field} {wide}"):
            impl.midx_sample_seeded(s1, s2, *args.values(), 8, 7, 0)
    ids = torch.zeros(3, 2, dtype=torch.long)
    with pytest.raises(RuntimeError, match=f"code1 {wide}"):
        impl.midx_log_prob(s1, s2, log_n, cell_mass, log_n_max, beta, code1.long(), code2, ids)
    changed = torch.tensor([1, 5])
    new = torch.tensor([0, 3])
    upd = (offsets, class_ids, alias_prob, alias_pos, beta_csr, log_n, cell_mass, log_n_max)
    with pytest.raises(RuntimeError, match="new_code1 and new_code2 must be .*int32"):
        impl.update_cells(*upd, code1, code2, beta, changed, new, new, beta[:2], 4)
    with pytest.raises(RuntimeError, match=f"code1 {wide}"):
        impl.update_cells(*upd, code1.long(), code2, beta, changed, new.int(), new.int(), beta[:2], 4)


def test_ops_refuse_more_than_int32_classes_before_allocating():
    """2^31 codes (an expanded view: no memory) are refused by build_cells with the fix (shard),
    before any [N] output exists."""
    if USING_FALLBACK:
        pytest.skip("the compiled ops are not built")
    huge = torch.zeros(1, dtype=torch.int32).expand(MAX_INDEX_CLASSES + 1)
    with pytest.raises(RuntimeError, match="at most 2\\^31 - 1 .*shard the head"):
        ops.build_cells(huge, huge, None, 4)


def test_sampler_refuses_more_than_int32_classes():
    w = torch.zeros(1, 4).expand(MAX_INDEX_CLASSES + 1, 4)  # a view: no memory
    with pytest.raises(ValueError, match="at most 2\\^31 - 1 .*shard the head"):
        MIDXSampler(num_codewords=4).build(w)


def _as_int64_era(state):
    """A sampler state as version 1 wrote it: the same tensors with int64 per-class arrays."""
    old = dict(state, version=1, index=dict(state["index"]))
    for f in INT32_FIELDS:
        if old["index"][f] is not None:
            old["index"][f] = old["index"][f].long()
    return old


@pytest.mark.parametrize("bias", [True, False])
def test_int64_era_sampler_state_loads_as_int32(bias):
    s, w, b = _sampler(bias=bias)
    old = _as_int64_era(s.state_dict())
    assert old["index"]["class_ids"].dtype == torch.int64
    t = MIDXSampler(num_codewords=8, kmeans_iters=3)
    assert t.load_state_dict(old)
    for f in INT32_FIELDS:
        a, e = getattr(t.index, f), getattr(s.index, f)
        assert (a is None and e is None) or (a.dtype == torch.int32 and torch.equal(a, e)), f
    q = torch.randn(6, 16, generator=torch.Generator().manual_seed(8))
    want = s.sample(q, 64, generator=torch.Generator().manual_seed(9))
    got = t.sample(q, 64, generator=torch.Generator().manual_seed(9))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    ids = torch.randint(0, 3000, (6, 10), generator=torch.Generator().manual_seed(10))
    assert torch.equal(t.log_prob(q, ids), s.log_prob(q, ids))
    t.update(w, b, torch.arange(0, 3000, 11))  # the converted index is a valid base for an update


def test_int64_era_state_with_ids_beyond_int32_is_refused():
    s, _, _ = _sampler()
    old = _as_int64_era(s.state_dict())
    old["index"]["class_ids"] = old["index"]["class_ids"].clone()
    old["index"]["class_ids"][0] = 2 ** 40
    with pytest.raises(ValueError, match="class_ids holds 1099511627776, beyond int32"):
        MIDXSampler(num_codewords=8).load_state_dict(old)


def test_int64_era_head_checkpoint_loads_and_continues_bit_exactly():
    """IMISoftmax's _extra_state of the int64 era (torch.save round trip) loads into a new head,
    which then trains on exactly like the head that wrote it."""
    torch.manual_seed(0)
    head = IMISoftmax(16, 2000, num_samples=32, num_codewords=8, refresh_every=0)
    x = torch.randn(12, 16)
    y = torch.randint(0, 2000, (12,))
    head.refresh_index()
    sd = head.state_dict()
    extra = dict(sd["_extra_state"])
    extra["sampler"] = _as_int64_era(extra["sampler"])
    sd = dict(sd, _extra_state=extra)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    other = IMISoftmax(16, 2000, num_samples=32, num_codewords=8, refresh_every=0)
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert other.sampler.index.class_ids.dtype == torch.int32
    torch.manual_seed(5)
    want = head(x, y)
    torch.manual_seed(5)
    got = other(x, y)
    assert torch.equal(got, want)
