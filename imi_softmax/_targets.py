"""Multi-label targets: the CSR form ``(offsets [B+1], labels [nnz])`` normalized to the padded form
``[B, L]`` (one helper for the head, the functional loss and the metrics)."""
from typing import Tuple

import numpy as np
import torch
from torch import Tensor


def _as_tensor(x, name: str) -> Tensor:
    if isinstance(x, Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")


def csr_to_padded(offsets, labels, batch: int) -> Tuple[Tensor, Tensor]:
    """(padded [B, L] int64 with -1 pads, labels as int64) from a CSR pair, after checking it: int
    dtypes, 1-D, offsets [B+1] starting at 0, non-decreasing, ending at nnz. Label ranges are the
    caller's to check. L is the longest row (0 when B = 0 or every row is empty)."""
    offsets, labels = _as_tensor(offsets, "target offsets"), _as_tensor(labels, "target labels")
    if offsets.device != labels.device:
        raise ValueError(f"CSR offsets are on {offsets.device} but labels on {labels.device}; move them to one device")
    if offsets.dtype not in (torch.int64, torch.int32) or labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"CSR target (offsets, labels) must be int64, got {offsets.dtype} and {labels.dtype}")
    if offsets.dim() != 1 or labels.dim() != 1:
        raise ValueError(f"CSR target must be (offsets [B+1], labels [nnz]), got shapes "
                         f"{tuple(offsets.shape)} and {tuple(labels.shape)}")
    if offsets.numel() != batch + 1:
        raise ValueError(f"CSR offsets must have B+1 = {batch + 1} entries (B = prediction rows), got {offsets.numel()}")
    offsets, labels = offsets.long(), labels.long()
    if int(offsets[0]) != 0:
        raise ValueError(f"CSR offsets must start at 0, got offsets[0] = {int(offsets[0])}")
    lengths = offsets[1:] - offsets[:-1]
    if batch and bool((lengths < 0).any()):
        b = int(torch.nonzero(lengths < 0)[0, 0])
        raise ValueError(f"CSR offsets must be non-decreasing, but offsets[{b + 1}] = {int(offsets[b + 1])} < "
                         f"offsets[{b}] = {int(offsets[b])}")
    if int(offsets[-1]) != labels.numel():
        raise ValueError(f"CSR offsets[-1] = {int(offsets[-1])} must equal the number of labels "
                         f"({labels.numel()}): offsets and labels do not describe the same rows")
    width = int(lengths.max()) if batch else 0
    row = torch.repeat_interleave(torch.arange(batch, device=labels.device), lengths.to(labels.device))
    col = torch.arange(labels.numel(), device=labels.device) - offsets[:-1].to(labels.device)[row]
    padded = torch.full((batch, width), -1, dtype=torch.int64, device=labels.device)
    padded[row, col] = labels
    return padded, labels
