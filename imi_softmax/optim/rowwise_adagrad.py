"""FBGEMM's row-wise Adagrad over the touched rows of the head (fused C++/CUDA op ``row_wise_adagrad_``)."""
from __future__ import annotations

from typing import Any, Dict, Iterable, Optional, Tuple

import torch
from torch import Tensor

from .._ops import ops
from ._base import RowSparseOptimizer, check_eps, check_float


class RowWiseAdagrad(RowSparseOptimizer):
    r"""Row-wise Adagrad (FBGEMM's ``EXACT_ROWWISE_ADAGRAD``, as TorchRec uses it) for the head.

    One float32 accumulator per row: the state is ``O(N)`` floats, not ``O(N * d)``, which with
    bfloat16 weights is the memory-lean mode for 100M-class heads. For a touched row ``i`` with
    gradient row ``g_i`` (``d`` entries)::

        G_i  <- G_i + mean_j g_ij^2
        w_ij <- w_ij * (1 - lr * weight_decay) - lr / (sqrt(G_i) + eps) * g_ij

    Only the rows present in the sparse COO gradient (``IMISoftmax(sparse_grad=True)``) are read
    or written, in one fused C++/CUDA pass. Lazy semantics: untouched rows do not move and keep
    their accumulator (Adagrad has no momentum, so, unlike lazy Adam, the lazy update equals the
    dense one on every row whose gradient is zero, except for ``weight_decay``, which is applied to
    touched rows only). A 1-D parameter (bias ``[N]``) has ``d = 1``: plain Adagrad per element.

    A dense (strided) gradient is accepted and treats every row as touched (dense row-wise
    Adagrad; rows with an all-zero gradient then only feel ``weight_decay``). Sparse gradients are
    coalesced first if needed.

    Weights may be float32, bfloat16 or float16 (updated in float32 and rounded to their dtype,
    round to nearest even, once per step: updates below half an ulp of the weight are lost).
    The mean square is summed in float64 from the exact products, so it does not depend on the
    summation order (CPU, CUDA and the pure-PyTorch fallback agree bit for bit).

    Args:
        params: iterable of parameters or param groups (weight [N, d] and/or bias [N]).
        lr: learning rate (>= 0).
        eps: term added to sqrt(G) (> 0).
        weight_decay: decoupled weight decay (>= 0), touched rows only.
        initial_accumulator_value: starting value of every G_i (>= 0).

    State per parameter: ``step`` (int), ``sum`` (float32 ``[N]``, the accumulators G).
    """

    def __init__(self, params: Iterable, lr: float = 1e-2, eps: float = 1e-8, weight_decay: float = 0.0,
                 initial_accumulator_value: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay,
                                      initial_accumulator_value=initial_accumulator_value))

    def _check_group(self, group: Dict[str, Any]) -> None:
        for name in ("lr", "weight_decay", "initial_accumulator_value"):
            group[name] = check_float("RowWiseAdagrad", name, group[name])
        group["eps"] = check_eps("RowWiseAdagrad", group["eps"])

    def _init_state(self, p: Tensor, group: Dict[str, Any]) -> Dict[str, Any]:
        return {"step": 0, "sum": torch.full((p.shape[0],), group["initial_accumulator_value"],
                                             dtype=torch.float32, device=p.device)}

    def _state_shapes(self, p: Tensor) -> Dict[str, Tuple[int, ...]]:
        return {"sum": (p.shape[0],)}

    def _update(self, p: Tensor, state: Dict[str, Any], rows: Optional[Tensor], values: Tensor,
                group: Dict[str, Any]) -> None:
        self._check_group(group)
        ops.row_wise_adagrad_(p, state["sum"], rows, values, group["lr"], group["eps"], group["weight_decay"])
