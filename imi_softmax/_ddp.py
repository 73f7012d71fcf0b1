"""What the DistributedDataParallel whose forward is running does with a head's parameters."""
from typing import List

import torch


def head_params_managed_by_active_ddp(head, trainable_only: bool = False) -> List[str]:
    """Names (in the DDP module) of ``head.weight`` / ``head.bias`` that the DistributedDataParallel
    currently running its forward synchronizes; [] outside such a forward, while compiling, or for
    parameters DDP was told to ignore (``trainable_only``: also skip those without requires_grad,
    which DDP does not reduce)."""
    if torch.compiler.is_compiling() or not torch.distributed.is_available():
        return []
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel._get_active_ddp_module()
    if ddp is None:
        return []
    ignored = getattr(ddp, "parameters_to_ignore", set())
    return [name for name, p in ddp.module.named_parameters()
            if (p is head.weight or p is head.bias) and name not in ignored
            and (p.requires_grad or not trainable_only)]
