"""Approximate top-k from the index (MIDXSampler.search, head.topk(approximate=True), the ops
midx_search_cells / midx_search): against float64 brute force, the multi-sequence order, the
fallback, opcheck, bad input, and CUDA against CPU (skipped without a GPU)."""
import pytest
import torch

from imi_softmax import IMISoftmax, MIDXSampler, ops
from imi_softmax import _fallback as fb
from imi_softmax._loader import USING_FALLBACK
from conftest import random_index

needs_kernels = pytest.mark.skipif(USING_FALLBACK, reason="the compiled library is not loaded: nothing to compare with")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
ALL_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def clustered(n, d, seed, dtype=torch.float64, clusters=16):
    """Class vectors around a few centres (so cells are uneven), and queries near them."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, d, generator=g, dtype=torch.float64) * 2
    w = centres[torch.randint(0, clusters, (n,), generator=g)] + torch.randn(n, d, generator=g, dtype=torch.float64)
    b = torch.randn(n, generator=g, dtype=torch.float64)
    q = centres[torch.randint(0, clusters, (9,), generator=g)] + torch.randn(9, d, generator=g, dtype=torch.float64)
    return w.to(dtype), b.to(dtype), q.to(dtype)


def exact_topk(q, w, b, k):
    """float64 brute force: (values, ids) of the k largest q . w_i + b_i."""
    logits = q.double() @ w.double().T + (0 if b is None else b.double())
    return logits.topk(k, dim=1)


def cell_score(s1, s2, cells):
    k = s1.shape[1]
    return s1.gather(1, cells // k).double() + s2.gather(1, cells % k).double()


# --- the result ---------------------------------------------------------------------------------

@pytest.mark.parametrize("quantizer", ["rq", "pq"])
@pytest.mark.parametrize("bias", [True, False])
def test_budget_n_equals_exact_topk(quantizer, bias):
    w, b, q = clustered(600, 8, seed=1)
    b = b if bias else None
    s = MIDXSampler(num_codewords=6, quantizer=quantizer).build(w, b)
    for k in (1, 10, 600):
        ids, scores = s.search(q, k, budget=600)
        want_v, want_i = exact_topk(q, w, b, k)
        assert scores.dtype == torch.float64 and ids.dtype == torch.int64
        assert torch.equal(ids, want_i)
        torch.testing.assert_close(scores, want_v, rtol=1e-12, atol=1e-12)


def test_head_approximate_topk_budget_n_equals_exact():
    head = IMISoftmax(8, 500, num_codewords=5, dtype=torch.float64)
    head.refresh_index()
    x = torch.randn(3, 4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    want_v, want_i = head.topk(x, 7)
    got_v, got_i = head.topk(x, 7, approximate=True, budget=500)
    assert got_v.shape == (3, 4, 7) and torch.equal(got_i, want_i)
    torch.testing.assert_close(got_v, want_v)


def test_head_rerank_uses_current_weights():
    """The cells are those of the last refresh; the rerank reads the head's parameters now."""
    head = IMISoftmax(8, 400, num_codewords=4, dtype=torch.float64)
    head.refresh_index()
    with torch.no_grad():
        head.weight.mul_(-1.5).add_(0.3)
        head.bias.add_(torch.randn(400, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))
    x = torch.randn(5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    want_v, want_i = exact_topk(x, head.weight, head.bias, 9)
    got_v, got_i = head.topk(x, 9, approximate=True, budget=400)
    assert torch.equal(got_i, want_i)
    torch.testing.assert_close(got_v, want_v)


def test_result_is_the_exact_topk_of_the_visited_classes():
    """With a small budget: the k best of exactly the classes of the visited cells."""
    w, b, q = clustered(2000, 6, seed=5)
    s = MIDXSampler(num_codewords=10).build(w, b)
    budget, k = 150, 20
    ids, scores = s.search(q, k, budget)
    cells, counts = s.search_cells(q, budget)
    index = s.index
    for row in range(q.shape[0]):
        visited = cells[row][cells[row] >= 0]
        cand = torch.cat([index.class_ids[index.offsets[c]:index.offsets[c + 1]] for c in visited.tolist()])
        assert cand.numel() == counts[row] and cand.numel() >= budget
        last = int(index.offsets[visited[-1] + 1] - index.offsets[visited[-1]])
        assert cand.numel() - last < budget  # stopped at the first cell that reached the budget
        want_v, pos = exact_topk(q[row:row + 1], w[cand], b[cand], k)
        assert torch.equal(ids[row], cand[pos[0]])
        torch.testing.assert_close(scores[row], want_v[0])


def test_recall_grows_with_budget_and_reaches_one():
    w, b, q = clustered(3000, 8, seed=6, dtype=torch.float32)
    s = MIDXSampler(num_codewords=12).build(w, b)
    _, truth = exact_topk(q, w, b, 10)
    recalls = []
    for budget in (10, 100, 1000, 3000):
        ids, _ = s.search(q, 10, budget)
        hits = sum(len(set(ids[r].tolist()) & set(truth[r].tolist())) for r in range(q.shape[0]))
        recalls.append(hits / truth.numel())
    assert recalls == sorted(recalls) and recalls[-1] == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_storage_dtypes_rerank_in_float32(dtype):
    w, b, q = clustered(300, 8, seed=7, dtype=dtype)
    s = MIDXSampler(num_codewords=4).build(w, b)
    ids, scores = s.search(q, 5, budget=300)
    assert scores.dtype == torch.float32
    want = (q.double() @ w.double().T + b.double()).gather(1, ids)  # the logits of the returned ids
    torch.testing.assert_close(scores.double(), want, rtol=1e-5, atol=1e-4)
    best, _ = exact_topk(q, w, b, 5)
    torch.testing.assert_close(scores.double(), best, rtol=1e-5, atol=1e-4)


# --- the visit order ----------------------------------------------------------------------------

def test_visit_order_is_non_increasing_and_covers_every_nonempty_cell():
    w, b, q = clustered(700, 8, seed=8)
    s = MIDXSampler(num_codewords=7).build(w, b)
    cells, counts = s.search_cells(q, budget=700)
    s1, s2 = s.scores(q)
    nonempty = torch.nonzero(s.cell_counts().reshape(-1) > 0).flatten()
    for row in range(q.shape[0]):
        visited = cells[row][cells[row] >= 0]
        assert sorted(visited.tolist()) == nonempty.tolist() and int(counts[row]) == 700
        score = cell_score(s1[row:row + 1], s2[row:row + 1], visited.unsqueeze(0))[0]
        assert bool((score[1:] <= score[:-1]).all())


def test_visit_order_with_ties_is_the_documented_total_order():
    """Every cell non-empty, integer scores (many ties): the order is (s1 + s2 descending, rank of
    k1, rank of k2), ranks by score descending then codeword ascending."""
    k = 6
    g = torch.Generator().manual_seed(9)
    s1 = torch.randint(-3, 3, (4, k), generator=g).float()
    s2 = torch.randint(-3, 3, (4, k), generator=g).float()
    offsets = torch.arange(k * k + 1, dtype=torch.int64) * 2  # 2 classes per cell
    cells, counts = ops.midx_search_cells(s1, s2, offsets, 2 * k * k)
    for row in range(4):
        rank = [sorted(range(k), key=lambda a, s=s: (-float(s[row, a]), a)).index(c) for s in (s1, s2)
                for c in range(k)]
        r1, r2 = rank[:k], rank[k:]
        want = sorted(range(k * k), key=lambda c: (-(float(s1[row, c // k]) + float(s2[row, c % k])),
                                                   r1[c // k], r2[c % k]))
        assert cells[row].tolist() == want and int(counts[row]) == 2 * k * k


def test_budget_stops_the_visit():
    (_, _, _), index = random_index(500, 5, False, seed=10)
    offsets = index[0]
    g = torch.Generator().manual_seed(11)
    s1, s2 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    for budget in (1, 37, 499, 500, 10_000):
        cells, counts = ops.midx_search_cells(s1, s2, offsets, budget)
        assert cells.shape == (6, min(25, budget))
        sizes = offsets[1:] - offsets[:-1]
        for row in range(6):
            visited = cells[row][cells[row] >= 0]
            got = sizes[visited]
            assert int(got.sum()) == int(counts[row]) >= min(budget, 500)
            assert int(got.sum() - got[-1]) < budget
            assert bool((cells[row][visited.numel():] == -1).all())


# --- fallback, opcheck, class id types ----------------------------------------------------------

def _op_args(n=400, k=5, bias=True, dtype=torch.float32, seed=12, id_dtype=torch.int64, device="cpu"):
    (_, _, _), index = random_index(n, k, False, seed=seed, device=device)
    offsets, class_ids = index[0], index[1].to(id_dtype)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(7, 6, generator=g, dtype=torch.float64).to(dtype).to(device)
    w = torch.randn(n, 6, generator=g, dtype=torch.float64).to(dtype).to(device)
    b = torch.randn(n, generator=g, dtype=torch.float64).to(dtype).to(device) if bias else None
    s1 = torch.randn(7, k, generator=g).to(device)
    s2 = torch.randn(7, k, generator=g).to(device)
    return q, w, b, s1, s2, offsets, class_ids


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("bias", [True, False])
def test_fallback_equals_compiled(dtype, id_dtype, bias):
    q, w, b, s1, s2, offsets, class_ids = _op_args(bias=bias, dtype=dtype, id_dtype=id_dtype)
    for budget in (9, 120, 400):
        got = ops.midx_search_cells(s1, s2, offsets, budget)
        want = fb.midx_search_cells(s1, s2, offsets, budget)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        ids, scores = ops.midx_search(q, w, b, s1, s2, offsets, class_ids, 9, budget)
        fids, fscores = fb.midx_search(q, w, b, s1, s2, offsets, class_ids, 9, budget)
        assert torch.equal(ids, fids)
        torch.testing.assert_close(scores, fscores)


def test_int32_class_ids_same_result():
    args = _op_args()
    a = ops.midx_search(*args[:6], args[6], 8, 100)
    b = ops.midx_search(*args[:6], args[6].to(torch.int32), 8, 100)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_opcheck(device):
    q, w, b, s1, s2, offsets, class_ids = _op_args(device=device)
    torch.library.opcheck(ops.midx_search_cells, (s1, s2, offsets, 50), test_utils=ALL_UTILS)
    torch.library.opcheck(ops.midx_search, (q, w, b, s1, s2, offsets, class_ids, 6, 50), test_utils=ALL_UTILS)
    torch.library.opcheck(ops.midx_search, (q, w, None, s1, s2, offsets, class_ids, 6, 50), test_utils=ALL_UTILS)


def test_search_under_torch_compile():
    w, b, q = clustered(300, 8, seed=13, dtype=torch.float32)
    s = MIDXSampler(num_codewords=4).build(w, b)
    s1, s2 = s.scores(q)
    index = s.index

    def f(q, s1, s2):
        return ops.midx_search(q, w, b, s1, s2, index.offsets, index.class_ids, 5, 64)

    got = torch.compile(f, fullgraph=True)(q, s1, s2)
    want = f(q, s1, s2)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# --- rerank orders (CPU: query-major and cell-major) --------------------------------------------

def _batch_args(n, d, K, B, dtype, id_dtype, bias, seed):
    """A random index with K*K cells and B queries whose codeword scores share their top cells with
    each other (so the cell-major lists hold many queries per cell), as op arguments."""
    (_, _, _), index = random_index(n, K, False, seed=seed)
    offsets, class_ids = index[0], index[1].to(id_dtype)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, d, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(n, generator=g, dtype=torch.float64).to(dtype) if bias else None
    s1 = torch.randn(K, generator=g) * 2 + torch.randn(B, K, generator=g)
    s2 = torch.randn(K, generator=g) * 2 + torch.randn(B, K, generator=g)
    return q, w, b, s1, s2, offsets, class_ids


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("bias", [True, False])
def test_cell_major_equals_query_major(dtype, id_dtype, bias):
    """Same candidates, same per-pair logit, same strict order: equal ids and bit-equal scores."""
    args = _batch_args(3000, 12, 9, 70, dtype, id_dtype, bias, seed=21)
    for k, budget in ((1, 1), (10, 60), (10, 700), (50, 3000)):
        q_ids, q_scores = ops.midx_search(*args, k, budget, "query")
        c_ids, c_scores = ops.midx_search(*args, k, budget, "cell")
        a_ids, a_scores = ops.midx_search(*args, k, budget)  # 70 queries: auto picks cell-major
        assert torch.equal(q_ids, c_ids) and torch.equal(q_scores, c_scores)
        assert torch.equal(a_ids, c_ids) and torch.equal(a_scores, c_scores)
        f_ids, f_scores = fb.midx_search(*args, k, budget)
        assert torch.equal(c_ids, f_ids)
        torch.testing.assert_close(c_scores, f_scores)


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_cell_major_result_does_not_depend_on_threads(threads):
    args = _batch_args(2000, 8, 8, 33, torch.float32, torch.int64, True, seed=22)
    want = ops.midx_search(*args, 7, 300, "query")
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        got = ops.midx_search(*args, 7, 300, "cell")
    finally:
        torch.set_num_threads(old)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("rerank", ["query", "cell"])
def test_cell_major_budget_n_equals_exact_topk(rerank):
    w, b, q = clustered(900, 8, seed=23)
    q = torch.cat([q] * 3)  # 27 queries, repeated ones share every cell
    s = MIDXSampler(num_codewords=7).build(w, b)
    for k in (1, 13, 900):
        ids, scores = s.search(q, k, budget=900, rerank=rerank)
        want_v, want_i = exact_topk(q, w, b, k)
        assert torch.equal(ids, want_i)
        torch.testing.assert_close(scores, want_v, rtol=1e-12, atol=1e-12)


@needs_kernels
def test_cell_major_in_several_query_blocks():
    """k * block is bounded (2^20 heap entries per thread): k = 30,000 splits 40 queries into blocks
    of 34 and 6; the result is still the exact top-k of every query."""
    n, k = 30000, 30000
    args = _batch_args(n, 4, 40, 40, torch.float64, torch.int64, True, seed=24)
    ids, scores = ops.midx_search(*args, k, n, "cell")
    q, w, b = args[:3]
    want_v, want_i = exact_topk(q, w, b, k)
    assert torch.equal(ids, want_i)
    torch.testing.assert_close(scores, want_v, rtol=1e-12, atol=1e-12)
    small = ops.midx_search(*args, 5, 2000, "cell"), ops.midx_search(*args, 5, 2000, "query")
    assert torch.equal(small[0][0], small[1][0]) and torch.equal(small[0][1], small[1][1])


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rerank", ["query", "cell"])
def test_copy_vectors_gives_the_live_candidates_and_scores(bias, rerank):
    """build(copy_vectors=True): search() reranks the cell-ordered copy; same ids and scores as the
    live rows (no float ties in this data), the exact top-k at budget N."""
    w, b, q = clustered(1500, 8, seed=26)
    b = b if bias else None
    q = torch.cat([q] * 8)
    s = MIDXSampler(num_codewords=8).build(w, b, copy_vectors=True)
    for k, budget in ((5, 40), (10, 300), (1500, 1500)):
        got = s.search(q, k, budget, rerank=rerank)
        live = s.search(q, k, budget, weight=w, bias=b, rerank=rerank)
        assert torch.equal(got[0], live[0])
        torch.testing.assert_close(got[1], live[1], rtol=1e-12, atol=1e-12)
    want_v, want_i = exact_topk(q, w, b, 1500)
    assert torch.equal(got[0], want_i)


def test_copy_vectors_is_taken_at_build_and_update():
    w, b, q = clustered(800, 6, seed=27)
    s = MIDXSampler(num_codewords=6).build(w, b, copy_vectors=True)
    old_v, old_i = exact_topk(q, w, b, 9)
    w2, b2 = w.clone(), b.clone()
    w.mul_(-1)  # in place after the build: not in the copy (documented)
    got_i, got_v = s.search(q, 9, budget=800)
    assert torch.equal(got_i, old_i)
    torch.testing.assert_close(got_v, old_v)
    changed = torch.arange(0, 800, 3)
    w2[changed] = torch.randn(changed.numel(), 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 3
    b2[changed] += 1.0
    s.update(w2, b2, changed)  # the copy follows the update
    want_v, want_i = exact_topk(q, w2, b2, 9)
    got_i, got_v = s.search(q, 9, budget=800)
    assert torch.equal(got_i, want_i)
    torch.testing.assert_close(got_v, want_v)
    s.build(w2, b2)  # without copy_vectors: the copy is dropped, search reads w2 by reference
    with torch.no_grad():
        w2.mul_(-1)
    want_v, want_i = exact_topk(q, w2, b2, 9)
    got_i, got_v = s.search(q, 9, budget=800)
    assert torch.equal(got_i, want_i)
    with pytest.raises(TypeError, match="copy_vectors must be a bool"):
        s.build(w2, b2, copy_vectors=1)


def test_rerank_must_be_a_known_order():
    w, b, q = clustered(200, 8, seed=25, dtype=torch.float32)
    s = MIDXSampler(num_codewords=4).build(w, b)
    with pytest.raises(ValueError, match="rerank must be 'auto', 'query' or 'cell', got 'cells'"):
        s.search(q, 3, rerank="cells")
    args = _op_args()
    with pytest.raises(RuntimeError, match="rerank must be 'auto', 'query' or 'cell'"):
        ops.midx_search(*args, 5, 50, "rows")


# --- bad input ----------------------------------------------------------------------------------

def test_bad_arguments_raise_clear_errors():
    w, b, q = clustered(200, 8, seed=14, dtype=torch.float32)
    s = MIDXSampler(num_codewords=4)
    with pytest.raises(RuntimeError, match="build"):
        s.search(q, 5)
    s.build(w, b)
    with pytest.raises(ValueError, match=r"budget \(4\) must be >= k \(5\)"):
        s.search(q, 5, budget=4)
    with pytest.raises(ValueError, match="k must be <= num_classes"):
        s.search(q, 201, budget=300)
    with pytest.raises(ValueError, match="k"):
        s.search(q, 0)
    with pytest.raises(ValueError, match="budget"):
        s.search(q, 1, budget=0)
    with pytest.raises(TypeError, match="k"):
        s.search(q, 2.5)
    with pytest.raises(ValueError, match=r"query must be \[B, 8\]"):
        s.search(q[:, :5], 3)
    with pytest.raises(ValueError, match="dimensions"):
        s.search(q[0], 3)
    with pytest.raises(ValueError, match="weight must be"):
        s.search(q, 3, weight=w[:100])
    with pytest.raises(ValueError, match="bias must be"):
        s.search(q, 3, weight=w, bias=b.double())
    with pytest.raises(ValueError, match="bias was given without weight"):
        s.search(q, 3, bias=b)
    with pytest.raises(ValueError, match="NaN or Inf"):
        s.search(torch.full_like(q, float("nan")), 3)
    with pytest.raises(ValueError, match="NaN or Inf"):
        s.search(torch.full_like(q, float("nan")), 3, weight=w, bias=b)
    with pytest.raises(ValueError, match="NaN or Inf"):
        s.search_cells(torch.full_like(q, float("nan")), 30)
    with pytest.raises(ValueError, match="overflows float32"):  # finite query, scores beyond float32
        s.search_cells(torch.full_like(q, 3e38), 30)


def test_head_approximate_topk_needs_a_built_midx_index():
    head = IMISoftmax(8, 100, num_codewords=4)
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="refresh_index"):
        head.topk(x, 3, approximate=True)
    head.refresh_index()
    with pytest.raises(ValueError, match="budget"):
        head.topk(x, 3, approximate=True, budget=2)
    uniform = IMISoftmax(8, 100, sampler="uniform")
    with pytest.raises(ValueError, match="sampler='midx'"):
        uniform.topk(x, 3, approximate=True)


def test_op_checks_what_it_indexes_with():
    q, w, b, s1, s2, offsets, class_ids = _op_args()
    bad = class_ids.clone()
    bad[17] = 400
    for rerank in ("query", "cell"):
        with pytest.raises(RuntimeError, match=r"class_ids has class id 400 at \[17\] outside \[0, N = 400\)"):
            ops.midx_search(q, w, b, s1, s2, offsets, bad, 5, 400, rerank)
    with pytest.raises(RuntimeError, match="offsets must start at 0, never decrease"):
        ops.midx_search(q, w, b, s1, s2, offsets.flip(0), class_ids, 5, 50)
    with pytest.raises(RuntimeError, match="offsets must start at 0, never decrease"):
        ops.midx_search_cells(s1, s2, offsets - 1, 50)
    with pytest.raises(RuntimeError, match=r"offsets must be int64 \[K\*K\+1\]"):
        ops.midx_search_cells(s1, s2, offsets[:-1], 50)
    with pytest.raises(RuntimeError, match="the index holds 400 classes but weight has 300"):
        ops.midx_search(q, w[:300], b[:300], s1, s2, offsets, class_ids, 5, 50)
    with pytest.raises(RuntimeError, match=r"budget \(4\) must be >= k \(5\)"):
        ops.midx_search(q, w, b, s1, s2, offsets, class_ids, 5, 4)
    with pytest.raises(RuntimeError, match="k must lie in"):
        ops.midx_search(q, w, b, s1, s2, offsets, class_ids, 401, 500)
    with pytest.raises(RuntimeError, match="budget"):
        ops.midx_search_cells(s1, s2, offsets, 0)
    with pytest.raises(RuntimeError, match="cast the query"):
        ops.midx_search(q.double(), w, b, s1, s2, offsets, class_ids, 5, 50)
    with pytest.raises(RuntimeError, match="one row per query"):
        ops.midx_search(q, w, b, s1[:3], s2[:3], offsets, class_ids, 5, 50)
    with pytest.raises(RuntimeError, match="float32"):
        ops.midx_search_cells(s1.double(), s2.double(), offsets, 50)
    with pytest.raises(RuntimeError, match="class_ids must be contiguous int64 or int32"):
        ops.midx_search(q, w, b, s1, s2, offsets, class_ids.float(), 5, 50)


def _tied_args(device="cpu"):
    """Op arguments whose rerank scores tie: 40 distinct weight rows, each the row of 10 classes, and
    a bias of -inf on every tenth class (real candidates that score -inf)."""
    q, w, b, s1, s2, offsets, class_ids = _op_args()
    rep = torch.arange(w.shape[0]) % 40
    w, b = w[rep], b[rep].clone()
    b[::10] = float("-inf")
    return [t.to(device) for t in (q, w, b, s1, s2, offsets, class_ids)]


def _check_ties_by_id(ids, scores):
    """Real ids only, each once, equal scores by ascending id."""
    for row_ids, row_scores in zip(ids.tolist(), scores.tolist()):
        assert all(i >= 0 for i in row_ids)
        pairs = list(zip(row_scores, row_ids))
        assert pairs == sorted(pairs, key=lambda p: (-p[0], p[1]))
        assert len(set(row_ids)) == len(row_ids)


@pytest.mark.parametrize("rerank", ["query", "cell"])
def test_tied_scores_go_to_the_smaller_id(rerank):
    """budget = N: every class is a candidate, so the result is the exact top-k by (score, then id)
    against a float64 reference, also where the k-th place falls inside a tie and where candidates
    score -inf (k = N). Tied classes share a weight row, so they tie in float64 as well."""
    q, w, b, s1, s2, offsets, class_ids = _tied_args()
    n = w.shape[0]
    # one product per distinct row, shared by its classes (the float64 GEMM may round two copies of a
    # row differently)
    ref = (q.double() @ w.double().T)[:, torch.arange(n) % 40] + b.double()
    for k in (25, n):
        ids, scores = ops.midx_search(q, w, b, s1, s2, offsets, class_ids, k, n, rerank)
        _check_ties_by_id(ids, scores)
        for r in range(q.shape[0]):
            want = sorted(range(n), key=lambda i: (-ref[r, i].item(), i))[:k]
            assert ids[r].tolist() == want


# --- CUDA ---------------------------------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_cuda_equals_cpu(dtype, id_dtype):
    cpu = _op_args(dtype=dtype, id_dtype=id_dtype)
    gpu = [None if t is None else t.cuda() for t in cpu]
    for budget in (9, 120, 400):
        a = ops.midx_search_cells(*cpu[3:6], budget)
        c = ops.midx_search_cells(*gpu[3:6], budget)
        assert torch.equal(a[0], c[0].cpu()) and torch.equal(a[1], c[1].cpu())
        ids, scores = ops.midx_search(*cpu, 9, budget)
        gids, gscores = ops.midx_search(*gpu, 9, budget)
        assert torch.equal(ids, gids.cpu())
        torch.testing.assert_close(scores, gscores.cpu())


@needs_cuda
def test_cuda_ties_and_minus_inf_scores_equal_cpu():
    """CUDA picks the k best with stable sorts: ties to the smaller id and real -inf candidates before
    its padding, as the CPU (torch.topk leaves both open)."""
    cpu = _tied_args()
    gpu = [t.cuda() for t in cpu]
    n = cpu[1].shape[0]
    for k, budget in ((25, n), (n, n), (9, 120)):
        ids, scores = ops.midx_search(*cpu, k, budget)
        gids, gscores = ops.midx_search(*gpu, k, budget)
        assert torch.equal(ids, gids.cpu())
        torch.testing.assert_close(scores, gscores.cpu())


@needs_cuda
def test_cuda_bad_class_id_is_named():
    q, w, b, s1, s2, offsets, class_ids = (t.cuda() for t in _op_args())
    bad = class_ids.clone()
    bad[17] = -2
    with pytest.raises(RuntimeError, match=r"class_ids has class id -2 at \[17\]"):
        ops.midx_search(q, w, b, s1, s2, offsets, bad, 5, 400)


@needs_kernels
def test_fallback_cells_equal_compiled_under_ties():
    """The fallback's batched visit (all rows sorted at once) gives the compiled walk's cells and
    counts when scores tie a lot (integer scores), cells are empty, B is 0 or 1, and the budget
    exceeds N."""
    g = torch.Generator().manual_seed(0)
    for k in (3, 8, 16):
        sizes = torch.randint(0, 3, (k * k,), generator=g)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])
        for rows in (0, 1, 9):
            s1 = torch.randint(-2, 3, (rows, k), generator=g).float()
            s2 = torch.randint(-2, 3, (rows, k), generator=g).float()
            for budget in (1, 5, 40, 10**6):
                got = ops.midx_search_cells(s1, s2, offsets, budget)
                want = fb.midx_search_cells(s1, s2, offsets, budget)
                assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (k, rows, budget)
