"""What the row-sparse optimizers share: parameter and hyperparameter checks, the sparse gradient
as (rows, values), float32 state that survives ``load_state_dict``, and the step loop."""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import torch
from torch import Tensor

from .._ops import ops  # noqa: F401  (registers the ops)

WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_float(owner: str, name: str, value: Any, low: float = 0.0, high: Optional[float] = None,
                high_open: bool = False, positive: bool = False) -> float:
    """A finite Python number in [low, high] (or [low, high) when high_open; > 0 when positive);
    ValueError/TypeError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}: {name} must be a Python float, got {type(value).__name__} ({value!r})")
    value = float(value)
    if positive and value == 0.0:
        raise ValueError(f"{owner}: {name} must be > 0, got 0.0")
    if not math.isfinite(value) or value < low or (high is not None and (value >= high if high_open else value > high)):
        right = "" if high is None else (f", {high})" if high_open else f", {high}]")
        span = f"[{low}{right}" if high is not None else f">= {low}"
        raise ValueError(f"{owner}: {name} must be {'in ' if high is not None else ''}{span}, got {value}")
    return value


def check_eps(owner: str, value: Any) -> float:
    # eps = 0 divides 0 by 0 on a touched row whose gradient and state are zero (NaN weights)
    try:
        return check_float(owner, "eps", value, positive=True)
    except ValueError as exc:
        raise ValueError(f"{exc} (a row with a zero gradient and zero state would become NaN; "
                         f"the default is 1e-8)") from None


class RowSparseOptimizer(torch.optim.Optimizer):
    """Base of :class:`SparseAdam` and :class:`RowWiseAdagrad` (see their docstrings).

    Subclasses define ``_check_group(group)`` (hyperparameters), ``_init_state(p)`` and
    ``_update(p, state, rows, values, group)``.
    """

    def __init__(self, params: Iterable, defaults: Dict[str, Any]) -> None:
        super().__init__(params, defaults)

    # ---- parameters and hyperparameters ---------------------------------------------------------
    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._check_group(group)
        owner = type(self).__name__
        for i, p in enumerate(group["params"]):
            if p.dim() not in (1, 2):
                raise ValueError(
                    f"{owner}: parameter {i} of group {len(self.param_groups) - 1} has shape {tuple(p.shape)}; "
                    f"row-sparse optimizers take a weight [N, d] and a bias [N] (e.g. IMISoftmax.weight/.bias "
                    f"or nn.Embedding.weight). Give other parameters to another optimizer")
            if p.dtype not in WEIGHT_DTYPES:
                raise TypeError(
                    f"{owner}: parameter {i} of group {len(self.param_groups) - 1} is {p.dtype}; supported: "
                    f"float32, bfloat16, float16 (optimizer state is float32). Convert it, e.g. head.float()")

    def _check_group(self, group: Dict[str, Any]) -> None:
        raise NotImplementedError

    # ---- gradients ------------------------------------------------------------------------------
    def _rows_and_values(self, p: Tensor) -> Tuple[Optional[Tensor], Tensor]:
        """(rows [U] strictly increasing, values [U, d] / [U]) of a sparse grad; (None, grad) for a
        dense one (every row counts as touched)."""
        owner = type(self).__name__
        g = p.grad
        if g.layout == torch.strided:
            return None, g.to(p.dtype).contiguous()
        if g.layout != torch.sparse_coo:
            raise TypeError(f"{owner}: gradient layout {g.layout} is not supported; expected a sparse COO "
                            f"gradient (IMISoftmax(sparse_grad=True), nn.Embedding(sparse=True)) or a dense one")
        if g.sparse_dim() != 1 or g.shape != p.shape:
            raise ValueError(
                f"{owner}: expected a row-sparse gradient of shape {tuple(p.shape)} with sparse_dim 1 (whole rows, "
                f"as IMISoftmax(sparse_grad=True) and nn.Embedding(sparse=True) give), got shape {tuple(g.shape)} "
                f"with sparse_dim {g.sparse_dim()}")
        if not g.is_coalesced():
            # autograd's accumulation into .grad drops the coalesced flag of the head's gradient
            # (already unique, ascending rows): an O(U) check instead of coalesce()'s sort. Gradients
            # summed over several backward calls do repeat rows and are coalesced.
            rows = g._indices()[0]
            if rows.numel() > 1 and not bool((rows[1:] > rows[:-1]).all()):
                g = g.coalesce()
            else:
                return rows, g._values().to(p.dtype).contiguous()
        return g.indices()[0], g.values().to(p.dtype).contiguous()

    # ---- step -----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One update of every parameter that has a gradient, on its touched rows only.

        Args:
            closure: re-evaluates the model and returns the loss (optional).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        owner = type(self).__name__
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.is_contiguous():
                    raise ValueError(f"{owner}: a parameter of shape {tuple(p.shape)} is not contiguous; it is "
                                     f"updated in place by row, make it contiguous (p.data = p.data.contiguous())")
                rows, values = self._rows_and_values(p)
                state = self.state[p]
                if len(state) == 0:
                    state.update(self._init_state(p, group))
                state["step"] += 1
                self._update(p, state, rows, values, group)
        return loss

    def _init_state(self, p: Tensor, group: Dict[str, Any]) -> Dict[str, Any]:
        raise NotImplementedError

    def _update(self, p: Tensor, state: Dict[str, Any], rows: Optional[Tensor], values: Tensor,
                group: Dict[str, Any]) -> None:
        raise NotImplementedError

    # ---- checkpoints ----------------------------------------------------------------------------
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Loads a checkpoint of this optimizer. The float32 state is kept float32 (torch's loader
        would cast it to the dtype of a bfloat16 parameter) and copied, so training continues bit
        for bit as if uninterrupted and the given dict is never modified by later steps."""
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        owner = type(self).__name__
        for i, (pid, p) in enumerate(zip(saved_ids, params)):
            if pid not in saved_state:
                continue
            state = {k: (v.to(device=p.device, copy=True) if isinstance(v, Tensor) else v)
                     for k, v in saved_state[pid].items()}
            # The fused ops take float32 state shaped by the parameter: a checkpoint of another
            # model (or optimizer) is refused here, naming the parameter, not by the op at the next step.
            for key, shape in {"step": None, **self._state_shapes(p)}.items():
                if key not in state:
                    raise ValueError(f"{owner}.load_state_dict: the state of parameter {i} {tuple(p.shape)} has no "
                                     f"{key!r} (it holds {sorted(state)}): was it saved by another optimizer?")
                if shape is None:
                    continue
                v = state[key]
                if not isinstance(v, Tensor) or tuple(v.shape) != shape or not v.is_floating_point():
                    got = f"{v.dtype} {tuple(v.shape)}" if isinstance(v, Tensor) else type(v).__name__
                    raise ValueError(f"{owner}.load_state_dict: state {key!r} of parameter {i} must be a float "
                                     f"tensor of shape {shape} (the parameter is {tuple(p.shape)}), got {got}: the "
                                     f"checkpoint was saved for parameters of other shapes (or in another order)")
                state[key] = v.to(torch.float32)
            self.state[p] = state

    def _state_shapes(self, p: Tensor) -> Dict[str, Tuple[int, ...]]:
        """The float32 state tensors of parameter p and their shapes (besides the int ``step``)."""
        raise NotImplementedError
