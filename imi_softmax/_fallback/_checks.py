"""The compiled ops' argument checks (csrc/tensor_views.h) for the fallback ops, with the same messages.

Each raises RuntimeError, as TORCH_CHECK does, naming the argument, the bad value and, for ids, the
first bad flat position, so that a caller sees the same error whichever implementation runs, and
never a torch indexing error (or, on CUDA, a device assert) from inside an op.
"""
import os
import warnings
from typing import Optional

import torch
from torch import Tensor

INT64_MAX = 2 ** 63 - 1
MAX_INDEX_CLASSES = 2 ** 31 - 1  # kMaxIndexClasses: the index's ids and positions are int32
MAX_CODEWORDS = 1 << 13          # kMaxCodewords


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise RuntimeError(msg)


def contiguous(t: Tensor) -> bool:
    # The CPU ops read these tensors in place; the CUDA glue makes its inputs contiguous first.
    return t.is_contiguous() or t.device.type != "cpu"


def present(t: Optional[Tensor]) -> bool:
    """An optional tensor the ops use: given and not empty (an empty one stands for absent)."""
    return t is not None and t.numel() > 0


def check_same_device(op: str, **tensors: Optional[Tensor]) -> None:
    given = [(name, t) for name, t in tensors.items() if t is not None]
    first_name, first = given[0]
    for name, t in given[1:]:
        check(t.device == first.device, f"{op}: {name} is on {t.device} but {first_name} is on {first.device}; "
                                        f"move them to one device")


def _byte_span(t: Tensor):
    """[first, end) of the bytes t's elements occupy (torch strides are never negative)."""
    start = t.data_ptr()
    return start, start + (sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1) * t.element_size()


def check_no_shared_memory(op: str, **tensors: Optional[Tensor]) -> None:
    """The in-place ops' check (at::get_overlap_status(a, b) == No for every two given, non-empty
    arguments, in the kernel's order): one write must not change another argument. Byte ranges stand
    in for the storage test; they can only be more careful for non-dense views, as the kernel is
    (it refuses those as too hard to tell)."""
    spans = [(name, _byte_span(t)) for name, t in tensors.items() if present(t)]
    for i, (a, (a0, a1)) in enumerate(spans):
        for b, (b0, b1) in spans[i + 1:]:
            check(not (a0 < b1 and b0 < a1), f"{op}: {a} and {b} share memory; the op writes the index in place, so "
                                             f"each argument must be its own tensor (pass the index's own arrays and "
                                             f"fresh changed/new_* tensors)")


def checked_size_product(op: str, what: str, a: int, b: int) -> int:
    """a * b for a size computed from arguments, refused when it does not fit in int64 (before allocating)."""
    check(a >= 0 and b >= 0 and a * b <= INT64_MAX, f"{op}: {what} = {a} * {b} does not fit in int64")
    return a * b


def check_no_bad_position(op: str, name: str, ids: Tensor, bad: Tensor, allowed: str, what: str = "class id") -> None:
    """Raises naming the first entry of ids (in flat order) that bad flags: its value, its [row, column]
    (its position for 1-D ids) and what it may hold, as the kernels' position flag reports it."""
    if ids.numel() == 0 or not bool(bad.any()):
        return
    pos = int(bad.reshape(-1).nonzero()[0, 0])
    value = int(ids.reshape(-1)[pos])
    where = f"{pos // ids.shape[1]}, {pos % ids.shape[1]}" if ids.dim() == 2 and ids.shape[1] > 0 else str(pos)
    raise RuntimeError(f"{op}: {name} has {what} {value} at [{where}] outside {allowed}")


def in_range(ids: Tensor, n: int) -> Tensor:
    return (ids >= 0) & (ids < n)


# ---- the MIDX index ------------------------------------------------------------------------------

def check_finite_beta(op: str, name: str, beta: Tensor) -> None:
    """check_finite_beta (csrc/tensor_views.h): a NaN / Inf bias snapshot would give NaN cell masses."""
    check(bool(torch.isfinite(beta).all()), f"{op}: {name} holds NaN or Inf (the bias snapshot must be finite): "
          "check the bias for NaN / Inf before building")


def check_num_codewords(op: str, K: int) -> None:
    # Capped far below where K*K overflows: the sampling ops hold two K*K float tables per thread.
    check(1 <= K <= MAX_CODEWORDS, f"{op}: num_codewords (K, the width of s1/s2) must lie in [1, {MAX_CODEWORDS}], "
                                   f"got {K}")


def check_index_classes(op: str, n: int) -> None:
    check(n <= MAX_INDEX_CLASSES, f"{op}: an index holds at most 2^31 - 1 = {MAX_INDEX_CLASSES} classes (its class "
                                  f"ids and positions are int32), got {n}: shard the head over processes "
                                  f"(IMISoftmax(..., process_group=pg)) so that each shard holds fewer")


def check_index_array(op: str, name: str, t: Tensor) -> None:
    """An index array (code1, code2, class_ids, alias_pos): int32 [N], contiguous."""
    check(t.dtype == torch.int32, f"{op}: {name} must be int32 (the MIDX index's class ids, codes and positions are "
                                  f"int32), got {t.dtype}: convert it with .to(torch.int32) or rebuild the index")
    check(t.dim() == 1 and contiguous(t), f"{op}: {name} must be contiguous [N], got {list(t.shape)}")
    check_index_classes(op, t.numel())


def check_query_scores(s1: Tensor, s2: Tensor) -> None:
    check(s1.dim() == 2 and s2.dim() == 2 and s1.shape == s2.shape,
          f"imi_softmax: s1 and s2 must both be [B, K], got {list(s1.shape)} and {list(s2.shape)}")
    check(s1.dtype == torch.float32 and s2.dtype == torch.float32, "imi_softmax: query scores must be float32")
    check_num_codewords("imi_softmax", s1.shape[1])


def check_finite_scores(op: str, s1: Tensor, s2: Tensor) -> None:
    """tensor_views.h check_finite_scores (the sampling kernels check the same in their loop): a row of
    NaN / Inf scores would give NaN CDFs and meaningless draws, and no rank in the search's visit order."""
    bad = ~(torch.isfinite(s1).all(1) & torch.isfinite(s2).all(1))
    if bool(bad.any()):
        raise RuntimeError(f"{op}: the query scores s1/s2 of row {int(bad.nonzero()[0, 0])} hold NaN or Inf: the "
                           f"query holds NaN or Inf, or query . codeword overflows float32 (scale the query or the "
                           f"weight down)")


def check_cell_masses(K: int, log_n: Tensor, cell_mass: Tensor, log_n_max: Tensor) -> None:
    check_num_codewords("imi_softmax", K)
    check(log_n.numel() == K * K and cell_mass.numel() == K * K,
          f"imi_softmax: log_n and cell_mass must have K*K = {K * K} entries, got {log_n.numel()} and "
          f"{cell_mass.numel()}")
    check(log_n.dtype == cell_mass.dtype == log_n_max.dtype == torch.float32 and log_n_max.numel() == 1,
          "imi_softmax: index masses must be float32 (log_n_max: one entry)")
    check(contiguous(log_n) and contiguous(cell_mass), "imi_softmax: index masses must be contiguous")


def check_offsets(op: str, K: int, offsets: Tensor, n: int) -> None:
    """CSR offsets of the K*K cells over n classes: [K*K+1], from 0, never decreasing, ending at n."""
    kk = K * K
    check(offsets.dtype == torch.int64 and offsets.dim() == 1 and contiguous(offsets) and offsets.numel() == kk + 1,
          f"{op}: offsets must be contiguous int64 [K*K+1] = [{kk + 1}], got {offsets.dtype} {list(offsets.shape)}")
    first, last = int(offsets[0]), int(offsets[kk])
    check(first == 0 and last == n and not bool((offsets[1:] < offsets[:-1]).any()),
          f"{op}: offsets must start at 0, never decrease and end at len(class_ids) = {n} (got offsets[0] = "
          f"{first}, offsets[-1] = {last})")


def check_sampling_tables(op: str, K: int, offsets: Tensor, class_ids: Tensor, alias_prob: Optional[Tensor],
                          alias_pos: Optional[Tensor], beta_csr: Optional[Tensor]) -> None:
    """class_ids [N >= 1], their offsets and, with a bias, alias_prob / alias_pos / beta_csr [N]."""
    check_index_array(op, "class_ids", class_ids)
    n = class_ids.numel()
    check(n >= 1, f"{op}: the index holds no class (class_ids is empty)")
    check_offsets(op, K, offsets, n)
    check(present(alias_prob) == present(alias_pos) == present(beta_csr),
          f"{op}: alias_prob, alias_pos and beta_csr must be given together")
    if not present(alias_prob):
        return
    check(alias_prob.dtype == beta_csr.dtype == torch.float32, f"{op}: alias_prob and beta_csr must be float32")
    check_index_array(op, "alias_pos", alias_pos)
    check(contiguous(alias_prob) and contiguous(beta_csr), f"{op}: alias tables must be contiguous")
    check(alias_prob.numel() == alias_pos.numel() == beta_csr.numel() == n,
          f"{op}: alias_prob, alias_pos and beta_csr must have len(class_ids) = {n} entries, got "
          f"{alias_prob.numel()}, {alias_pos.numel()} and {beta_csr.numel()}")


def check_codes(op: str, code1: Tensor, code2: Tensor) -> None:
    check_index_array(op, "code1", code1)
    check_index_array(op, "code2", code2)
    check(code1.shape == code2.shape, f"{op}: code1/code2 must have equal length, got {list(code1.shape)} and "
                                      f"{list(code2.shape)}")


def check_class_codes(op: str, beta: Optional[Tensor], code1: Tensor, code2: Tensor) -> None:
    """code1 / code2 [N] int32 and beta [N] float32 by class id, or absent."""
    check_codes(op, code1, code2)
    if present(beta):
        check(beta.dtype == torch.float32 and contiguous(beta) and beta.numel() == code1.numel(),
              f"{op}: beta must be contiguous float32 [N] = [{code1.numel()}], got {beta.dtype} {list(beta.shape)}")


def check_ids_and_codes(op: str, name: str, ids: Tensor, code1: Tensor, code2: Tensor, K: int,
                        negative_marker: bool = False) -> None:
    """Every id in [0, N = len(code1)) (or negative, with negative_marker: ignored) and its codes in [0, K)."""
    check(ids.dtype == torch.int64, f"{op}: {name} must be int64")
    if ids.numel() == 0:
        return
    n = code1.numel()
    flat = ids.reshape(-1)
    bad = flat >= n
    if not negative_marker:
        bad |= flat < 0
    if n > 0:
        safe = flat.clamp(0, n - 1)
        c1, c2 = code1[safe], code2[safe]
        bad |= ~(in_range(c1, K) & in_range(c2, K)) & (flat >= 0)
    if not bool(bad.any()):
        return
    first = int(flat[bad][0])
    if not 0 <= first < n:
        check_no_bad_position(op, name, ids, bad.reshape(ids.shape),
                              f"[0, {n})" + (" (or negative: ignored)" if negative_marker else ""))
    raise RuntimeError(f"{op}: class {first} (in {name}) has codes ({int(code1[first])}, {int(code2[first])}) "
                       f"outside [0, K = {K})")


# ---- the CPU draw passes' setting ---------------------------------------------------------------

_SIMD_LEVELS = {"portable": 0, "0": 0, "avx2": 1, "avx512": 2}
_simd_told = False


def _cpu_simd_level() -> int:
    """The widest draw passes the compiled CPU ops would run here: 2 (AVX-512), 1 (AVX2) or 0."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:  # no /proc (not Linux): unknown, so no level is reported as missing
        return 2
    return 2 if "avx512f" in flags else 1 if "avx2" in flags else 0


def check_cpu_simd_env() -> None:
    """The CPU sampling ops read IMI_CPU_SIMD on every call and say once per process when it asks
    for something they cannot do; the fallback has no draw passes to choose, but a mistyped or
    unsupported value still gets the kernels' warning, so a setting is not silently ignored."""
    global _simd_told
    value = os.environ.get("IMI_CPU_SIMD", "")
    if _simd_told or value in ("", "auto", "1"):
        return
    want = _SIMD_LEVELS.get(value)
    best = _cpu_simd_level() if want is not None else 0
    if want is None:
        problem = ("IMI_CPU_SIMD must be one of auto (or 1), portable (or 0), avx2, avx512; the value set is not one "
                   "of them, so the widest draw passes this CPU supports are used")
    elif want <= best:
        return
    elif best == 1:
        problem = ("IMI_CPU_SIMD asks for AVX-512 draw passes, which this CPU (or build) lacks: using the AVX2 passes "
                   "(the same draws)")
    else:
        problem = ("IMI_CPU_SIMD asks for vectorized draw passes that this CPU (or build) lacks: using the portable "
                   "passes (the same draws)")
    _simd_told = True
    warnings.warn(f"imi_softmax: {problem}", UserWarning, stacklevel=3)


# ---- loss ops ------------------------------------------------------------------------------------

def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_loss_inputs(x: Tensor, weight: Tensor, bias: Optional[Tensor], ids: Tensor, log_q: Tensor) -> None:
    """x [B, d], weight [N, d], bias [N] or None of x's dtype; ids int64 [B, width >= 1]; log_q like ids
    in the accumulation dtype. The ids' values are checked by each op (what a column may hold differs)."""
    check(x.dim() == 2 and weight.dim() == 2 and x.shape[1] == weight.shape[1],
          f"imi_softmax: x [B, d] and weight [N, d] expected, got {list(x.shape)} and {list(weight.shape)}")
    check(x.dtype == weight.dtype, "imi_softmax: x and weight dtypes differ")
    if bias is not None:
        check(bias.dim() == 1 and bias.shape[0] == weight.shape[0] and bias.dtype == weight.dtype,
              "imi_softmax: bias must be [N] with weight's dtype")
    check(ids.dim() == 2 and ids.shape[0] == x.shape[0] and ids.shape[1] >= 1 and ids.dtype == torch.int64,
          f"imi_softmax: ids must be int64 [B, 1+M] (column 0: the target), got {ids.dtype} {list(ids.shape)}")
    check(log_q.shape == ids.shape, "imi_softmax: log_q must match ids' shape")
    acc = acc_dtype(x.dtype)
    check(log_q.dtype == acc, f"imi_softmax: log_q must be {acc} for x of {x.dtype}")
    check_same_device("sampled_softmax", x=x, weight=weight, bias=bias, ids=ids, log_q=log_q)


def check_backward_inputs(op: str, grad_loss: Tensor, lse: Tensor, x: Tensor) -> None:
    """The loss backward ops' grad_loss and lse (their shapes checked by the op): floating point, on x's device."""
    check(grad_loss.is_floating_point() and lse.is_floating_point(), f"{op}: grad_loss and lse must be floating point")
    check_same_device(op, x=x, grad_loss=grad_loss, lse=lse)
