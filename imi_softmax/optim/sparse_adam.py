"""Lazy Adam over the touched rows of the head (fused C++/CUDA op ``row_sparse_adam_``)."""
from __future__ import annotations

from typing import Any, Dict, Iterable, Optional, Tuple

import torch
from torch import Tensor

from .._ops import ops
from ._base import RowSparseOptimizer, check_eps, check_float


class SparseAdam(RowSparseOptimizer):
    r"""Lazy (row-sparse) Adam for :class:`~imi_softmax.IMISoftmax` with ``sparse_grad=True``.

    Pass it the head's parameters (weight ``[N, d]``, bias ``[N]``); each step updates only the rows
    present in the sparse COO gradient (targets and sampled negatives of the batch), in one fused
    C++/CUDA pass: no ``[N, d]`` gradient, no sweep over untouched rows, nothing of size ``N`` is
    allocated per step. For a touched element with gradient ``g`` at step ``t`` of the parameter::

        m <- beta1 * m + (1 - beta1) * g
        v <- beta2 * v + (1 - beta2) * g^2
        w <- w * (1 - lr * weight_decay) - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    which is ``torch.optim.Adam`` (``AdamW`` with ``weight_decay``) on that element.

    Lazy semantics, how it differs from dense Adam:

    * An untouched row is not visited: its weight does not move and its moments ``m``, ``v`` do not
      decay. Dense Adam would keep moving every row with its momentum (and decay its moments) on
      every step, also rows whose gradient is zero. Momentum therefore does not carry rows that
      were not sampled, and a row's moments are as old as its last touch.
    * Bias correction uses the parameter's global step count ``t`` (incremented once per
      ``step()`` in which the parameter has a gradient), as ``torch.optim.SparseAdam`` and
      TensorFlow's LazyAdam do, not a per-row count: a row touched for the first time at step
      ``t`` takes a step of size ``lr * (1 - beta1) / (1 - beta1^t) * g / (...)``, smaller than
      dense Adam's first step. (A per-row count would need ``N`` more integers of state.)
    * ``weight_decay`` is decoupled (AdamW) and applied to touched rows only.
    * With every row touched in every step (or a dense gradient), it is dense Adam.

    A dense (strided) gradient is accepted and treats every row as touched: the update is then
    dense Adam (use ``sparse_grad=True`` on the head for the lazy, row-sparse step).
    Sparse gradients are coalesced first if needed (several backward calls before a step).

    Weights may be float32, bfloat16 or float16; the state (``exp_avg``, ``exp_avg_sq``, shaped
    like the parameter) is always float32. A low-precision weight is loaded to float32, updated
    in float32 and rounded to its dtype (round to nearest even) once per step, so updates smaller
    than half a bf16 ulp of the weight are lost (no stochastic rounding or fp32 master copy):
    :class:`RowWiseAdagrad` with bf16 weights is the memory-lean choice at 100M classes
    (``SparseAdam`` keeps 8 bytes of state per weight element).

    Args:
        params: iterable of parameters or param groups (weight [N, d] and/or bias [N]).
        lr: learning rate (>= 0).
        betas: (beta1, beta2), each in [0, 1).
        eps: term added to the denominator (> 0).
        weight_decay: decoupled weight decay (>= 0), touched rows only.

    State per parameter: ``step`` (int), ``exp_avg`` and ``exp_avg_sq`` (float32, the parameter's
    shape). ``state_dict()`` / ``load_state_dict()`` round trip exactly (the state stays float32).

    Example::

        head = IMISoftmax(64, 1_000_000, sparse_grad=True)
        opt = SparseAdam(head.parameters(), lr=1e-3)
        loss = head(x, y); loss.backward(); opt.step(); opt.zero_grad()
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def _check_group(self, group: Dict[str, Any]) -> None:
        group["lr"] = check_float("SparseAdam", "lr", group["lr"])
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"SparseAdam: betas must be a pair (beta1, beta2), got {betas!r}")
        group["betas"] = (check_float("SparseAdam", "betas[0]", betas[0], 0.0, 1.0, high_open=True),
                          check_float("SparseAdam", "betas[1]", betas[1], 0.0, 1.0, high_open=True))
        group["eps"] = check_eps("SparseAdam", group["eps"])
        group["weight_decay"] = check_float("SparseAdam", "weight_decay", group["weight_decay"])

    def _init_state(self, p: Tensor, group: Dict[str, Any]) -> Dict[str, Any]:
        return {"step": 0,
                "exp_avg": torch.zeros(p.shape, dtype=torch.float32, device=p.device),
                "exp_avg_sq": torch.zeros(p.shape, dtype=torch.float32, device=p.device)}

    def _state_shapes(self, p: Tensor) -> Dict[str, Tuple[int, ...]]:
        return {"exp_avg": tuple(p.shape), "exp_avg_sq": tuple(p.shape)}

    def _update(self, p: Tensor, state: Dict[str, Any], rows: Optional[Tensor], values: Tensor,
                group: Dict[str, Any]) -> None:
        self._check_group(group)  # hyperparameters may have been edited (schedulers) since
        beta1, beta2 = group["betas"]
        ops.row_sparse_adam_(p, state["exp_avg"], state["exp_avg_sq"], rows, values, group["lr"], beta1, beta2,
                             group["eps"], group["weight_decay"], state["step"])
