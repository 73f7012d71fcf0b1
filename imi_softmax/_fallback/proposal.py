"""MIDX proposal in pure PyTorch: the per-query preparation, the three-stage draw and log Q.

Mirrors csrc/include/imi_softmax/proposal.h step by step, vectorized over the batch: the same
max-shifted scores, the same polynomial exp/log, every float32 operation in the kernels' order
(torch never fuses two of its ops into an FMA, and the host kernels are built without contraction),
the same sequential cumulative sums, the same inverse-CDF rule, and the random numbers of
CONTRACT.md section 1 (philox.py). Seeded draws and log Q therefore equal the CPU kernels' bit for bit.
"""
import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from ._checks import (check_cell_masses, check_class_codes, check_codes, check_cpu_simd_env, check_finite_scores,
                      check_ids_and_codes, check_query_scores, check_same_device, check_sampling_tables, present)
from .philox import MASK32, draw_words, slot_and_accept, uniform24

ROW_MASS_FLOOR = 1e-30  # IMI_ROW_MASS_FLOOR: rows below it are recomputed in log space
_F32 = torch.float32


def _f32(v: float) -> Tensor:
    return torch.tensor(v, dtype=_F32)


def exp_poly(x: Tensor) -> Tensor:
    """imi::exp_poly in float32, operation by operation (exactly 0 below -87.3 and for -inf)."""
    xc = x.clamp(max=88.0).clamp(min=-87.3)  # NaN-free for -inf: the clamps map it to -87.3
    ni = (xc * _f32(1.44269504088896341) + _f32(128.5)).to(torch.int32) - 128
    n = ni.to(_F32)
    r = (xc - n * _f32(0.693359375)) + n * _f32(2.12194440e-4)
    p = torch.full_like(r, 1.9875691500e-4)
    for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = p * r + _f32(c)
    y = p * r * r + r + _f32(1.0)
    scale = ((ni + 127) << 23).view(_F32)
    return torch.where(x > -87.3, y * scale, torch.zeros_like(y))


def log_poly(x: Tensor) -> Tensor:
    """imi::log_poly in float32 for positive normal x."""
    b = x.contiguous().view(torch.int32).to(torch.int64) & MASK32
    e = (((b >> 23) & 0xFF) - 126).to(_F32)
    m = ((b & 0x807FFFFF) | 0x3F000000).to(torch.int32).view(_F32)
    small = m < 0.707106781186547524
    e = torch.where(small, e - 1.0, e)
    m = torch.where(small, m + m - 1.0, m - 1.0)
    z = m * m
    p = torch.full_like(m, 7.0376836292e-2)
    for c in (-1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1, -1.6668057665e-1,
              2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1):
        p = p * m + _f32(c)
    y = m * z * p
    y = y + _f32(-2.12194440e-4) * e
    y = y + _f32(-0.5) * z
    return (m + y) + _f32(0.693359375) * e


def _shifted_log_mass(log_n: Tensor, cell_mass: Tensor, log_n_max: Tensor) -> Tensor:
    """imi::shifted_log_mass of every cell [K, K]: log(cell_mass) while it is a normal float, else
    log_n - log_n_max (-inf for empty cells)."""
    normal = cell_mass >= torch.finfo(_F32).tiny
    return torch.where(normal, log_poly(torch.where(normal, cell_mass, torch.ones_like(cell_mass))),
                       log_n - log_n_max)


def _exact_rows(t2: Tensor, lm: Tensor) -> Tuple[Tensor, Tensor]:
    """row_log_mass_exact and stage2_cdf_row_exact for every row: (r [B, K], cdf [B, K(k1), K(k2)]).

    v = t2[k2] + lm[k1, k2]; r = mx + log(sum_k2 exp(v - mx)) with the sum in k2 order; the CDF
    accumulates exp(v - r) in k2 order, 0 for empty cells."""
    v = t2[:, None, :] + lm[None, :, :]
    mx = v.max(dim=2).values
    total = torch.zeros_like(mx)
    for k2 in range(v.shape[2]):
        total = total + exp_poly(v[:, :, k2] - mx)
    empty = mx == -math.inf
    r = torch.where(empty, mx, mx + log_poly(torch.where(empty, torch.ones_like(total), total)))
    w = torch.where(lm[None] == -math.inf, torch.zeros_like(v), exp_poly(v - r[:, :, None]))
    return r, _cumsum_seq(w)


def _cumsum_seq(x: Tensor) -> Tensor:
    """Sequential float32 cumulative sum along the last dim (torch.cumsum accumulates in double)."""
    out = torch.empty_like(x)
    acc = torch.zeros_like(x[..., 0])
    for k in range(x.shape[-1]):
        acc = acc + x[..., k]
        out[..., k] = acc
    return out


def prepare(s1: Tensor, s2: Tensor, log_n: Tensor, cell_mass: Tensor,
            log_n_max: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """imi::query_prepare_table for a batch, the same float32 operations in the same order:
    (t1 [B, K], t2 [B, K], cdf1 [B, K], cdf2 [B, K(k1), K(k2)], log Z' [B]), log_n and cell_mass [K, K]."""
    K = s1.shape[1]
    t1 = s1 - s1.max(dim=1, keepdim=True).values
    t2 = s2 - s2.max(dim=1, keepdim=True).values
    e2 = exp_poly(t2)
    # stage-2 table: cdf2[b, k1, k2] = sum_{k2' <= k2} cell_mass[k1, k2'] * e2[b, k2'], in k2 order
    cdf2 = torch.empty(s1.shape[0], K, K, dtype=_F32, device=s1.device)
    acc = cell_mass[None, :, 0] * e2[:, None, 0]
    cdf2[:, :, 0] = acc
    for k2 in range(1, K):
        acc = acc + cell_mass[None, :, k2] * e2[:, None, k2]
        cdf2[:, :, k2] = acc
    last = cdf2[:, :, K - 1]
    ok = last > _f32(ROW_MASS_FLOOR)
    r = torch.where(ok, log_poly(torch.where(ok, last, torch.ones_like(last))), torch.full_like(last, -math.inf))
    if not bool(ok.all()):
        exact_r, exact_cdf = _exact_rows(t2, _shifted_log_mass(log_n, cell_mass, log_n_max))
        r = torch.where(ok, r, exact_r)
        cdf2 = torch.where(ok[:, :, None], cdf2, exact_cdf)
    t = t1 + r
    l1max = t.max(dim=1, keepdim=True).values
    cdf1 = _cumsum_seq(exp_poly(t - l1max))
    log_z = l1max[:, 0] + log_poly(cdf1[:, K - 1])
    return t1, t2, cdf1, cdf2, log_z


def cdf_search(cdf: Tensor, u: Tensor) -> Tensor:
    """cdf_search_strided on rows: cdf [..., n] nondecreasing, u [..., M] -> int64 [..., M].

    The first index whose cumulative weight exceeds u * total (the last one if none does), then
    back over zero-mass entries: the first index holding the same cumulative value.
    """
    n = cdf.shape[-1]
    target = u * cdf[..., n - 1 : n]
    k = (cdf[..., None, :] <= target[..., None]).sum(-1).clamp(max=n - 1)
    at = torch.gather(cdf, -1, k)
    return (cdf[..., None, :] < at[..., None]).sum(-1)


def _log_q(t1: Tensor, t2: Tensor, k1: Tensor, k2: Tensor, beta_by: Optional[Tensor], at: Tensor,
           log_n_max: Tensor, log_z: Tensor) -> Tensor:
    """imi::drawn_log_q / class_log_q for [B, L] codes k1, k2 and bias index `at`:
    ((t1[k1] + t2[k2]) + (beta[at] - log_n_max)) - log Z', in that rounding order."""
    b = beta_by[at] if beta_by is not None and beta_by.numel() > 0 else torch.zeros(at.shape, dtype=_F32, device=at.device)
    return ((torch.gather(t1, 1, k1) + torch.gather(t2, 1, k2)) + (b - log_n_max)) - log_z[:, None]


def _class_log_q(t1, t2, beta, code1, code2, ids, log_n_max, log_z):
    """imi::class_log_q for ids [B, L] (negative ids read class 0; callers mask them)."""
    safe = ids.clamp(min=0)
    return _log_q(t1, t2, code1[safe].long(), code2[safe].long(), beta, safe, log_n_max, log_z)


_BAD_DRAW = ("midx_sample: a draw reached an empty cell, an alias outside its cell or a class id outside [0, N): "
             "the query scores hold NaN or the index tables (offsets, alias_pos, class_ids) are corrupt; rebuild the "
             "index")


def midx_log_prob(s1, s2, log_n, cell_mass, log_n_max, beta, code1, code2, ids) -> Tensor:
    """Exact log Q(ids | query) [B, L] float32 from the same preparation as the draws."""
    check_query_scores(s1, s2)
    B, K = s1.shape
    if not (ids.dim() == 2 and ids.shape[0] == B and ids.dtype == torch.int64):
        raise RuntimeError(f"midx_log_prob: ids must be int64 [B, L] with B = {B}, got {list(ids.shape)}")
    check_codes("midx_log_prob", code1, code2)
    check_same_device("midx_log_prob", s1=s1, s2=s2, log_n=log_n, cell_mass=cell_mass, log_n_max=log_n_max,
                      code1=code1, code2=code2, ids=ids, beta=beta)
    check_ids_and_codes("midx_log_prob", "ids", ids, code1, code2, K)
    check_cell_masses(K, log_n, cell_mass, log_n_max)
    check_class_codes("midx_log_prob", beta, code1, code2)
    if s1.device.type == "cpu":
        check_cpu_simd_env()
    check_finite_scores("midx_log_prob", s1, s2)
    log_n_max = log_n_max.reshape(1)
    t1, t2, _, _, log_z = prepare(s1, s2, log_n.reshape(K, K), cell_mass.reshape(K, K), log_n_max)
    return _class_log_q(t1, t2, beta, code1, code2, ids, log_n_max, log_z)


def _check_sample_targets(B: int, K: int, targets, beta, code1, code2) -> None:
    """sample_targets_inputs: targets int64 [B, L], each a class id in [0, N) or negative (ignored),
    read with code1 / code2 (and beta)."""
    if targets is None:
        return
    if not (targets.dim() == 2 and targets.shape[0] == B and targets.dtype == torch.int64):
        raise RuntimeError(f"midx_sample: targets must be int64 [B, L] with B = {B}, got {list(targets.shape)}")
    if code1 is None or code2 is None:
        raise RuntimeError("midx_sample: targets need code1 and code2")
    check_codes("midx_sample", code1, code2)
    check_ids_and_codes("midx_sample", "targets", targets, code1, code2, K, negative_marker=True)
    check_class_codes("midx_sample", beta, code1, code2)


def midx_sample_seeded(s1, s2, log_n, cell_mass, log_n_max, offsets, class_ids, alias_prob, alias_pos,
                       beta_csr, num_samples: int, seed: int, offset: int, targets=None, beta=None,
                       code1=None, code2=None):
    """(ids [B, M] int64, log_q [B, M] float32, target_log_q [B, L] float32); CONTRACT.md section 2."""
    check_query_scores(s1, s2)
    (B, K), M = s1.shape, int(num_samples)
    if M < 0:
        raise RuntimeError(f"midx_sample: num_samples must be >= 0, got {M}")
    if offset % 4 != 0 or offset < 0:
        raise RuntimeError(f"midx_sample_seeded: offset counts 32-bit Philox outputs, 4 per draw: it must be a "
                           f"non-negative multiple of 4, got {offset}")
    check_same_device("midx_sample", s1=s1, s2=s2, log_n=log_n, cell_mass=cell_mass, log_n_max=log_n_max,
                      offsets=offsets, class_ids=class_ids, alias_prob=alias_prob, alias_pos=alias_pos,
                      beta_csr=beta_csr, targets=targets, beta=beta, code1=code1, code2=code2)
    check_cell_masses(K, log_n, cell_mass, log_n_max)
    check_sampling_tables("midx_sample", K, offsets, class_ids, alias_prob, alias_pos, beta_csr)
    _check_sample_targets(B, K, targets, beta, code1, code2)
    if s1.device.type == "cpu":
        check_cpu_simd_env()
    if M > 0 or (targets is not None and targets.shape[1] > 0):
        check_finite_scores("midx_sample", s1, s2)
    dev = s1.device
    log_n_max = log_n_max.reshape(1)
    t1, t2, cdf1, cdf2, log_z = prepare(s1, s2, log_n.reshape(K, K), cell_mass.reshape(K, K), log_n_max)
    if targets is None:
        target_log_q = torch.zeros(B, 0, dtype=_F32, device=dev)
    else:
        lq = _class_log_q(t1, t2, beta, code1, code2, targets, log_n_max, log_z)
        target_log_q = torch.where(targets < 0, torch.zeros_like(lq), lq)
    if B == 0 or M == 0:
        return (torch.zeros(B, M, dtype=torch.int64, device=dev), torch.zeros(B, M, dtype=_F32, device=dev),
                target_log_q)
    w0, w1, w2, w3 = draw_words(int(seed), int(offset), B, M, device=dev)
    k1 = cdf_search(cdf1, uniform24(w0))                                    # [B, M]
    rows = torch.gather(cdf2, 1, k1[:, :, None].expand(B, M, K))            # stage-2 CDF of each k1
    k2 = cdf_search(rows, uniform24(w1)[:, :, None])[:, :, 0]
    cell = k1 * K + k2
    begin, end = offsets[cell], offsets[cell + 1]
    if bool((end <= begin).any()):  # resolve_alias's -1 (only NaN scores or a corrupt index get here)
        raise RuntimeError(_BAD_DRAW)
    slot, u_acc = slot_and_accept(w2, w3, end - begin)
    pos = begin + slot
    if present(alias_prob):
        # alias_pos is read at use, as the kernels do: an alias outside its cell fails the draw
        alias = alias_pos[pos].long()
        take = ~(u_acc < alias_prob[pos])
        if bool((take & ((alias < begin) | (alias >= end))).any()):
            raise RuntimeError(_BAD_DRAW)
        pos = torch.where(take, alias, pos)
    ids = class_ids[pos].long()  # the index stores int32; users get int64 ids
    if bool(((ids < 0) | (ids >= class_ids.numel())).any()):  # imi::drawn_class: entries read at use
        raise RuntimeError(_BAD_DRAW)
    log_q = _log_q(t1, t2, k1, k2, beta_csr, pos, log_n_max, log_z)
    return ids, log_q, target_log_q


def generator_seed_offset(generator: Optional[torch.Generator], device: torch.device, num_samples: int) -> Tuple[int, int]:
    """(seed, offset) a call draws from the generator, as the kernels do.

    CPU: seed = the generator's random64(), offset 0 (randint over the full int64 range returns
    random64() - 2^63). CUDA: the generator's seed and Philox offset, advanced by 4 * num_samples
    (philox_cuda_state's contract)."""
    if device.type == "cuda":
        gen = generator if generator is not None else torch.cuda.default_generators[device.index or 0]
        offset = gen.get_offset()
        gen.set_offset(offset + (4 * num_samples + 3) // 4 * 4)
        return gen.initial_seed(), offset
    v = int(torch.randint(-(2 ** 63), 2 ** 63 - 1, (), dtype=torch.int64, generator=generator))
    return (v + 2 ** 63) & ((1 << 64) - 1), 0


def midx_sample(s1, s2, log_n, cell_mass, log_n_max, offsets, class_ids, alias_prob, alias_pos, beta_csr,
                num_samples: int, generator=None, targets=None, beta=None, code1=None, code2=None):
    seed, offset = generator_seed_offset(generator, s1.device, int(num_samples))
    return midx_sample_seeded(s1, s2, log_n, cell_mass, log_n_max, offsets, class_ids, alias_prob, alias_pos,
                              beta_csr, num_samples, seed, offset, targets, beta, code1, code2)
