import math

import pytest
import torch

import imi_softmax  # noqa: F401  (loads the ops)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def reference_midx_log_q(sampler, query):
    """float64 log Q(i | query) for all classes, straight from the definition:
    log_softmax_i(s1[a1(i)] + s2[a2(i)] + beta_i), with s1, s2 from the codebooks."""
    c1, c2 = (c.to(torch.float64) for c in sampler.codebooks)
    q = query.to(torch.float64)
    if sampler.quantizer == "rq":
        s1, s2 = q @ c1.T, q @ c2.T
    else:
        h = q.shape[1] // 2
        s1, s2 = q[:, :h] @ c1.T, q[:, h:] @ c2.T
    logits = s1[:, sampler.code1] + s2[:, sampler.code2]
    if sampler.beta is not None:
        logits = logits + sampler.beta.to(torch.float64)
    return torch.log_softmax(logits, dim=1)


def reference_loss(x, w, b, target, ids, log_q, target_log_q, remove_hits=True, ignore_index=-100):
    """Row losses of DESIGN.md's formula, with plain torch ops in float64."""
    x, w = x.double(), w.double()
    all_ids = torch.cat([target.clamp_min(0).unsqueeze(1), ids], 1)
    o = torch.einsum("bd,bmd->bm", x, w[all_ids])
    if b is not None:
        o = o + b.double()[all_ids]
    u = o - torch.cat([target_log_q.unsqueeze(1), log_q], 1).double()
    if remove_hits:
        u[:, 1:] = u[:, 1:].masked_fill(ids == target.unsqueeze(1), -math.inf)
    rows = torch.logsumexp(u, 1) - u[:, 0]
    return torch.where(target == ignore_index, torch.zeros_like(rows), rows)


def make_loss_inputs(B=6, N=40, d=5, M=7, dtype=torch.float64, device="cpu", seed=0, bias=True):
    """Inputs of the sampled loss: x [B, d], w [N, d], b [N] (requiring grad, drawn in float64 and
    cast to dtype, so every dtype sees the same values), targets [B], negatives [B, M] with
    accidental hits in row 0, and their log Q (target_log_q [B])."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g, dtype=torch.float64).to(dtype).to(device).requires_grad_()
    w = torch.randn(N, d, generator=g, dtype=torch.float64).to(dtype).to(device).requires_grad_()
    b = torch.randn(N, generator=g, dtype=torch.float64).to(dtype).to(device).requires_grad_() if bias else None
    target = torch.randint(0, N, (B,), generator=g).to(device)
    ids = torch.randint(0, N, (B, M), generator=g).to(device)
    ids[0, :3] = target[0]  # accidental hits
    log_q = (torch.rand(B, M, generator=g) * -3 - 1).to(device)
    tlq = (torch.rand(B, generator=g) * -3 - 1).to(device)
    return x, w, b, target, ids, log_q, tlq


def chi_square_p_value(counts, expected, min_expected=5.0):
    """Goodness-of-fit p-value of observed counts against expected counts (same total), pooling
    the bins whose expected count is below min_expected into one bin (merged into the last kept
    bin when the pool itself is still too small), as the chi-square approximation requires.
    Returns (p_value, chi2, dof)."""
    from scipy import stats

    counts, expected = counts.double().cpu(), expected.double().cpu()
    keep = expected >= min_expected
    obs, exp = counts[keep].clone(), expected[keep].clone()
    rest_obs, rest_exp = counts[~keep].sum(), expected[~keep].sum()
    if rest_exp >= min_expected:
        obs, exp = torch.cat([obs, rest_obs.view(1)]), torch.cat([exp, rest_exp.view(1)])
    elif obs.numel() > 0:
        obs[-1] += rest_obs
        exp[-1] += rest_exp
    dof = obs.numel() - 1
    if dof < 1:
        raise ValueError("too few draws for a chi-square test: fewer than two bins after pooling")
    chi2 = ((obs - exp) ** 2 / exp).sum().item()
    return stats.chi2.sf(chi2, dof), chi2, dof


def random_index(n, k, bias, seed, device="cpu", code2_values=None):
    """build_cells on random codes (no k-means): any K, any cell occupancy. code2_values restricts
    the second code to those codewords (the other columns of cells stay empty).
    Returns ((code1, code2, beta), build_cells outputs)."""
    from imi_softmax import ops

    g = torch.Generator().manual_seed(seed)
    code1 = torch.randint(0, k, (n,), generator=g)
    if code2_values is None:
        code2 = torch.randint(0, k, (n,), generator=g)
    else:
        allowed = torch.as_tensor(code2_values)
        code2 = allowed[torch.randint(0, allowed.numel(), (n,), generator=g)]
    beta = torch.randn(n, generator=g) * 2 if bias else None
    code1, code2 = code1.to(device, torch.int32), code2.to(device, torch.int32)  # the index's codes are int32
    beta = beta.to(device) if beta is not None else None
    return (code1, code2, beta), ops.build_cells(code1, code2, beta, k)


def sample_args(index, bias):
    """The index arguments of midx_sample / midx_sample_seeded after s1, s2, from build_cells outputs
    (the alias tables are passed as None without a bias, as MIDXSampler does)."""
    offsets, class_ids, alias_prob, alias_pos, beta_csr, log_n, cell_mass, log_n_max = index
    opt = (lambda t: t) if bias else (lambda t: None)
    return (log_n, cell_mass, log_n_max, offsets, class_ids, opt(alias_prob), opt(alias_pos), opt(beta_csr))


def reference_log_q_from_codes(s1, s2, code1, code2, beta):
    """float64 log Q(i | row) for all classes from the definition: log_softmax_i(s1[a1(i)] + s2[a2(i)] + beta_i)."""
    logits = s1.double()[:, code1] + s2.double()[:, code2]
    if beta is not None:
        logits = logits + beta.double()
    return torch.log_softmax(logits, dim=1)


def implied_position_mass(offsets, alias_prob, alias_pos):
    """Probability of each CSR position under its cell's alias table (uniform slot, then alias)."""
    counts = (offsets[1:] - offsets[:-1]).double()
    n = alias_prob.numel()
    cell_of_pos = torch.repeat_interleave(torch.arange(counts.numel(), device=offsets.device), counts.long())
    mass = alias_prob.double().clone()
    mass.index_add_(0, alias_pos, 1.0 - alias_prob.double())
    return mass / counts[cell_of_pos][:n]


def cpu_simd_levels() -> set:
    """The draw-pass levels this CPU runs (csrc/cpu/draw_passes.h): portable always, avx2 and avx512
    where /proc/cpuinfo lists the flags (x86-64 Linux)."""
    levels = {"portable"}
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    if "avx2" in flags:
        levels.add("avx2")
    if "avx512f" in flags:
        levels.add("avx512")
    return levels


@pytest.fixture(params=["auto", "avx2", "portable"])
def cpu_draw_passes(request, monkeypatch):
    """Runs a CPU sampling test with the widest draw passes the CPU has ("auto": AVX-512 or AVX2),
    with the AVX2 passes where the CPU also has AVX-512 (elsewhere "auto" already runs them), and
    with the portable passes that call the shared header bodies. csrc/cpu/draw_passes.h reads
    IMI_CPU_SIMD on every call, so setting it in-process is enough."""
    if request.param == "avx2" and not {"avx2", "avx512"} <= cpu_simd_levels():
        pytest.skip("the AVX2 passes run as 'auto' on this CPU (or it lacks AVX2)")
    if request.param == "auto":
        monkeypatch.delenv("IMI_CPU_SIMD", raising=False)
    else:
        monkeypatch.setenv("IMI_CPU_SIMD", request.param)
    return request.param


def compiled_and_eager_step(head, x, y, **compile_kwargs):
    """One training step of head (loss and backward) compiled with fullgraph=True and one eager, each
    from global seed 5 (so both draw the same samples). Returns (compiled step, (loss, x.grad,
    weight.grad, bias.grad) of the compiled step, the same of the eager step)."""
    def step(x, y):
        return head(x, y)

    compiled = torch.compile(step, fullgraph=True, **compile_kwargs)
    results = []
    for fn in (compiled, step):
        torch.manual_seed(5)
        x.grad = head.weight.grad = head.bias.grad = None
        loss = fn(x, y)
        loss.backward()
        results.append((loss.detach(), x.grad, head.weight.grad, head.bias.grad))
    return compiled, results[0], results[1]
