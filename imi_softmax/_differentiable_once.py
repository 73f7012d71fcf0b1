"""Backward formulas that may not be differentiated again, and say so wherever that is tried.

Our losses' backward formulas use quantities saved by the forward (softmax coefficients, grad_x,
the gathered weight rows) as constants, so a gradient taken with ``create_graph=True`` through them
has no correct second derivative. torch's ``once_differentiable`` guards only the case where the
incoming gradient itself requires grad; otherwise it hands back a gradient without a graph, and a
function of it (a gradient penalty ``gx.pow(2).sum()`` added to another loss) is then silently
treated as a constant: its terms vanish from the update. Here, under ``create_graph=True``, each
gradient is tied to a node whose backward raises, so that differentiating anything built from it is
an error naming the loss, while a user who only wanted first derivatives (create_graph=True for
another part of the model) sees no difference.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor

from ._validation import _compiling


class _RaisesWhenDifferentiated(torch.autograd.Function):
    """Identity on ``grad`` (a detached alias) whose backward raises ``message``. Its graph inputs
    are the anchors: the loss's inputs that require grad, so that ``torch.autograd.grad(f(grad), w)``
    reaches this node (and raises here) instead of finding ``w`` unused."""

    @staticmethod
    def forward(ctx, message: str, grad: Tensor, *anchors: Tensor) -> Tensor:
        ctx.message = message
        return grad.detach()

    @staticmethod
    def backward(ctx, _grad):
        raise RuntimeError(ctx.message)


def keep_anchors(ctx, *inputs) -> None:
    """Remembers the inputs of a loss's forward that require grad, for :func:`differentiable_once`
    to tie the gradients to (references only; nothing is kept under torch.compile, where the
    gradients are not tied)."""
    if not _compiling():
        ctx.double_backward_anchors = tuple(t for t in inputs if isinstance(t, Tensor) and t.requires_grad)


def double_backward_message(what: str) -> str:
    return (f"{what} does not support double backward (create_graph=True through the loss, then a "
            "derivative of that gradient): its backward treats the forward's softmax coefficients as "
            "constants, so a second derivative would be wrong. Differentiate the loss once, or use the "
            "full softmax (F.cross_entropy) for higher-order gradients")


def differentiable_once(what: str) -> Callable:
    """Decorator for a backward formula ``backward(ctx, *grad_outputs)`` of the loss named ``what``,
    which returns a tuple (one entry per input): it runs without grad mode and, under
    ``create_graph=True``, returns its gradients tied to a node that raises when differentiated (tied
    to the inputs :func:`keep_anchors` kept and to the incoming gradients that require grad, else to
    a leaf of its own)."""
    message = double_backward_message(what)

    def decorate(backward: Callable) -> Callable:
        @functools.wraps(backward)
        def wrapper(ctx, *grad_outputs):
            create_graph = torch.is_grad_enabled() and not _compiling()
            with torch.no_grad():
                grads = backward(ctx, *grad_outputs)
            if not create_graph:
                return grads
            # the gradients depend on the loss's inputs and on the incoming gradients (which require
            # grad when the loss went through a nonlinear function, e.g. the multi-label loss's S)
            anchors = getattr(ctx, "double_backward_anchors", ()) + tuple(
                g for g in grad_outputs if isinstance(g, Tensor) and g.requires_grad)
            anchors = anchors or (torch.empty(0, requires_grad=True),)
            return tuple(_RaisesWhenDifferentiated.apply(message, g, *anchors) if isinstance(g, Tensor) else g
                         for g in grads)
        return wrapper
    return decorate
