"""The sharded head's collectives, with a count of what each moves.

Every collective the head runs goes through :class:`Collectives`, which adds the payload to
:class:`CommStats`: ``numbers`` and ``bytes`` this rank hands to the collective or receives from it
(all_gather: the gathered output; all_reduce, all_to_all: the tensor), and
``ring_bytes``, what a bandwidth-optimal ring implementation sends from this rank for it
(all_gather: (P-1)/P of the output; all_reduce: 2 (P-1)/P of the tensor; the NCCL/gloo ring
algorithms), the figure that sets the time on a bandwidth-bound link. ``seconds`` is the wall time
spent inside the collectives (on an asynchronous device such as CUDA, only the launch time unless
the caller synchronizes).
"""
import time
from dataclasses import dataclass, field
from typing import Dict, List

import torch
import torch.distributed as dist
from torch import Tensor

# torch >= 2.10 names them *_single (the *_tensor names warn); older torch has only *_tensor
_all_gather = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or getattr(dist, "reduce_scatter_tensor", None)


@dataclass
class CommStats:
    """Running totals of the collectives one head ran (see the module docstring for the units)."""

    calls: int = 0
    numbers: int = 0
    bytes: int = 0
    ring_bytes: float = 0.0
    seconds: float = 0.0  # wall time inside the collectives (transfer plus waiting for the slowest rank)
    per_op: Dict[str, int] = field(default_factory=dict)  # op name -> bytes

    def add(self, op: str, t: Tensor, ring_factor: float, seconds: float = 0.0) -> None:
        nbytes = t.numel() * t.element_size()
        self.seconds += seconds
        self.calls += 1
        self.numbers += t.numel()
        self.bytes += nbytes
        self.ring_bytes += ring_factor * nbytes
        self.per_op[op] = self.per_op.get(op, 0) + nbytes

    def reset(self) -> None:
        self.calls, self.numbers, self.bytes, self.ring_bytes, self.seconds = 0, 0, 0, 0.0, 0.0
        self.per_op = {}

    def snapshot(self) -> Dict[str, float]:
        return {"calls": self.calls, "numbers": self.numbers, "bytes": self.bytes,
                "ring_bytes": self.ring_bytes, "seconds": self.seconds, **{f"bytes[{k}]": v for k, v in self.per_op.items()}}


class Collectives:
    """torch.distributed collectives over one group, counted in ``stats``."""

    def __init__(self, group, world: int, rank: int):
        self.group, self.world, self.rank = group, world, rank
        self.stats = CommStats()

    def all_gather(self, t: Tensor, op: str) -> Tensor:
        """[P * rows, ...]: every rank's ``t`` (same shape on every rank), in rank order."""
        t = t.contiguous()
        out = t.new_empty((self.world * t.shape[0],) + tuple(t.shape[1:]))
        start = time.perf_counter()
        if self.world == 1:
            out.copy_(t)
        else:
            _all_gather(out, t, group=self.group)
        self.stats.add(op, out, (self.world - 1) / self.world, time.perf_counter() - start)
        return out

    def all_reduce(self, t: Tensor, op: str, reduce_op=None) -> Tensor:
        """In place over the group (sum unless reduce_op says otherwise); returns ``t``."""
        start = time.perf_counter()
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM if reduce_op is None else reduce_op, group=self.group)
        self.stats.add(op, t, 2 * (self.world - 1) / self.world, time.perf_counter() - start)
        return t

    def reduce_scatter_rows(self, t: Tensor, op: str) -> Tensor:
        """Sum over ranks of ``t`` [P * rows, ...], this rank's block of rows."""
        t = t.contiguous()
        if self.world == 1:
            self.stats.add(op, t, 0.0)
            return t
        out = t.new_empty((t.shape[0] // self.world,) + tuple(t.shape[1:]))
        start = time.perf_counter()
        _reduce_scatter(out, t, group=self.group)
        self.stats.add(op, t, (self.world - 1) / self.world, time.perf_counter() - start)
        return out

    def all_to_all_rows(self, t: Tensor, op: str) -> Tensor:
        """``t`` [P * rows, ...]: block q goes to rank q; returns [P * rows, ...] whose block p came
        from rank p."""
        t = t.contiguous()
        out = torch.empty_like(t)
        start = time.perf_counter()
        if self.world == 1:
            out.copy_(t)
        else:
            dist.all_to_all_single(out, t, group=self.group)
        self.stats.add(op, t, (self.world - 1) / self.world, time.perf_counter() - start)
        return out

    def all_gather_objects(self, obj) -> List:
        """Small Python objects (configuration checks); not counted as step traffic."""
        out: List = [None] * self.world
        if self.world == 1:
            return [obj]
        dist.all_gather_object(out, obj, group=self.group)
        return out
