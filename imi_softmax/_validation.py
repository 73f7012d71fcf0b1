"""Argument checks that run before any kernel: bad input gets a Python error naming the argument."""
import operator
from typing import Optional, Sequence

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def check_tensor(name: str, value, *, dims: Optional[Sequence[int]] = None, dtypes=None) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    check_materialized(name, value)
    if dims is not None and value.dim() not in dims:
        want = " or ".join(str(d) for d in dims)
        raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {value.dtype}")
    return value


def check_materialized(name: str, value: Tensor) -> None:
    """Meta tensors have shapes but no data: nothing can be sampled or built from them."""
    if value.device.type == "meta" and not _compiling():
        raise ValueError(
            f"{name} is on the meta device (shapes only, no data); materialize it first, e.g. "
            f"head.to_empty(device='cpu') then head.reset_parameters() (or load_state_dict)"
        )


def _as_int(name: str, value) -> int:
    """value as a Python int: ints and what indexes like one (numpy integers, one-element integer
    tensors: sizes computed from data, which nn.Linear accepts too); never a bool or bool tensor (a
    True flag in the wrong argument is a mistake, not the size 1), a float or a string."""
    is_bool = isinstance(value, bool) or (isinstance(value, Tensor) and value.dtype == torch.bool)
    try:
        if not is_bool:
            return operator.index(value)
    except TypeError:
        pass
    raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")


def check_flag(name: str, value) -> bool:
    """value as a Python bool: a bool, a numpy bool or a one-element bool tensor. A string is refused:
    ``bias='False'`` (from a config file or the command line) is truthy and would silently turn the
    option on; so are ints (a size or a count passed in the wrong place) and anything else."""
    if isinstance(value, Tensor):
        if value.dtype == torch.bool and value.numel() == 1:
            return bool(value)
    elif isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")):
        return bool(value)
    raise TypeError(f"{name} must be a bool (True or False), got {type(value).__name__} ({value!r})")


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    value = _as_int(name, value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_ignore_index(value) -> int:
    """ignore_index is a Python int (a bool would silently ignore class 1 or 0; a float or None would
    match no target, or fail deep inside torch)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"ignore_index must be an int (the target value to skip, -100 by default), got "
                        f"{type(value).__name__} ({value!r})")
    return value


def check_generator(value) -> None:
    """generator is None or a torch.Generator (the draws' random stream)."""
    if value is not None and not isinstance(value, torch.Generator):
        hint = (f"; to seed the draws pass torch.Generator().manual_seed({value})"
                if isinstance(value, int) and not isinstance(value, bool) else "")
        raise TypeError(f"generator must be a torch.Generator or None, got {type(value).__name__} ({value!r}){hint}")


def check_same_device(**tensors: Optional[Tensor]) -> None:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {first.device}; move them to one device"
            )


def check_finite(name: str, value: Tensor) -> None:
    if _compiling():
        return
    # A finite sum proves every entry finite (NaN/Inf propagate); only an overflowing sum of
    # finite values needs the elementwise scan.
    if bool(torch.isfinite(value.sum())) or bool(torch.isfinite(value).all()):
        return
    raise ValueError(f"{name} contains NaN or Inf")


def check_log_q(name: str, value: Tensor) -> None:
    """log Q of the samples or the targets given to the functional losses must be finite: -inf is a
    class the proposal cannot draw (the correction -log Q is then +inf and the loss NaN), +inf would
    silently drop the column (its corrected logit is -inf), NaN is no log-probability. A constant
    offset (an unnormalized proposal) is fine: it cancels within each row."""
    if _compiling() or value.numel() == 0:
        return
    finite = torch.isfinite(value)
    if bool(finite.all()):
        return
    bad = value[~finite][0].item()
    why = ("a class the proposal gives probability 0: every target and sample needs Q > 0 (mix a proposal "
           "without full support, such as TopCellsSampler, with one that has it: MixtureSampler)"
           if bad == float("-inf") else "not a log-probability")
    raise ValueError(f"{name} must be finite, got {bad} at {tuple(int(i) for i in (~finite).nonzero()[0])}: {why}")


def check_fp32_range(name: str, value: Tensor, fix: str, cause: Optional[Tensor] = None) -> None:
    """Raises when value holds inf or NaN produced by float32 arithmetic from finite inputs
    (scores, squared norms); ``cause`` is the input whose largest magnitude the message reports."""
    if _compiling() or value.numel() == 0:
        return
    if bool(torch.isfinite(value.sum())) or bool(torch.isfinite(value).all()):
        return
    largest = "" if cause is None else f" (its largest |entry| is {float(cause.abs().max()):.3g})"
    raise ValueError(f"{name} overflows float32 (|value| > 3.4e38){largest}; {fix}")


def check_linear_inputs(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> int:
    """x [*, d] and weight [N, d] floating tensors of one dtype, bias None or [N] in that dtype: the
    inputs of a sampled loss. Returns N."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, dims=(2,), dtypes=FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x must be [*, {weight.shape[1]}] to match weight [N, d], got {tuple(x.shape)}")
    if x.dtype != weight.dtype:
        raise TypeError(f"x has dtype {x.dtype} but weight has {weight.dtype}; cast one of them")
    n = weight.shape[0]
    if bias is not None:
        check_tensor("bias", bias, dims=(1,), dtypes=(weight.dtype,))
        if bias.shape[0] != n:
            raise ValueError(f"bias must be [{n}], got {tuple(bias.shape)}")
    return n


def check_samples(sample_ids: Tensor, sample_log_q: Tensor, batch_shape: torch.Size) -> None:
    """sample_ids [*batch_shape, M] (a tensor; its ids are checked later, on its device) and
    sample_log_q floating, of the same shape."""
    check_tensor("sample_ids", sample_ids)
    if sample_ids.dim() != len(batch_shape) + 1 or sample_ids.shape[:-1] != batch_shape:
        raise ValueError(f"sample_ids must be [{', '.join(map(str, batch_shape))}, M], got {tuple(sample_ids.shape)}")
    check_tensor("sample_log_q", sample_log_q, dtypes=FLOAT_DTYPES)
    if sample_log_q.shape != sample_ids.shape:
        raise ValueError(f"sample_log_q must match sample_ids' shape {tuple(sample_ids.shape)}, "
                         f"got {tuple(sample_log_q.shape)}")


def check_class_ids(name: str, ids: Tensor, num_classes: int, ignore_index: Optional[int] = None) -> None:
    """Ids must lie in [0, num_classes), except ignore_index where it is allowed."""
    if ids.dtype != torch.int64:
        raise TypeError(f"{name} must be int64 (torch.long), got {ids.dtype}")
    if _compiling() or ids.numel() == 0:
        return
    # One pass (one parallel region) for the usual all-valid case: every elementwise op below is a
    # region of its own, and each region waits for all threads, which on a busy machine costs more
    # than the check itself.
    low, high = torch.aminmax(ids)
    if int(low) >= 0 and int(high) < num_classes:
        return
    bad = (ids < 0) | (ids >= num_classes)
    if ignore_index is not None:
        bad &= ids != ignore_index
    if bool(bad.any()):
        value = int(ids[bad].flatten()[0])
        allowed = f"[0, {num_classes})" + (f" or ignore_index={ignore_index}" if ignore_index is not None else "")
        raise IndexError(f"{name} has class id {value} outside {allowed}")


def check_head_input(head, x: Tensor, target: Optional[Tensor]) -> None:
    """A head's forward inputs (IMISoftmax and the sharded head): x [*, in_features] in the weight's
    dtype (or any float dtype under autocast) on the weight's device, target [*] int64 class ids in
    [0, num_classes) or head.ignore_index."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    check_tensor("weight", head.weight)
    if x.dim() < 1 or x.shape[-1] != head.in_features:
        raise ValueError(f"x must be [*, {head.in_features}], got {tuple(x.shape)}")
    autocast = x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type)
    if x.dtype != head.weight.dtype and not autocast:
        raise TypeError(f"x has dtype {x.dtype} but the head's weight is {head.weight.dtype}: cast x "
                        f"(x.to({head.weight.dtype})) or run under torch.autocast")
    if x.device != head.weight.device:
        raise ValueError(f"x is on {x.device} but the head is on {head.weight.device}")
    if target is not None:
        check_tensor("target", target)
        if target.shape != x.shape[:-1]:
            raise ValueError(f"target must have shape {tuple(x.shape[:-1])}, got {tuple(target.shape)}")
        if target.device != x.device:
            raise ValueError(f"target is on {target.device} but x is on {x.device}")
        check_class_ids("target", target, head.num_classes, ignore_index=head.ignore_index)
