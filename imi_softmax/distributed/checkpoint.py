"""Full (nn.Linear-compatible) checkpoints of a class-sharded head: gathered on one rank, scattered
back. Rows travel point to point, straight into (or out of) the full tensor: no rank holds more
than the full matrix plus its own shard."""
from typing import Any, Dict, Mapping, Optional

import torch
import torch.distributed as dist
from torch import Tensor


def _global(head, group_rank: int) -> int:
    return dist.get_global_rank(head.process_group, group_rank) if head.world_size > 1 else dist.get_rank()


def _check_rank(name: str, value: int, world: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < world:
        raise ValueError(f"{name} must be a rank of the head's process group, in [0, {world}), got {value!r}")
    return value


@torch.no_grad()
def gather_full_state_dict(head, dst: int = 0) -> Optional[Dict[str, Tensor]]:
    """On rank ``dst`` (of the head's group): ``{"weight": [num_classes, in_features], "bias":
    [num_classes]}``, the keys and layout of ``nn.Linear(in_features, num_classes)``; None on the
    other ranks. Every rank of the group must call it (the rows move point to point). The full
    matrix is allocated on ``dst``'s device (num_classes x in_features: on a GPU it must fit there;
    move the head to CPU with gloo for catalogues that do not)."""
    _check_rank("dst", dst, head.world_size)
    params = {"weight": head.weight}
    if head.bias is not None:
        params["bias"] = head.bias
    out: Optional[Dict[str, Tensor]] = None
    if head.rank == dst:
        out = {k: p.new_empty((head.num_classes,) + tuple(p.shape[1:])) for k, p in params.items()}
    for name, p in params.items():
        for src in range(head.world_size):
            lo, hi = head.shard_bounds[src], head.shard_bounds[src + 1]
            if src == dst:
                if head.rank == dst:
                    out[name][lo:hi].copy_(p.detach())
            elif head.rank == src:
                dist.send(p.detach().contiguous(), dst=_global(head, dst), group=head.process_group)
            elif head.rank == dst:
                dist.recv(out[name][lo:hi], src=_global(head, src), group=head.process_group)
    return out


def _validate_full(head, state_dict: Any, prefix: str) -> Optional[str]:
    if not isinstance(state_dict, Mapping):
        return f"state_dict must be a mapping (an nn.Linear-style state_dict) on the source rank, got {type(state_dict).__name__}"
    want = {"weight": (head.num_classes, head.in_features)}
    if head.bias is not None:
        want["bias"] = (head.num_classes,)
    elif prefix + "bias" in state_dict and state_dict[prefix + "bias"] is not None:
        return f"the checkpoint has a bias ({prefix}bias) but the head was built with bias=False"
    for name, shape in want.items():
        t = state_dict.get(prefix + name)
        if not isinstance(t, Tensor):
            return f"the checkpoint has no tensor {prefix + name!r} (keys: {sorted(state_dict)[:8]})"
        if tuple(t.shape) != shape:
            return (f"the checkpoint's {prefix + name} is {tuple(t.shape)}, the sharded head needs {shape} "
                    f"(num_classes={head.num_classes}, in_features={head.in_features}): it is a different model")
    return None


@torch.no_grad()
def scatter_full_state_dict(head, state_dict: Optional[Mapping[str, Tensor]], src: int = 0, prefix: str = "") -> None:
    """Loads a full checkpoint held by rank ``src`` (nn.Linear keys ``prefix + "weight"`` [num_classes,
    in_features] and ``prefix + "bias"``; the other ranks pass None) into every rank's shard, and marks
    every shard's index stale (rebuilt on next use). A checkpoint of the wrong shape raises the same
    ValueError on every rank, before anything moves."""
    _check_rank("src", src, head.world_size)
    error = [_validate_full(head, state_dict, prefix) if head.rank == src else None]
    if head.world_size > 1:
        dist.broadcast_object_list(error, src=_global(head, src), group=head.process_group)
    if error[0] is not None:
        raise ValueError(f"scatter_full_state_dict (source rank {src}): {error[0]}")
    names = ["weight"] + (["bias"] if head.bias is not None else [])
    for name in names:
        p = getattr(head, name)
        for dst in range(head.world_size):
            lo, hi = head.shard_bounds[dst], head.shard_bounds[dst + 1]
            if dst == src:
                if head.rank == src:
                    p.copy_(state_dict[prefix + name][lo:hi])
            elif head.rank == src:
                rows = state_dict[prefix + name][lo:hi].to(device=p.device, dtype=p.dtype).contiguous()
                dist.send(rows, dst=_global(head, dst), group=head.process_group)
            elif head.rank == dst:
                buf = torch.empty_like(p)
                dist.recv(buf, src=_global(head, src), group=head.process_group)
                p.copy_(buf)
    head.mark_index_stale()
