"""Serial glue: the small torch ops of a training step run on the calling thread, our kernels on all.

Between its kernels (draws, the fused loss, the weight gradients: O(B * M * d)) a step runs a dozen
small torch ops (the proposal scores' product, concatenating targets and samples, scaling by
grad_loss, marking the touched rows: O(B * M) or O(B * K * d)). Each of those opens an OpenMP region
that splits its elements in equal parts up front and ends in a barrier of every thread; when another
process holds one of the cores, each such barrier waits for a descheduled thread for up to a
scheduler slice, which multiplied a step's time beside a busy process. Inside ``serial_glue()`` the
calling thread's torch ops use one thread (OpenMP's and MKL's per-thread counts; other threads keep
theirs) while our kernels keep every thread and hand out their rows in chunks
(csrc/cpu/serial_glue.h, csrc/cpu/parallel_chunks.h). On a quiet machine the glue costs about the
same either way (it is small); beside a busy process the step loses far less.

Not used under torch.compile (the compiled graph has its own threading) nor without the compiled
library (the pure-PyTorch fallback has no kernels of its own).
"""
from __future__ import annotations

import contextlib
import functools

import torch

_UNRESOLVED = object()
_switch = _UNRESOLVED


def _resolve_switch():
    """_C._set_serial_glue, or None with the fallback ops (importing _C would register its ops)."""
    global _switch
    from . import _loader

    _switch = None
    if not _loader.USING_FALLBACK:
        try:
            from ._C import _set_serial_glue as _switch
        except ImportError:  # a compiled library without the switch: the glue keeps torch's threads
            _switch = None
    return _switch


class _SerialGlue:
    __slots__ = ("_switch",)

    def __init__(self, switch) -> None:
        self._switch = switch

    def __enter__(self) -> None:
        self._switch(True)

    def __exit__(self, *exc) -> None:
        self._switch(False)  # nested switches are counted: only the outermost restores the counts


def serial_glue():
    """Context manager: torch ops of the calling thread on one thread, imi_softmax kernels on all."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    switch = _resolve_switch() if _switch is _UNRESOLVED else _switch
    if switch is None:
        return contextlib.nullcontext()
    return _SerialGlue(switch)


def with_serial_glue(fn):
    """Decorator: ``fn`` runs inside :func:`serial_glue` (the training ops' backward formulas)."""
    @functools.wraps(fn)
    def glued(*args, **kwargs):
        with serial_glue():
            return fn(*args, **kwargs)
    return glued
