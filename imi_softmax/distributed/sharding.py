"""Which classes each rank owns, and the checks on the process group."""
from typing import List, Optional, Sequence, Tuple

import torch.distributed as dist


def resolve_group(process_group) -> Tuple[object, int, int]:
    """(group, world size, this rank's index in it), with a clear error when there is no usable group."""
    if not dist.is_available():
        raise RuntimeError("ShardedIMISoftmax needs torch.distributed, which this torch build lacks")
    if (process_group is not None and not isinstance(process_group, dist.ProcessGroup)
            and process_group != dist.GroupMember.NON_GROUP_MEMBER):  # that one gets its own message below
        raise TypeError(f"process_group must be a torch.distributed ProcessGroup (e.g. dist.new_group(ranks)) or "
                        f"None for the default group, got {type(process_group).__name__} ({process_group!r}); the "
                        f"backend (gloo, nccl) is chosen by dist.init_process_group(backend=...)")
    if not dist.is_initialized():
        raise RuntimeError("ShardedIMISoftmax needs an initialized process group: call "
                           "torch.distributed.init_process_group(...) first (torchrun sets the environment "
                           "for init_method='env://'), or pass process_group=")
    if process_group is None:
        process_group = dist.group.WORLD
    if process_group == dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(f"process_group does not contain this process (global rank {dist.get_rank()}): "
                         f"build the head only on the ranks of the group you pass (dist.new_group returns "
                         f"GroupMember.NON_GROUP_MEMBER on the others)")
    try:
        world = dist.get_world_size(process_group)
        rank = dist.get_rank(process_group)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"process_group is not a usable process group of this process: {exc}") from exc
    if rank < 0:
        raise ValueError(f"process_group does not contain this process (global rank {dist.get_rank()})")
    return process_group, world, rank


def shard_bounds(num_classes: int, world: int, shard_sizes: Optional[Sequence[int]] = None) -> List[int]:
    """[P + 1] class offsets: rank p owns classes [bounds[p], bounds[p + 1]).

    Without ``shard_sizes`` every rank owns num_classes / P classes (num_classes must be divisible
    by P); ``shard_sizes`` gives each rank's count explicitly (an uneven split, each >= 1)."""
    if shard_sizes is None:
        if num_classes % world:
            lo = num_classes // world
            raise ValueError(
                f"num_classes={num_classes} is not divisible by the process group size {world}: each rank "
                f"owns an equal contiguous range of classes. Pad the catalogue to {(lo + 1) * world} classes "
                f"(the extra classes are never targets), or pass shard_sizes= (one count per rank, summing to "
                f"num_classes) for an uneven split")
        sizes = [num_classes // world] * world
    else:
        sizes = list(shard_sizes)
        if len(sizes) != world or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
            raise ValueError(f"shard_sizes must hold {world} ints >= 1 (one per rank of the process group), "
                             f"got {shard_sizes!r}")
        if sum(sizes) != num_classes:
            raise ValueError(f"shard_sizes must sum to num_classes={num_classes}, got {sum(sizes)} ({sizes})")
    if sizes[0] < 1:
        raise ValueError(f"num_classes={num_classes} is smaller than the process group size {world}: "
                         f"every rank must own at least one class")
    bounds = [0]
    for s in sizes:
        bounds.append(bounds[-1] + s)
    return bounds


def split_samples(num_samples: int, bounds: Sequence[int]) -> List[int]:
    """Negatives per shard: one for every shard, the rest in proportion to the shard sizes
    (largest remainders first, ties to the lower rank); equal shards get num_samples / P each.
    Every shard must draw (a shard that draws nothing leaves its classes out of the partition
    function estimate), so num_samples is 0 or at least P."""
    world = len(bounds) - 1
    if num_samples == 0:
        return [0] * world
    if num_samples < world:
        raise ValueError(f"num_samples={num_samples} is smaller than the process group size {world}: every "
                         f"shard must draw at least one negative per row (its classes would otherwise be missing "
                         f"from the estimate of the partition function). Use num_samples >= {world} (or 0)")
    total = bounds[-1]
    rest = num_samples - world
    exact = [rest * (bounds[p + 1] - bounds[p]) / total for p in range(world)]
    share = [int(e) for e in exact]
    order = sorted(range(world), key=lambda p: (-(exact[p] - share[p]), p))
    for p in order[:rest - sum(share)]:
        share[p] += 1
    return [1 + s for s in share]
