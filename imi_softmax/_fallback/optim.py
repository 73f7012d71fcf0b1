"""Row-sparse optimizer steps in pure PyTorch (csrc/include/imi_softmax/row_optim.h).

Same contract as the compiled ops: update, in place, only the listed rows of param and of its
float32 state. Each float32 operation of the kernels is one torch op here (one rounding each, no
fused multiply-add; ``lr / t`` is written as a division, since ``float / Tensor`` multiplies by a
reciprocal; torch's float32 ``sqrt`` is not correctly rounded on CPU, so square roots are taken
in double and rounded once, which is), and the coefficients are computed in double and rounded to
float32 as in ``make_adam_coef`` / ``make_adagrad_coef``, so the results equal the kernels' bit for
bit.
"""
import math
from typing import Optional, Sequence

import torch
from torch import Tensor

_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check(op: str, param: Tensor, state: Sequence[tuple], state_shape, rows: Optional[Tensor], grad: Tensor) -> None:
    """The compiled ops' checks (tensor_views.h, row_optim_inputs), raising RuntimeError as they do."""
    if param.dim() not in (1, 2):
        raise RuntimeError(f"{op}: param must be a weight [N, d] or a bias [N], got {tuple(param.shape)}")
    if param.dtype not in _WEIGHT_DTYPES:
        raise RuntimeError(f"{op}: param must be float32, bfloat16 or float16, got {param.dtype}")
    if not param.is_contiguous():
        raise RuntimeError(f"{op}: param must be contiguous (it is updated in place)")
    for name, t in state:
        if t.dtype != torch.float32 or not t.is_contiguous() or tuple(t.shape) != tuple(state_shape):
            raise RuntimeError(f"{op}: {name} must be contiguous float32 {list(state_shape)}, got {t.dtype} "
                               f"{tuple(t.shape)}")
    if grad.dtype != param.dtype:
        raise RuntimeError(f"{op}: grad must have param's dtype {param.dtype}, got {grad.dtype}")
    for name, t in [("grad", grad), ("rows", rows)] + list(state):
        if t is not None and t.device != param.device:
            raise RuntimeError(f"{op}: {name} is on {t.device} but param is on {param.device}; move them to one device")
    if rows is None:
        if grad.shape != param.shape:
            raise RuntimeError(f"{op}: without rows, grad must have param's shape {tuple(param.shape)}, "
                               f"got {tuple(grad.shape)}")
        return
    if rows.dtype != torch.int64 or rows.dim() != 1:
        raise RuntimeError(f"{op}: rows must be int64 [U], got {rows.dtype} {tuple(rows.shape)}")
    U, n = rows.shape[0], param.shape[0]
    want = (U, param.shape[1]) if param.dim() == 2 else (U,)
    if tuple(grad.shape) != want:
        raise RuntimeError(f"{op}: grad must hold one row per entry of rows: {list(want)}, got {tuple(grad.shape)}")
    bad = (rows < 0) | (rows >= n)
    if U > 1:
        bad[1:] |= rows[1:] <= rows[:-1]
    if bool(bad.any()):
        pos = int(bad.nonzero()[0, 0])
        value = int(rows[pos])
        if not 0 <= value < n:
            raise RuntimeError(f"{op}: rows has {value} at [{pos}] outside [0, N = {n})")
        raise RuntimeError(f"{op}: rows must be strictly increasing (distinct rows, as the indices of a coalesced "
                           f"sparse gradient are; call grad.coalesce()), but rows[{pos}] = {value} <= "
                           f"rows[{pos - 1}] = {int(rows[pos - 1])}")


def _sqrt(t: Tensor) -> Tensor:
    """Correctly rounded float32 square root (IEEE sqrt, as sqrtf and CUDA's __fsqrt_rn)."""
    return t.double().sqrt().float()


def _gather(t: Tensor, rows: Optional[Tensor]) -> Tensor:
    return t if rows is None else t.index_select(0, rows)


def _scatter(t: Tensor, rows: Optional[Tensor], values: Tensor) -> None:
    if rows is None:
        t.copy_(values)
    else:
        t.index_copy_(0, rows, values.to(t.dtype))


def row_sparse_adam_(param: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, rows: Optional[Tensor], grad: Tensor,
                     lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int) -> None:
    _check("row_sparse_adam_", param, [("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)], param.shape, rows, grad)
    if step < 1:
        raise RuntimeError(f"row_sparse_adam_: step must be >= 1 (the step count after this update), got {step}")
    if rows is not None and rows.numel() == 0:
        return
    bc1 = 1.0 - math.pow(beta1, step)
    bc2 = 1.0 - math.pow(beta2, step)
    # Python floats (double) are rounded to float32 by each op on a float32 tensor.
    step_size, inv_sqrt_bc2, decay = lr / bc1, 1.0 / math.sqrt(bc2), 1.0 - lr * weight_decay
    g = grad.float()
    w = _gather(param, rows).float()
    m = _gather(exp_avg, rows).mul(beta1).add(g.mul(1.0 - beta1))
    v = _gather(exp_avg_sq, rows).mul(beta2).add(g.mul(g).mul(1.0 - beta2))
    denom = _sqrt(v).mul(inv_sqrt_bc2).add(eps)
    new_w = w.mul(decay).sub(m.div(denom).mul(step_size))
    _scatter(exp_avg, rows, m)
    _scatter(exp_avg_sq, rows, v)
    _scatter(param, rows, new_w.to(param.dtype))


def row_wise_adagrad_(param: Tensor, sum: Tensor, rows: Optional[Tensor], grad: Tensor, lr: float, eps: float,
                      weight_decay: float) -> None:
    _check("row_wise_adagrad_", param, [("sum", sum)], (param.shape[0],) if param.dim() >= 1 else (), rows, grad)
    d = param.shape[1] if param.dim() == 2 else 1
    if (rows is not None and rows.numel() == 0) or d == 0:  # no row, or rows of no columns: nothing to update
        return
    g = grad.float()
    g64 = g.double()
    sq = g64.mul(g64)  # exact: a float product fits a double
    sum_sq = sq.sum(1) if param.dim() == 2 else sq
    G = _gather(sum, rows).add(sum_sq.div(d).float())
    mult = torch.full_like(G, lr).div(_sqrt(G).add(eps))
    if param.dim() == 2:
        mult = mult.unsqueeze(1)
    new_w = _gather(param, rows).float().mul(1.0 - lr * weight_decay).sub(g.mul(mult))
    _scatter(sum, rows, G)
    _scatter(param, rows, new_w.to(param.dtype))
