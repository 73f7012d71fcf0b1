"""Index build in pure PyTorch: nearest codewords and the cells CSR with masses and alias tables.

Same algorithm and rounding as csrc/include/imi_softmax/{kmeans,cells}.h: a stable sort by cell
(ascending id within a cell), log n in float32 from a double sum (logf of the count without a
bias), cell_mass summed in float64 per cell, and Vose's alias tables built in the same order with
float32 arithmetic, so that the tables equal the kernel's bit for bit.
"""
import math
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .proposal import _check_index_array


def _libm_logf():
    """The C library's logf, which the kernel's log n of a cell without a bias is (log_(float(n))):
    glibc's is not correctly rounded (e.g. n = 1579 differs from float(math.log(n)) by one ulp)."""
    try:
        import ctypes
        import ctypes.util
        fn = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6").logf
        fn.restype, fn.argtypes = ctypes.c_float, [ctypes.c_float]
        return fn
    except (OSError, AttributeError):  # no loadable libm: the correctly rounded value
        return lambda v: float(np.float32(math.log(v)))


_LOGF = _libm_logf()


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise RuntimeError(msg)


def assign_codewords(x: Tensor, centroids: Tensor) -> Tuple[Tensor, Tensor]:
    """codes [N] int64 and squared distances [N] (x's dtype) of the nearest centroid ([K, d])."""
    _check(x.dim() == 2 and centroids.dim() == 2 and x.shape[1] == centroids.shape[1],
           f"assign_codewords: x must be [N, d] and centroids [K, d], got {tuple(x.shape)} and {tuple(centroids.shape)}")
    _check(centroids.shape[0] >= 1, "assign_codewords: centroids must hold at least one row")
    _check(x.dtype == centroids.dtype and x.dtype in (torch.float32, torch.float64),
           "assign_codewords: x and centroids must both be float32 or both float64")
    _check(x.device == centroids.device, "assign_codewords: x and centroids must be on one device")
    c_sqnorm = centroids.mul(centroids).sum(1)
    # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; the argmin needs only the last two terms
    d = c_sqnorm - 2 * (x @ centroids.T)
    best_d, codes = d.min(dim=1)  # first minimum on ties, like the kernel's strict <
    sqdist = (best_d + x.mul(x).sum(1)).clamp_min(0)
    return codes, sqdist


def assign_rows(weight: Tensor, rows: Tensor, codebook1: Tensor, codebook2: Tensor,
                residual: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """Codes (int32 [C] each) of weight[rows] widened to float32: against codebook1, then codebook2
    on the residual (``residual``) or on the last columns (codebook1 on the first ones); and whether
    every row and its float32 squared norm are finite."""
    _check(weight.dim() == 2 and weight.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16),
           f"assign_rows: weight must be a float [N, d] tensor, got {weight.dtype} {tuple(weight.shape)}")
    _check(rows.dtype == torch.int64 and rows.dim() == 1,
           f"assign_rows: rows must be int64 [C] (class ids), got {rows.dtype} {tuple(rows.shape)}")
    _check(codebook1.dtype == codebook2.dtype == torch.float32 and codebook1.dim() == codebook2.dim() == 2,
           "assign_rows: codebook1 and codebook2 must be float32 [K, width]")
    _check(1 <= codebook1.shape[0] <= 8192 and 1 <= codebook2.shape[0] <= 8192,
           "assign_rows: num_codewords (K, the codebooks' rows) must lie in [1, 8192]")
    n, d = weight.shape
    widths = (codebook1.shape[1], codebook2.shape[1])
    if residual:
        _check(widths == (d, d), f"assign_rows: with residual=True both codebooks must be [K, {d}] like weight's "
               f"rows, got {tuple(codebook1.shape)} and {tuple(codebook2.shape)}")
    else:
        _check(min(widths) >= 1 and sum(widths) == d,
               f"assign_rows: with residual=False the codebooks' widths must add up to weight's d = {d} (codebook1 "
               f"for the first columns, codebook2 for the rest), got {tuple(codebook1.shape)} and "
               f"{tuple(codebook2.shape)}")
    _check(len({t.device for t in (weight, rows, codebook1, codebook2)}) == 1,
           "assign_rows: weight, rows and the codebooks must be on one device")
    bad = ((rows < 0) | (rows >= n)).nonzero()
    if bad.numel():
        raise RuntimeError(f"assign_rows: rows has class id {int(rows[bad[0, 0]])} at [{int(bad[0, 0])}] "
                         f"outside [0, {n})")
    x = weight[rows].to(torch.float32)
    finite = torch.isfinite(x.pow(2).sum(1)).all()
    if residual:
        code1 = assign_codewords(x, codebook1)[0]
        code2 = assign_codewords(x - codebook1[code1], codebook2)[0]
    else:
        h = widths[0]
        code1 = assign_codewords(x[:, :h].contiguous(), codebook1)[0]
        code2 = assign_codewords(x[:, h:].contiguous(), codebook2)[0]
    return code1.to(torch.int32), code2.to(torch.int32), finite


def _vose(weights: List[float], n: int) -> Tuple[List[np.float32], List[int]]:
    """Alias table of one cell in csrc's order (float32 arithmetic); positions local to the cell."""
    prob = [np.float32(w) for w in weights]
    alias = list(range(n))
    work = [0] * n
    one = np.float32(1.0)
    small, large = 0, n
    for p in range(n):
        if prob[p] < one:
            work[small] = p
            small += 1
        else:
            large -= 1
            work[large] = p
    while small > 0 and large < n:
        small -= 1
        s, l = work[small], work[large]
        alias[s] = l
        prob[l] = (prob[l] + prob[s]) - one
        if prob[l] < one:
            large += 1
            work[small] = l
            small += 1
    while small > 0:  # leftovers from rounding keep their own slot
        small -= 1
        prob[work[small]] = one
    while large < n:
        prob[work[large]] = one
        large += 1
    return prob, alias


def _cell_log_mass_and_alias(beta_cell: np.ndarray, begin: int):
    """log n of one non-empty cell with a bias, and its alias table (global CSR positions)."""
    n = len(beta_cell)
    m = beta_cell.max()
    diffs = [float(b - m) for b in beta_cell]  # float32 subtraction, then to double
    exps = [math.exp(v) for v in diffs]
    total = 0.0
    for e in exps:
        total += e
    prob, alias = _vose([e * n / total for e in exps], n)
    return m + np.float32(math.log(total)), prob, [begin + a for a in alias]


def build_cells(code1: Tensor, code2: Tensor, beta: Optional[Tensor], num_codewords: int):
    """(offsets [K*K+1], class_ids [N], alias_prob, alias_pos, beta_csr ([N] with beta, else [0]),
    log_n [K, K], cell_mass [K, K], log_n_max [1]); see the schema in csrc/ops.cpp."""
    K = int(num_codewords)
    _check(K >= 1, f"build_cells: num_codewords must be >= 1, got {K}")
    _check(code1.dim() == 1 and code1.shape == code2.shape,
           f"build_cells: code1 and code2 must be [N] of equal length, got {tuple(code1.shape)} and {tuple(code2.shape)}")
    _check(code1.dtype == torch.int32 and code2.dtype == torch.int32,
           f"build_cells: code1 and code2 must be int32 (the index's codes are int32), got {code1.dtype} and "
           f"{code2.dtype}: convert them with .to(torch.int32)")
    _check_index_array("build_cells", "code1", code1)
    _check(K <= 3037000499, f"build_cells: num_codewords {K} makes K*K overflow int64")
    n = code1.shape[0]
    if n > 0:
        bad = (code1 < 0) | (code1 >= K) | (code2 < 0) | (code2 >= K)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise RuntimeError(f"build_cells: code of class {i} out of range [0, {K}): "
                               f"({int(code1[i])}, {int(code2[i])})")
    has_beta = beta is not None
    if has_beta:
        _check(beta.dim() == 1 and beta.shape[0] == n and beta.dtype == torch.float32,
               "build_cells: beta must be float32 [N]")
    device = code1.device
    cell = code1.long() * K + code2.long()
    counts = torch.bincount(cell, minlength=K * K)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    class_ids = torch.sort(cell, stable=True).indices.to(torch.int32)
    per_class = n if has_beta else 0
    alias_prob = torch.ones(per_class, dtype=torch.float32)
    alias_pos = torch.arange(per_class, dtype=torch.int32)
    beta_csr = beta[class_ids].cpu() if has_beta else torch.empty(0, dtype=torch.float32)
    log_n = torch.full((K * K,), -math.inf, dtype=torch.float32)
    cnt = counts.cpu()
    if not has_beta:
        nonempty = cnt > 0
        log_n[nonempty] = torch.tensor([_LOGF(float(c)) for c in cnt[nonempty].tolist()], dtype=torch.float32)
    else:
        off = offsets.tolist()
        b_np = beta_csr.numpy()
        prob_np, alias_np, log_n_np = alias_prob.numpy(), alias_pos.numpy(), log_n.numpy()
        for c in cnt.nonzero().flatten().tolist():
            lo, hi = off[c], off[c + 1]
            log_n_np[c], prob, alias = _cell_log_mass_and_alias(b_np[lo:hi], lo)
            prob_np[lo:hi] = prob
            alias_np[lo:hi] = alias
    # finite max: empty cells are -inf (the kernel's masked max)
    log_n_max = log_n.masked_fill(log_n.isneginf(), -torch.finfo(torch.float32).max).max().reshape(1)
    cell_mass = _cell_scaled_mass(cnt.tolist(), offsets.tolist(), beta_csr.numpy() if has_beta else None,
                                  float(log_n_max))
    return (offsets, class_ids, alias_prob.to(device), alias_pos.to(device), beta_csr.to(device),
            log_n.view(K, K).to(device), cell_mass.view(K, K).to(device), log_n_max.to(device))


def _cell_scaled_mass(counts: List[int], off: List[int], beta_csr: Optional[np.ndarray], log_n_max: float) -> Tensor:
    """imi::cell_scaled_mass of every cell: [K*K] float32, each sum_{i in cell} exp(beta_i - log_n_max)
    summed in float64 in CSR order and rounded once (math.exp is the libm exp the kernel calls)."""
    out = np.zeros(len(counts), dtype=np.float32)
    for c, n in enumerate(counts):
        if n == 0:
            continue
        if beta_csr is None:
            out[c] = n * math.exp(-log_n_max)
            continue
        total = 0.0
        for b in beta_csr[off[c]:off[c + 1]].tolist():
            total += math.exp(b - log_n_max)
        out[c] = total
    return torch.from_numpy(out)


def update_cells(offsets: Tensor, class_ids: Tensor, alias_prob: Optional[Tensor], alias_pos: Optional[Tensor],
                 beta_csr: Optional[Tensor], log_n: Tensor, cell_mass: Tensor, log_n_max: Tensor, code1: Tensor,
                 code2: Tensor, beta: Optional[Tensor], changed: Tensor, new_code1: Tensor, new_code2: Tensor,
                 new_beta: Optional[Tensor], num_codewords: int):
    """(code1, code2, beta ([0] without bias)) with the rows ``changed`` overwritten, followed by
    build_cells' outputs for them: what the kernel's in-place cell update must equal bit for bit."""
    K = int(num_codewords)
    _check(K >= 1, f"update_cells: num_codewords must be >= 1, got {K}")
    n = code1.shape[0]
    _check(code1.dim() == 1 and code1.shape == code2.shape, "update_cells: code1/code2 must be [N] of equal length")
    _check_index_array("update_cells", "code1", code1)
    _check_index_array("update_cells", "code2", code2)
    _check_index_array("update_cells", "class_ids", class_ids)
    _check(offsets.dtype == torch.int64 and offsets.shape == (K * K + 1,),
           f"update_cells: offsets must be int64 [K*K+1] = [{K * K + 1}]")
    _check(class_ids.shape == (n,), f"update_cells: class_ids must be [N] = [{n}]")
    has_beta = beta is not None
    _check(has_beta == (alias_prob is not None and alias_prob.numel() > 0),
           "update_cells: beta and the alias tables (alias_prob, alias_pos, beta_csr) must be given together")
    _check(changed.dim() == 1 and changed.dtype == torch.int64,
           "update_cells: changed must be int64 [C] (the re-assigned class ids, ascending)")
    c = changed.shape[0]
    _check(new_code1.shape == (c,) and new_code2.shape == (c,) and new_code1.dtype == torch.int32
           and new_code2.dtype == torch.int32,
           f"update_cells: new_code1 and new_code2 must be int32 [C] = [{c}] like changed (the index's codes are int32)")
    _check((new_beta is not None) == has_beta, "update_cells: new_beta must be given exactly when the index has a bias")
    if has_beta:
        _check(beta.shape == (n,) and beta.dtype == torch.float32, f"update_cells: beta must be float32 [N] = [{n}]")
        _check(new_beta.shape == (c,) and new_beta.dtype == torch.float32,
               f"update_cells: new_beta must be float32 [C] = [{c}]")
    if c > 0:
        _check(int(changed.min()) >= 0 and int(changed.max()) < n,
               f"update_cells: changed holds ids outside the class ids [0, {n})")
        _check(c == 1 or bool((changed[1:] > changed[:-1]).all()),
               "update_cells: changed must be strictly ascending (sorted, no repeats; use torch.unique)")
        bad = (new_code1 < 0) | (new_code1 >= K) | (new_code2 < 0) | (new_code2 >= K)
        _check(not bool(bad.any()), f"update_cells: new codes out of range [0, {K})")
    out1 = code1.clone().index_copy_(0, changed, new_code1)
    out2 = code2.clone().index_copy_(0, changed, new_code2)
    out_beta = beta.clone().index_copy_(0, changed, new_beta) if has_beta else torch.empty(
        0, dtype=torch.float32, device=code1.device)
    return (out1, out2, out_beta) + tuple(build_cells(out1, out2, out_beta if has_beta else None, K))


def update_cells_(offsets: Tensor, class_ids: Tensor, alias_prob: Optional[Tensor], alias_pos: Optional[Tensor],
                  beta_csr: Optional[Tensor], log_n: Tensor, cell_mass: Tensor, log_n_max: Tensor, code1: Tensor,
                  code2: Tensor, beta: Optional[Tensor], changed: Tensor, new_code1: Tensor, new_code2: Tensor,
                  new_beta: Optional[Tensor], num_codewords: int) -> None:
    """update_cells written back into the index's own arrays (copy, then assign: the fallback keeps
    no memory promise, only the kernel's results). Every check runs before the first write."""
    out = update_cells(offsets, class_ids, alias_prob, alias_pos, beta_csr, log_n, cell_mass, log_n_max, code1,
                       code2, beta, changed, new_code1, new_code2, new_beta, num_codewords)
    targets = (code1, code2, beta, offsets, class_ids, alias_prob, alias_pos, beta_csr, log_n, cell_mass, log_n_max)
    for dst, src in zip(targets, out):
        if dst is not None and dst.numel() > 0:
            dst.copy_(src.reshape(dst.shape))
