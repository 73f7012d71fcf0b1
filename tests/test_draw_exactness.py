"""Exactness of the MIDX draw (CONTRACT.md section 1): the within-cell slot law, the Philox counter
mapping, log Q normalization at large magnitudes, the targets' log Q from the sampling op, and
empty batches / zero draws. CPU; the CUDA kernels run the same header bodies."""
import math
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
from scipy import stats

from imi_softmax import MIDXSampler
from conftest import cpu_simd_levels

ops = torch.ops.imi_softmax
F32_EPS = torch.finfo(torch.float32).eps
MASK32 = 0xFFFFFFFF


def chi2_p_value(counts: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson chi-square p-value of counts [n] against expected counts [n] (all >= 5)."""
    counts, expected = counts.double(), expected.double()
    assert expected.min() >= 5, "chi-square needs expected counts >= 5"
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    return stats.chi2.sf(chi2, counts.numel() - 1)


def index_args(s: MIDXSampler):
    return (s.log_n, s.cell_mass, s.log_n_max, s.offsets, s.class_ids, s.alias_prob, s.alias_pos, s.beta_csr)


def one_cell_index(n: int, beta=None):
    """build_cells with every class in the single cell of K = 1: (offsets, class_ids, alias_prob,
    alias_pos, beta_csr, log_n, cell_mass, log_n_max). code1 and code2 share one zero tensor, so the
    2^25 case holds two int32 [N] tensors (codes and class_ids, 128 MiB each) at its peak."""
    zeros = torch.zeros(n, dtype=torch.int32)
    out = ops.build_cells(zeros, zeros, beta, 1)
    del zeros
    return out


def seeded(s1, s2, idx, num_samples, seed, offset, **kw):
    offsets, class_ids, ap, apos, bcsr, log_n, cell_mass, log_n_max = idx
    has_bias = ap.numel() > 0
    return ops.midx_sample_seeded(s1, s2, log_n, cell_mass, log_n_max, offsets, class_ids,
                                  ap if has_bias else None, apos if has_bias else None,
                                  bcsr if has_bias else None, num_samples, seed, offset, **kw)


# ---- the within-cell slot: 64-bit multiply-high ------------------------------------------------

def test_slot_law_in_a_cell_of_2_25_classes(device):
    """One cell of 2^25 classes, no bias: every class has probability 2^-25, so the high 5 bits and
    the low 8 bits of the drawn ids are uniform. A 24-bit uniform times the cell size (the former
    method) only reaches even slots here: the low-bit histogram rejects it at any sample size."""
    n = 2 ** 25
    idx = one_cell_index(n)
    assert torch.equal(idx[1][:5], torch.arange(5)) and idx[1][-1] == n - 1  # slot == class id
    B, M = 4, 2 ** 18
    s = torch.zeros(B, 1, device=device)
    ids, log_q, _ = seeded(s, s, tuple(t.to(device) for t in idx), M, seed=20250101, offset=0)
    del idx
    ids, log_q = ids.cpu(), log_q.cpu()
    assert ids.min() >= 0 and ids.max() < n
    torch.testing.assert_close(log_q, torch.full_like(log_q, -25 * math.log(2)), atol=4e-6, rtol=0)
    total = B * M
    for name, bins, digit in (("high 5 bits", 32, ids >> 20), ("low 8 bits", 256, ids & 255)):
        counts = torch.bincount(digit.flatten(), minlength=bins)
        p = chi2_p_value(counts, torch.full((bins,), total / bins))
        assert p > 1e-4, f"{name}: p = {p:.2e}"
    # the low bit alone: a binomial(total, 1/2) count, |z| < 4.5 (two-sided p ~ 7e-6)
    odd = (ids & 1).sum().item()
    assert abs(odd - total / 2) / math.sqrt(total / 4) < 4.5


def test_alias_law_in_a_biased_cell():
    """One cell of 37 classes with biases: the draws follow softmax(beta) (Walker's method with the
    multiply's leftover fraction as acceptance uniform), chi-square against a float64 reference."""
    g = torch.Generator().manual_seed(3)
    n = 37
    beta = torch.randn(n, generator=g) * 1.5
    idx = one_cell_index(n, beta)
    B, M = 4, 50000
    s = torch.zeros(B, 1)
    ids, log_q, _ = seeded(s, s, idx, M, seed=99, offset=0)
    p = torch.softmax(beta.double(), 0)
    counts = torch.bincount(ids.flatten(), minlength=n)
    expected = p * B * M
    assert expected.min() >= 5
    assert chi2_p_value(counts, expected) > 1e-4
    torch.testing.assert_close(log_q.double(), p.log()[ids], atol=2e-6, rtol=0)


# ---- the Philox counters -----------------------------------------------------------------------

def philox4x32_10(counter, key):
    """Reference Philox4x32-10 in Python integers (Salmon et al. 2011)."""
    c = list(counter)
    k0, k1 = key
    for _ in range(10):
        p0 = 0xD2511F53 * c[0]
        p1 = 0xCD9E8D57 * c[2]
        c = [((p1 >> 32) ^ c[1] ^ k0) & MASK32, p1 & MASK32, ((p0 >> 32) ^ c[3] ^ k1) & MASK32, p0 & MASK32]
        k0 = (k0 + 0x9E3779B9) & MASK32
        k1 = (k1 + 0xBB67AE85) & MASK32
    return c


def contract_slot(seed, offset, row, draw, count):
    """CONTRACT.md section 1, stage 3: (slot, acceptance uniform) of draw `draw` of query `row`."""
    c = offset // 4 + draw
    w = philox4x32_10([c & MASK32, c >> 32, row & MASK32, row >> 32], [seed & MASK32, seed >> 32])
    r = (w[2] << 32) | w[3]
    p = r * count
    return p >> 64, ((p & (2**64 - 1)) >> 40) * 2.0**-24


@pytest.mark.parametrize("bias", [False, True])
def test_draws_follow_the_contract_bit_for_bit(bias, device):
    """With one cell, stages 1 and 2 are trivial and every id is the contract's stage 3 of the
    Philox words: counter (offset/4 + j, row), 128-bit product of r = (w2 << 32) | w3 and the count,
    alias acceptance from the product's low half. Checked against a Python Philox."""
    n = 1000003  # not a power of two: the multiply-high is not a shift
    beta = torch.randn(n, generator=torch.Generator().manual_seed(0)) if bias else None
    idx = one_cell_index(n, beta)
    offsets, class_ids, ap, apos = idx[0], idx[1], idx[2], idx[3]
    seed, offset, B, M = 0x1234_5678_9ABC_DEF0, 4 * (2**32 - 3), 3, 9  # the counter carries at j = 3
    s = torch.zeros(B, 1, device=device)
    ids, _, _ = seeded(s, s, tuple(t.to(device) for t in idx), M, seed=seed, offset=offset)
    ids = ids.cpu()
    for row in range(B):
        for j in range(M):
            slot, u = contract_slot(seed, offset, row, j, n)
            pos = slot
            if bias and not (u < ap[pos].item()):
                pos = apos[pos].item()
            assert ids[row, j].item() == class_ids[pos].item(), (row, j)


def make_sampler(n=3000, d=12, k=16, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, d, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    return MIDXSampler(num_codewords=k).build(w, b)


@pytest.mark.parametrize("bias", [False, True])
def test_offset_continues_the_stream_without_overlap(bias):
    """How the counters map to torch's contract: torch's philox_cuda_state(increment) hands each
    thread `increment` 32-bit outputs starting at its offset and advances the generator by it. Our
    "thread" is the query row (the Philox counter's high half), and draw j consumes one 128-bit
    block (4 outputs) at block offset / 4 + j. A call of M draws therefore reserves 4 * M, and the
    next call (offset + 4 * M) starts at block M + offset / 4: exactly the draws j = M .. 2M-1 of one
    call with 2M draws. So consecutive calls never reuse a block, on CPU and CUDA alike."""
    s = make_sampler(bias=bias)
    g = torch.Generator().manual_seed(1)
    s1, s2 = s.scores(torch.randn(5, 12, generator=g))
    M, seed = 37, 2024
    args = (s1, s2, *index_args(s))
    ids2, lq2, _ = ops.midx_sample_seeded(*args, 2 * M, seed, 0)
    ids_a, lq_a, _ = ops.midx_sample_seeded(*args, M, seed, 0)
    ids_b, lq_b, _ = ops.midx_sample_seeded(*args, M, seed, 4 * M)
    assert torch.equal(ids_a, ids2[:, :M]) and torch.equal(lq_a, lq2[:, :M])
    assert torch.equal(ids_b, ids2[:, M:]) and torch.equal(lq_b, lq2[:, M:])
    assert not torch.equal(ids_a, ids_b)
    for bad in (2, -4):
        with pytest.raises(RuntimeError, match="multiple of 4"):
            ops.midx_sample_seeded(*args, M, seed, bad)


# ---- log Q normalized for large scores and biases ----------------------------------------------

def reference_log_q(s1, s2, code1, code2, beta):
    """float64 log Q of every class from the float32 inputs the op sees: [B, N]."""
    logits = s1.double()[:, code1] + s2.double()[:, code2]
    if beta is not None:
        logits = logits + beta.double()
    return torch.log_softmax(logits, 1)


@pytest.mark.parametrize("score_center,score_spread", [(1e4, 1.0), (-1e4, 3.0), (0.0, 1e4), (5e3, 30.0)])
@pytest.mark.parametrize("bias_center", [None, 1e4, -1e4, "mixed"])
def test_log_q_normalized_for_scores_and_biases_up_to_1e4(score_center, score_spread, bias_center, device):
    """|logsumexp_i log Q(i)| < 1e-5 in fp32 with scores up to 1e4 and biases of +-1e4 (the
    preparation works on scores and biases shifted by their maxima; the cell masses are summed in
    float64), and log Q matches a float64 reference from the same float32 inputs within the fp32
    rounding of terms of size |log Q|. Draws land on classes with mass; their log Q is log_prob's."""
    n, K, B = 4000, 16, 6
    g = torch.Generator().manual_seed(7)
    code1 = torch.randint(0, K, (n,), generator=g).int()  # the index's codes are int32
    code2 = torch.randint(0, K, (n,), generator=g).int()
    if bias_center is None:
        beta = None
    elif bias_center == "mixed":
        beta = torch.where(torch.rand(n, generator=g) < 0.5, 1e4, -1e4) + torch.randn(n, generator=g) * 2
    else:
        beta = bias_center + torch.randn(n, generator=g) * 2
    s1 = score_center + torch.randn(B, K, generator=g) * score_spread
    s2 = score_center + torch.randn(B, K, generator=g) * score_spread
    on = (lambda t: None if t is None else t.to(device))
    cells = ops.build_cells(on(code1), on(code2), on(beta), K)
    offsets, class_ids, ap, apos, bcsr, log_n, cell_mass, log_n_max = cells
    lp = ops.midx_log_prob(on(s1), on(s2), log_n, cell_mass, log_n_max, on(beta), on(code1), on(code2),
                           torch.arange(n, device=device).expand(B, n).contiguous()).cpu()
    lse = torch.logsumexp(lp.double(), 1)
    assert lse.abs().max() < 1e-5, lse
    ref = reference_log_q(s1, s2, code1, code2, beta)
    keep = ref > -30
    # a handful of fp32 roundings of terms no larger than |log Q| + log N (the shifted scores, the
    # shifted bias and log Z' of a class with mass are all that small)
    tol = 8 * F32_EPS * (ref.abs() + math.log(n))
    assert ((lp.double() - ref).abs() <= tol)[keep].all()
    opt = (lambda t: t if beta is not None else None)
    ids, log_q, tlq = ops.midx_sample_seeded(on(s1), on(s2), log_n, cell_mass, log_n_max, offsets, class_ids,
                                             opt(ap), opt(apos), opt(bcsr), 400, 5, 0,
                                             targets=on(ids_first(ref)), beta=on(beta), code1=on(code1),
                                             code2=on(code2))
    ids, log_q, tlq = ids.cpu(), log_q.cpu(), tlq.cpu()
    assert (ref.gather(1, ids) > -30).all()
    torch.testing.assert_close(log_q, lp.gather(1, ids), atol=0, rtol=0)
    torch.testing.assert_close(tlq, lp.gather(1, ids_first(ref)), atol=0, rtol=0)


def ids_first(ref):
    """The most likely class of each row and class 0: [B, 2]."""
    return torch.stack([ref.argmax(1), torch.zeros(ref.shape[0], dtype=torch.int64)], 1)


# ---- the targets' log Q from the sampling op ---------------------------------------------------

@pytest.mark.parametrize("bias", [False, True])
def test_target_log_q_from_the_sampling_op_equals_log_prob(bias):
    """One query preparation serves the draws and the targets: target_log_q is bit-equal to
    midx_log_prob (atol = 0); the ignore marker (negative) gets 0.0; the draws are those of the call
    without targets."""
    s = make_sampler(bias=bias)
    g = torch.Generator().manual_seed(2)
    s1, s2 = s.scores(torch.randn(7, 12, generator=g))
    targets = torch.randint(0, s.num_classes, (7, 3), generator=g)
    targets[2, 1] = -100
    targets[5, 0] = -1
    args = (s1, s2, *index_args(s))
    codes = dict(beta=s.beta, code1=s.code1, code2=s.code2)
    ids, log_q, tlq = ops.midx_sample_seeded(*args, 25, 11, 8, targets=targets, **codes)
    ids0, log_q0, none = ops.midx_sample_seeded(*args, 25, 11, 8)
    assert torch.equal(ids, ids0) and torch.equal(log_q, log_q0) and none.shape == (7, 0)
    lp = ops.midx_log_prob(s1, s2, s.log_n, s.cell_mass, s.log_n_max, s.beta, s.code1, s.code2,
                           targets.clamp_min(0))
    expected = torch.where(targets < 0, torch.zeros_like(lp), lp)
    assert tlq.dtype == torch.float32 and tlq.shape == (7, 3)
    torch.testing.assert_close(tlq, expected, atol=0, rtol=0)
    assert tlq[2, 1] == 0 and tlq[5, 0] == 0
    # the generator op too
    _, _, tlq_gen = ops.midx_sample(*args, 4, torch.Generator().manual_seed(0), targets=targets, **codes)
    torch.testing.assert_close(tlq_gen, expected, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="code1 and code2"):
        ops.midx_sample_seeded(*args, 4, 1, 0, targets=targets)
    with pytest.raises(RuntimeError, match=r"targets has class id \d+ at \[0, 0\] outside"):
        ops.midx_sample_seeded(*args, 4, 1, 0, targets=targets + s.num_classes, **codes)
    bad_codes = s.code1.clone()
    bad_codes[targets[0, 0]] = s.num_codewords  # read as t1[K]: out of bounds without the check
    with pytest.raises(RuntimeError, match=r"has codes \(.*\) outside \[0, K"):
        ops.midx_sample_seeded(*args, 4, 1, 0, targets=targets, beta=s.beta, code1=bad_codes, code2=s.code2)
    if bias:
        with pytest.raises(RuntimeError, match="beta must be"):
            ops.midx_sample_seeded(*args, 4, 1, 0, targets=targets, beta=s.beta[:-1], code1=s.code1,
                                   code2=s.code2)


def test_empty_batch_and_zero_samples():
    """B = 0 and num_samples = 0 are valid: empty outputs of the right shapes and dtypes; with M = 0
    the targets' log Q is still computed."""
    s = make_sampler(n=500, k=6)
    s1, s2 = s.scores(torch.randn(3, 12, generator=torch.Generator().manual_seed(4)))
    codes = dict(beta=s.beta, code1=s.code1, code2=s.code2)
    targets = torch.tensor([[1], [2], [-100]])
    ids, log_q, tlq = ops.midx_sample_seeded(s1, s2, *index_args(s), 0, 1, 0, targets=targets, **codes)
    assert ids.shape == (3, 0) and ids.dtype == torch.int64 and log_q.shape == (3, 0)
    expected = ops.midx_log_prob(s1, s2, s.log_n, s.cell_mass, s.log_n_max, s.beta, s.code1, s.code2,
                                 targets.clamp_min(0))
    torch.testing.assert_close(tlq, torch.where(targets < 0, 0.0, expected), atol=0, rtol=0)
    e1, e2 = s1[:0], s2[:0]
    for m in (0, 5):
        ids, log_q, tlq = ops.midx_sample(e1, e2, *index_args(s), m, None,
                                          targets=targets[:0], **codes)
        assert ids.shape == (0, m) and log_q.shape == (0, m) and tlq.shape == (0, 1)


def test_empty_batch_sets_up_no_scratch_for_its_num_samples():
    """The CPU ops set up per-thread scratch inside their parallel loop; midx_sample's is sized by
    num_samples. An empty batch runs no loop body, so 2^31 + 5 draws for no query return at once
    (they used to allocate and touch that scratch for minutes). In a subprocess, so that a
    regression fails by its time limit instead of stalling the suite."""
    script = (
        "import torch\n"
        "from imi_softmax import MIDXSampler, ops\n"
        "s = MIDXSampler(4).build(torch.randn(50, 8))\n"
        "s1, s2 = s.scores(torch.randn(0, 8))\n"
        "m = 2 ** 31 + 5\n"
        "for seeded in (False, True):\n"
        "    args = (s1, s2, s.log_n, s.cell_mass, s.log_n_max, s.offsets, s.class_ids, s.alias_prob,\n"
        "            s.alias_pos, s.beta_csr, m)\n"
        "    out = ops.midx_sample_seeded(*args, 1, 0) if seeded else ops.midx_sample(*args, None)\n"
        "    assert out[0].shape == (0, m) and out[1].shape == (0, m), out[0].shape\n"
        "print('ok')\n")
    env = dict(os.environ, OMP_NUM_THREADS="2")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env,
                       cwd=pathlib.Path(__file__).resolve().parent)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_sample_ops_pass_opcheck():
    """The schemas, the CPU kernels and the fakes (three outputs) agree under torch.library.opcheck."""
    s = make_sampler(n=300, k=6)
    s1, s2 = s.scores(torch.randn(4, 12, generator=torch.Generator().manual_seed(5)))
    targets = torch.tensor([[0, 5], [-100, 7], [299, 1], [3, 3]])
    codes = dict(beta=s.beta, code1=s.code1, code2=s.code2)
    torch.library.opcheck(ops.midx_sample_seeded.default, (s1, s2, *index_args(s), 16, 3, 4),
                          dict(targets=targets, **codes))
    torch.library.opcheck(ops.midx_sample_seeded.default, (s1, s2, *index_args(s), 16, 3, 0))
    # the generator advances between opcheck's runs: eager and traced draws differ by design, so the
    # output comparison of test_aot_dispatch_dynamic does not apply to this op
    torch.library.opcheck(ops.midx_sample.default, (s1, s2, *index_args(s), 16, torch.Generator().manual_seed(0)),
                          dict(targets=targets, **codes),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


# ---- the CUDA kernel's arrangement of the bodies, on the host ----------------------------------

@pytest.fixture(scope="module")
def gpu_mapping_check(tmp_path_factory):
    """tests/cpp/gpu_mapping_check.cpp built with the extension's host flags (setup.py)."""
    if shutil.which("g++") is None:
        pytest.skip("needs g++ to build the host check")
    root = pathlib.Path(__file__).resolve().parents[1]
    exe = tmp_path_factory.mktemp("cpp") / "gpu_mapping_check"
    build = subprocess.run(["g++", "-O3", "-std=c++20", "-fopenmp", "-fno-trapping-math",
                            f"-I{root / 'csrc' / 'include'}", f"-I{root / 'csrc'}",
                            str(root / "tests" / "cpp" / "gpu_mapping_check.cpp"), "-o", str(exe)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    return exe


@pytest.mark.parametrize("simd", ["auto", "avx2", "portable"])
def test_gpu_block_mapping_equals_cpu_passes_bitwise(gpu_mapping_check, simd):
    """tests/cpp/gpu_mapping_check.cpp runs the CUDA kernel's arrangement of the shared bodies (one
    stage-2 row per thread, block maxima, one thread cumulating stage 1, table and streaming stage 2,
    stage 3 per draw) with threads as loops, and requires every intermediate and every draw to equal
    the CPU passes (the widest the CPU has, AVX2, portable) bit for bit, over K = 6..100, biased and
    unbiased, underflowing rows and scores around 1e4."""
    if simd == "avx2" and "avx2" not in cpu_simd_levels():
        pytest.skip("the AVX2 draw passes need a CPU with AVX2")
    run = subprocess.run([str(gpu_mapping_check)], capture_output=True, text=True,
                         env={**os.environ, "IMI_CPU_SIMD": simd}, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout[-2000:]
