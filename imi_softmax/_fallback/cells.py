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

from ._checks import (check, check_cell_masses, check_codes, check_finite_beta, check_index_classes, check_no_bad_position,
                      check_no_shared_memory, check_num_codewords, check_same_device, check_sampling_tables,
                      contiguous, in_range, present)


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


def assign_codewords(x: Tensor, centroids: Tensor) -> Tuple[Tensor, Tensor]:
    """codes [N] int64 and squared distances [N] (x's dtype) of the nearest centroid ([K, d])."""
    check(x.dim() == 2 and centroids.dim() == 2 and x.shape[1] == centroids.shape[1],
          f"assign_codewords: x [N, d] and centroids [K, d] expected, got {list(x.shape)} and {list(centroids.shape)}")
    check(x.dtype == centroids.dtype, "assign_codewords: x and centroids dtypes differ")
    check(x.dtype in (torch.float32, torch.float64), f"assign_codewords: float32 or float64 expected, got {x.dtype}")
    check(centroids.shape[0] > 0, "assign_codewords: no centroids")
    check_same_device("assign_codewords", x=x, centroids=centroids)
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
    op = "assign_rows"
    check(weight.dim() == 2, f"{op}: weight must be [N, d], got {list(weight.shape)}")
    check(weight.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16),
          f"{op}: weight must be float32, float64, float16 or bfloat16, got {weight.dtype}")
    check(rows.dtype == torch.int64 and rows.dim() == 1,
          f"{op}: rows must be int64 [C] (class ids), got {rows.dtype} {list(rows.shape)}")
    check(codebook1.dtype == codebook2.dtype == torch.float32 and codebook1.dim() == codebook2.dim() == 2,
          f"{op}: codebook1 and codebook2 must be float32 [K, width], got {codebook1.dtype} {list(codebook1.shape)} "
          f"and {codebook2.dtype} {list(codebook2.shape)}")
    check_num_codewords(op, codebook1.shape[0])
    check_num_codewords(op, codebook2.shape[0])
    n, d = weight.shape
    widths = (codebook1.shape[1], codebook2.shape[1])
    if residual:
        check(widths == (d, d), f"{op}: with residual=True both codebooks must be [K, {d}] like weight's rows, got "
                                f"{list(codebook1.shape)} and {list(codebook2.shape)}")
    else:
        check(min(widths) >= 1 and sum(widths) == d,
              f"{op}: with residual=False the codebooks' widths must add up to weight's d = {d} (codebook1 for the "
              f"first columns, codebook2 for the rest), got {list(codebook1.shape)} and {list(codebook2.shape)}")
    check_index_classes(op, rows.numel())
    check_same_device(op, weight=weight, rows=rows, codebook1=codebook1, codebook2=codebook2)
    check_no_bad_position(op, "rows", rows, ~in_range(rows, n), f"[0, {n})")
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
    check_num_codewords("build_cells", K)
    check(code1.dim() == 1 and code1.shape == code2.shape,
          f"build_cells: code1 and code2 must be [N] of equal length, got {list(code1.shape)} and {list(code2.shape)}")
    check(code1.dtype == torch.int32 and code2.dtype == torch.int32,
          f"build_cells: code1 and code2 must be int32 (the index's codes are int32), got {code1.dtype} and "
          f"{code2.dtype}: convert them with .to(torch.int32)")
    check_index_classes("build_cells", code1.numel())
    check(code1.numel() > 0, "build_cells: an index needs at least one class, got code1 and code2 of length 0")
    check_same_device("build_cells", code1=code1, code2=code2, beta=beta)
    n = code1.shape[0]
    has_beta = beta is not None
    if has_beta:
        check(beta.dim() == 1 and beta.shape[0] == n and beta.dtype == torch.float32,
              "build_cells: beta must be float32 [N]")
        check_finite_beta("build_cells", "beta", beta)
    bad = ~(in_range(code1, K) & in_range(code2, K))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise RuntimeError(f"build_cells: code of class {i} out of range [0, {K}): ({int(code1[i])}, {int(code2[i])})")
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


def _check_update_inputs(op: str, K: int, offsets: Tensor, class_ids: Tensor, alias_prob: Optional[Tensor],
                         alias_pos: Optional[Tensor], beta_csr: Optional[Tensor], log_n: Tensor, cell_mass: Tensor,
                         log_n_max: Tensor, code1: Tensor, code2: Tensor, beta: Optional[Tensor], changed: Tensor,
                         new_code1: Tensor, new_code2: Tensor, new_beta: Optional[Tensor]) -> bool:
    """update_cells_inputs (csrc/tensor_views.h): an index built for code1/code2/beta and the rows
    changed with their new codes and beta. Returns whether the index has a bias."""
    check_num_codewords(op, K)
    check_same_device(op, offsets=offsets, class_ids=class_ids, alias_prob=alias_prob, alias_pos=alias_pos,
                      beta_csr=beta_csr, log_n=log_n, cell_mass=cell_mass, log_n_max=log_n_max, code1=code1,
                      code2=code2, beta=beta, changed=changed, new_code1=new_code1, new_code2=new_code2,
                      new_beta=new_beta)
    check_cell_masses(K, log_n, cell_mass, log_n_max)
    check_codes(op, code1, code2)
    n = code1.numel()
    check(class_ids.dim() == 1 and class_ids.numel() == n,
          f"{op}: class_ids must be [N] = [{n}] (one entry per class of code1), got {list(class_ids.shape)}")
    check_sampling_tables(op, K, offsets, class_ids, alias_prob, alias_pos, beta_csr)
    has_beta = beta is not None
    check(has_beta == present(alias_prob), f"{op}: beta and the alias tables (alias_prob, alias_pos, beta_csr) must "
                                           f"be given together: an index built with a bias has all four, one built "
                                           f"without has none")
    if has_beta:
        check(beta.dtype == torch.float32 and beta.dim() == 1 and beta.numel() == n and contiguous(beta),
              f"{op}: beta must be contiguous float32 [N] = [{n}], got {beta.dtype} {list(beta.shape)}")
    check(changed.dtype == torch.int64 and changed.dim() == 1 and contiguous(changed),
          f"{op}: changed must be contiguous int64 [C] (the re-assigned class ids, ascending), got {changed.dtype} "
          f"{list(changed.shape)}")
    c = changed.numel()
    check(all(t.dtype == torch.int32 and t.dim() == 1 and t.numel() == c and contiguous(t)
              for t in (new_code1, new_code2)),
          f"{op}: new_code1 and new_code2 must be contiguous int32 [C] = [{c}] like changed (the index's codes are "
          f"int32), got {new_code1.dtype} {list(new_code1.shape)} and {new_code2.dtype} {list(new_code2.shape)}")
    check((new_beta is not None) == has_beta, f"{op}: new_beta must be given exactly when the index has a bias (beta)")
    if has_beta:
        check(new_beta.dtype == torch.float32 and new_beta.dim() == 1 and new_beta.numel() == c
              and contiguous(new_beta),
              f"{op}: new_beta must be contiguous float32 [C] = [{c}] like changed, got {new_beta.dtype} "
              f"{list(new_beta.shape)}")
        check_finite_beta(op, "new_beta", new_beta)
    return has_beta


def _check_changed(op: str, K: int, code1: Tensor, code2: Tensor, changed: Tensor, new_code1: Tensor,
                   new_code2: Tensor) -> None:
    """plan_cell_update's checks of each changed class j, in order: a class id, strictly ascending, its
    new and its old codes in [0, K). The first j that fails one is named."""
    n = code1.numel()
    if changed.numel() == 0:
        return
    bad_id = ~in_range(changed, n)
    descending = torch.cat([torch.zeros(1, dtype=torch.bool, device=changed.device), changed[1:] <= changed[:-1]])
    bad_new = ~(in_range(new_code1, K) & in_range(new_code2, K))
    safe = changed.clamp(0, n - 1)  # n >= 1: check_sampling_tables
    bad_old = ~(in_range(code1[safe], K) & in_range(code2[safe], K))
    bad = bad_id | descending | bad_new | bad_old
    if not bool(bad.any()):
        return
    j = int(bad.nonzero()[0, 0])
    i = int(changed[j])
    check(not bool(bad_id[j]), f"{op}: changed[{j}] = {i} is not a class id in [0, {n})")
    check(not bool(descending[j]), f"{op}: changed must be strictly ascending (sorted, no repeats); changed[{j - 1}] "
                                   f"= {int(changed[j - 1])}, changed[{j}] = {i} (use torch.unique)")
    check(not bool(bad_new[j]), f"{op}: new code of changed[{j}] out of range [0, {K}): ({int(new_code1[j])}, "
                                f"{int(new_code2[j])})")
    raise RuntimeError(f"{op}: old code of class {i} out of range [0, {K}): ({int(code1[i])}, {int(code2[i])})")


def _check_old_cells(op: str, in_place: bool, K: int, offsets: Tensor, class_ids: Tensor, code1: Tensor,
                     code2: Tensor, changed: Tensor, new_code1: Tensor, new_code2: Tensor) -> None:
    """The kernels' test that the old index is the one built for code1/code2, which the fallback would
    otherwise never notice (it rebuilds from the codes): plan_cell_update's new cell counts, then each
    changed class in the old cell of its old code (update_cells: merge_cell; update_cells_: a search
    before any write). The first cell (then class) that fails is named, with the op's own message."""
    if changed.numel() == 0:
        return
    kk = K * K
    old_cell = code1[changed].long() * K + code2[changed].long()
    sizes = offsets[1:] - offsets[:-1]
    count = sizes - torch.bincount(old_cell, minlength=kk) + torch.bincount(new_code1.long() * K + new_code2.long(),
                                                                            minlength=kk)
    negative = (count < 0).nonzero()
    if negative.numel() > 0:
        c = int(negative[0, 0])
        raise RuntimeError(f"{op}: cell {c} would hold {int(count[c])} classes: the old codes of the changed rows do "
                           f"not match the old index's cells (pass the index's own code1/code2)")
    # a (cell, class id) key per CSR position and per leaver: any int32 id shifted into [0, 2^32), so
    # keys of distinct pairs differ (class_ids' values are not checked: a corrupt one must not match)
    def key(cell: Tensor, ids: Tensor) -> Tensor:
        return cell * 2 ** 32 + (ids.long() + 2 ** 31)

    pos_cell = torch.searchsorted(offsets, torch.arange(class_ids.numel(), device=offsets.device), right=True) - 1
    leaver = key(old_cell, changed)
    missing = ~torch.isin(leaver, key(pos_cell, class_ids))
    if not bool(missing.any()):
        return
    c, i = divmod(int(leaver[missing].min()), 2 ** 32)  # the kernels' order: cell, then class id
    i -= 2 ** 31
    if in_place:
        raise RuntimeError(f"{op}: class {i} is not in the cell of its old code (cell {c}) of the old index (or that "
                           f"cell's ids are not ascending): pass the index's own offsets/class_ids/code1/code2; the "
                           f"index was not modified")
    raise RuntimeError(f"{op}: cell {c} of the old index does not match its codes (a changed class missing from the "
                       f"cell of its old code, or ids not ascending within a cell): pass the index's own "
                       f"offsets/class_ids/code1/code2")


def _updated(op: str, offsets: Tensor, class_ids: Tensor, alias_prob: Optional[Tensor], alias_pos: Optional[Tensor],
             beta_csr: Optional[Tensor], log_n: Tensor, cell_mass: Tensor, log_n_max: Tensor, code1: Tensor,
             code2: Tensor, beta: Optional[Tensor], changed: Tensor, new_code1: Tensor, new_code2: Tensor,
             new_beta: Optional[Tensor], num_codewords: int):
    """update_cells' outputs after op's checks in the kernel's order (errors name op); None for
    update_cells_ when nothing changes (its kernel writes nothing then)."""
    K, in_place = int(num_codewords), op == "update_cells_"
    has_beta = _check_update_inputs(op, K, offsets, class_ids, alias_prob, alias_pos, beta_csr, log_n, cell_mass,
                                     log_n_max, code1, code2, beta, changed, new_code1, new_code2, new_beta)
    if in_place:  # one write would change another argument's input
        check_no_shared_memory(op, offsets=offsets, class_ids=class_ids, alias_prob=alias_prob, alias_pos=alias_pos,
                               beta_csr=beta_csr, log_n=log_n, cell_mass=cell_mass, log_n_max=log_n_max,
                               code1=code1, code2=code2, beta=beta, changed=changed, new_code1=new_code1,
                               new_code2=new_code2, new_beta=new_beta)
    _check_changed(op, K, code1, code2, changed, new_code1, new_code2)
    _check_old_cells(op, in_place, K, offsets, class_ids, code1, code2, changed, new_code1, new_code2)
    if in_place and changed.numel() == 0:
        return None
    out1 = code1.clone().index_copy_(0, changed, new_code1)
    out2 = code2.clone().index_copy_(0, changed, new_code2)
    out_beta = beta.clone().index_copy_(0, changed, new_beta) if has_beta else torch.empty(
        0, dtype=torch.float32, device=code1.device)
    return (out1, out2, out_beta) + tuple(build_cells(out1, out2, out_beta if has_beta else None, K))


def update_cells(offsets: Tensor, class_ids: Tensor, alias_prob: Optional[Tensor], alias_pos: Optional[Tensor],
                 beta_csr: Optional[Tensor], log_n: Tensor, cell_mass: Tensor, log_n_max: Tensor, code1: Tensor,
                 code2: Tensor, beta: Optional[Tensor], changed: Tensor, new_code1: Tensor, new_code2: Tensor,
                 new_beta: Optional[Tensor], num_codewords: int):
    """(code1, code2, beta ([0] without bias)) with the rows ``changed`` overwritten, followed by
    build_cells' outputs for them: what the kernel's in-place cell update must equal bit for bit."""
    return _updated("update_cells", offsets, class_ids, alias_prob, alias_pos, beta_csr, log_n, cell_mass, log_n_max,
                    code1, code2, beta, changed, new_code1, new_code2, new_beta, num_codewords)


def update_cells_(offsets: Tensor, class_ids: Tensor, alias_prob: Optional[Tensor], alias_pos: Optional[Tensor],
                  beta_csr: Optional[Tensor], log_n: Tensor, cell_mass: Tensor, log_n_max: Tensor, code1: Tensor,
                  code2: Tensor, beta: Optional[Tensor], changed: Tensor, new_code1: Tensor, new_code2: Tensor,
                  new_beta: Optional[Tensor], num_codewords: int) -> None:
    """update_cells written back into the index's own arrays (copy, then assign: the fallback keeps
    no memory promise, only the kernel's results). Every check runs before the first write."""
    out = _updated("update_cells_", offsets, class_ids, alias_prob, alias_pos, beta_csr, log_n, cell_mass, log_n_max,
                   code1, code2, beta, changed, new_code1, new_code2, new_beta, num_codewords)
    if out is None:
        return
    targets = (code1, code2, beta, offsets, class_ids, alias_prob, alias_pos, beta_csr, log_n, cell_mass, log_n_max)
    for dst, src in zip(targets, out):
        if dst is not None and dst.numel() > 0:
            dst.copy_(src.reshape(dst.shape))
