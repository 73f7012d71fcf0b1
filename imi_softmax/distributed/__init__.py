"""Class-sharded IMISoftmax over torch.distributed: each rank owns a contiguous range of classes."""
from .checkpoint import gather_full_state_dict, scatter_full_state_dict
from .collectives import CommStats
from .head import ShardedIMISoftmax
from .loss import StepDraws
from .sharding import shard_bounds, split_samples

__all__ = ["ShardedIMISoftmax", "StepDraws", "CommStats", "gather_full_state_dict", "scatter_full_state_dict",
           "shard_bounds", "split_samples"]
