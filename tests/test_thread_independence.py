"""The CPU kernels hand out their rows in chunks that the threads claim as they come
(csrc/cpu/parallel_chunks.h), so which thread computes a row depends on scheduling. The results must
not: every op here is bit-identical with 1, 2 and 4 threads and on repeated runs."""
import pytest
import torch

from imi_softmax import MIDXSampler, ops


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _run_all(s, w, b):
    """Every CPU op on one index (built once: k-means goes through BLAS, whose rounding may depend on
    the thread count), with skewed cells so that the chunks differ in cost."""
    g = torch.Generator().manual_seed(1)
    n, B, M = w.shape[0], 70, 37
    x = torch.randn(B, w.shape[1], generator=g)
    s1, s2 = s.scores(x)
    targets = torch.randint(0, n, (B, 1), generator=g)
    ids, log_q, tlq = ops.midx_sample_seeded(s1, s2, s.log_n, s.cell_mass, s.log_n_max, s.offsets, s.class_ids,
                                             s.alias_prob, s.alias_pos, s.beta_csr, M, 77, 0, targets=targets,
                                             beta=s.beta, code1=s.code1, code2=s.code2)
    lp = ops.midx_log_prob(s1, s2, s.log_n, s.cell_mass, s.log_n_max, s.beta, s.code1, s.code2, ids)
    all_ids = torch.cat([targets, ids], 1)
    all_lq = torch.cat([tlq, log_q], 1)
    loss, lse = ops.sampled_softmax_forward(x, w, b, all_ids, all_lq, True, -1, False)
    grad_x, coef = ops.sampled_softmax_backward(torch.ones(B), x, w, b, all_ids, all_lq, lse, True, -1)
    dense_w, dense_b = ops.dense_weight_grad(coef, all_ids, x, n)
    uniq, rows, bias_rows = ops.sparse_weight_grad(coef, all_ids, x, n)
    cells = ops.build_cells(s.code1, s.code2, s.beta, s.num_codewords)
    found = [t for rerank in ("query", "cell")
             for t in ops.midx_search(x, w, b, s1, s2, s.offsets, s.class_ids, 10, 500, rerank)]
    return [*cells, ids, log_q, tlq, lp, loss, lse, grad_x, coef, dense_w, dense_b, uniq, rows, bias_rows, *found]


def test_cpu_kernels_do_not_depend_on_the_thread_count(threads):
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(20000, 16, generator=g), torch.randn(20000, generator=g) * 2
    threads(1)
    s = MIDXSampler(num_codewords=32).build(w, b)
    reference = _run_all(s, w, b)
    assert len(reference[-7]) > 100  # many touched classes: many weight-grad chunks
    for count in (2, 4, 2):
        threads(count)
        for got, want in zip(_run_all(s, w, b), reference):
            assert torch.equal(got, want)


def _row_optim_steps(w0, rows, grads):
    """Three steps of each fused row optimizer on copies of w0 (the rows many parallel tasks long)."""
    w_adam, m, v = w0.clone(), torch.zeros_like(w0), torch.zeros_like(w0)
    w_ada, G = w0.clone(), torch.zeros(w0.shape[0])
    for step, g in enumerate(grads, 1):
        ops.row_sparse_adam_(w_adam, m, v, rows, g, 1e-2, 0.9, 0.999, 1e-8, 0.01, step)
        ops.row_wise_adagrad_(w_ada, G, rows, g, 1e-2, 1e-8, 0.01)
    return [w_adam, m, v, w_ada, G]


def test_row_optimizers_do_not_depend_on_the_thread_count(threads):
    g = torch.Generator().manual_seed(2)
    w0 = torch.randn(50000, 64, generator=g)
    rows = torch.randperm(50000, generator=g)[:6000].sort().values  # 12 tasks of 512 rows at d = 64
    grads = [torch.randn(6000, 64, generator=g) for _ in range(3)]
    threads(1)
    reference = _row_optim_steps(w0, rows, grads)
    for count in (2, 4, 2):
        threads(count)
        for got, want in zip(_row_optim_steps(w0, rows, grads), reference):
            assert torch.equal(got, want)
