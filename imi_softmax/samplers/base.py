"""The interface every proposal implements (DESIGN.md, "Samplers share one interface")."""
import contextlib
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from .._validation import check_generator, check_positive_int, check_tensor


def no_autocast(device: torch.device):
    """A context that turns autocast off on ``device``: the proposal's scores, the index build and
    the loss kernels run in the dtypes they are given (fp32), as autocast does for its fp32 ops."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


class Sampler:
    """A proposal Q(i | query) over ``num_classes`` classes.

    ``build(weight, bias)`` (re)builds whatever the proposal derives from the class vectors;
    ``sample(query [B, d], M)`` -> (ids [B, M] int64, log_q [B, M] float32) with log_q the exact
    normalized log Q of each id; ``log_prob(query [B, d], ids [B, ...])`` -> log Q, same shape as ids.
    B = 0 and M = 0 give empty outputs; log Q is float32 whatever torch's default dtype.
    ``state_dict()`` / ``load_state_dict()`` carry what a resumed run needs (IMISoftmax saves them).
    """

    num_classes: Optional[int] = None
    # True when the sampler's work runs in imi_softmax kernels and its torch ops are small glue
    # (O(B * K * d) at most): IMISoftmax then runs those on one thread beside a busy process
    # (imi_softmax/_serial_glue.py). False keeps torch's threads (an exact sampler scores all N).
    kernel_bound: bool = False

    def build(self, weight: Tensor, bias: Optional[Tensor] = None) -> "Sampler":
        check_tensor("weight", weight, dims=(2,))
        if weight.shape[0] < 1:
            raise ValueError("weight must hold at least one class (got 0 rows)")
        if self.num_classes is not None and weight.shape[0] != self.num_classes:
            raise ValueError(f"weight has {weight.shape[0]} classes but the sampler has {self.num_classes}")
        self.num_classes = weight.shape[0]
        return self

    @property
    def is_built(self) -> bool:
        return self.num_classes is not None

    def _require_built(self) -> int:
        if not self.is_built:
            raise RuntimeError(f"{type(self).__name__} has no index yet: call build(weight, bias) first")
        return self.num_classes

    def _check_sample_args(self, query: Tensor, num_samples: int, generator: Optional[torch.Generator] = None) -> int:
        """Checks a sample call's arguments; returns num_samples as a Python int."""
        self._require_built()
        check_tensor("query", query, dims=(2,))
        num_samples = check_positive_int("num_samples", num_samples, minimum=0)
        check_generator(generator)
        return num_samples

    def _check_ids(self, query: Tensor, ids: Tensor) -> None:
        from .._validation import check_class_ids

        n = self._require_built()
        check_tensor("query", query, dims=(2,))
        check_tensor("ids", ids)
        if ids.dim() < 1 or ids.shape[0] != query.shape[0]:
            raise ValueError(f"ids must be [B, ...] with B = {query.shape[0]} (query rows), got {tuple(ids.shape)}")
        check_class_ids("ids", ids, n)

    def sample(self, query: Tensor, num_samples: int, generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
        raise NotImplementedError

    def log_prob(self, query: Tensor, ids: Tensor) -> Tensor:
        raise NotImplementedError

    def sample_with_targets(self, query: Tensor, num_samples: int, targets: Optional[Tensor],
                            generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """Draws and the targets' exact log Q in one call: (ids [B, M] int64, log_q [B, M] float32,
        target_log_q [B, L] float32) for targets [B, L] int64 class ids (None: target_log_q is [B, 0]).
        Proposals that prepare per query (MIDX) override it to prepare once for both."""
        ids, log_q = self.sample(query, num_samples, generator=generator)
        if targets is None:
            return ids, log_q, log_q.new_empty((query.shape[0], 0))
        return ids, log_q, self.log_prob(query, targets)

    def to(self, device) -> "Sampler":
        return self

    # -- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """What a resumed run needs to draw the same samples (index, generators); tensors and
        plain Python values only, so ``torch.load(weights_only=True)`` reads it back."""
        return {}

    def load_state_dict(self, state: Dict[str, Any], device=None) -> bool:
        """Restores :meth:`state_dict`'s output (tensors moved to ``device``). Returns whether the
        sampler is ready to sample (False: the owner must call ``build`` before the next draw)."""
        return False

    @staticmethod
    def _empty_draw(query: Tensor, num_samples: int) -> Tuple[Tensor, Tensor]:
        shape = (query.shape[0], num_samples)
        return (torch.empty(shape, dtype=torch.int64, device=query.device),
                torch.empty(shape, dtype=torch.float32, device=query.device))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}"
