"""Python side of the custom ops: fake (meta) kernels for torch.compile and autograd formulas."""
from typing import Optional

import torch
from torch import Tensor

from ._differentiable_once import differentiable_once, keep_anchors
from ._loader import load_library
from ._serial_glue import with_serial_glue

USING_FALLBACK = not load_library()

ops = torch.ops.imi_softmax
_lib = "imi_softmax::"


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the loss kernels: fp64 stays fp64, everything else accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake(_lib + "assign_codewords")
def _assign_codewords_fake(x, centroids):
    n = x.shape[0]
    return x.new_empty(n, dtype=torch.int64), x.new_empty(n)


@torch.library.register_fake(_lib + "assign_rows")
def _assign_rows_fake(weight, rows, codebook1, codebook2, residual):
    c = rows.shape[0]
    return (rows.new_empty(c, dtype=torch.int32), rows.new_empty(c, dtype=torch.int32),
            rows.new_empty((), dtype=torch.bool))


@torch.library.register_fake(_lib + "build_cells")
def _build_cells_fake(code1, code2, beta, num_codewords):
    n, kk = code1.shape[0], num_codewords * num_codewords
    f32, i32 = dict(dtype=torch.float32), dict(dtype=torch.int32)  # index arrays int32, offsets int64
    per_class = n if beta is not None else 0
    return (
        code1.new_empty(kk + 1, dtype=torch.int64),
        code1.new_empty(n, **i32),
        code1.new_empty(per_class, **f32),
        code1.new_empty(per_class, **i32),
        code1.new_empty(per_class, **f32),
        code1.new_empty((num_codewords, num_codewords), **f32),
        code1.new_empty((num_codewords, num_codewords), **f32),
        code1.new_empty(1, **f32),
    )


@torch.library.register_fake(_lib + "update_cells")
def _update_cells_fake(offsets, class_ids, alias_prob, alias_pos, beta_csr, log_n, cell_mass, log_n_max,
                       code1, code2, beta, changed, new_code1, new_code2, new_beta, num_codewords):
    n = code1.shape[0]
    f32 = dict(dtype=torch.float32)
    per_class = n if beta is not None else 0
    i32 = dict(dtype=torch.int32)
    return (code1.new_empty(n, **i32), code1.new_empty(n, **i32), code1.new_empty(per_class, **f32)) + tuple(
        _build_cells_fake(code1, code2, beta, num_codewords))


@torch.library.register_fake(_lib + "update_cells_")
def _update_cells_inplace_fake(offsets, class_ids, alias_prob, alias_pos, beta_csr, log_n, cell_mass, log_n_max,
                               code1, code2, beta, changed, new_code1, new_code2, new_beta, num_codewords):
    return None  # rewrites the index's arrays in place (same shapes): no outputs


def _sample_outputs(s1, num_samples, targets):
    """(ids [B, M] int64, log_q [B, M] float32, target_log_q [B, L] float32; L = 0 without targets)."""
    shape = (s1.shape[0], num_samples)
    num_targets = 0 if targets is None else targets.shape[1]
    return (s1.new_empty(shape, dtype=torch.int64), s1.new_empty(shape, dtype=torch.float32),
            s1.new_empty((s1.shape[0], num_targets), dtype=torch.float32))


@torch.library.register_fake(_lib + "midx_sample")
def _sample_fake(s1, s2, log_n, cell_mass, log_n_max, offsets, class_ids, alias_prob, alias_pos, beta_csr,
                 num_samples, generator, targets=None, beta=None, code1=None, code2=None):
    return _sample_outputs(s1, num_samples, targets)


@torch.library.register_fake(_lib + "midx_sample_seeded")
def _sample_seeded_fake(s1, s2, log_n, cell_mass, log_n_max, offsets, class_ids, alias_prob, alias_pos,
                        beta_csr, num_samples, seed, offset, targets=None, beta=None, code1=None, code2=None):
    return _sample_outputs(s1, num_samples, targets)


@torch.library.register_fake(_lib + "midx_log_prob")
def _log_prob_fake(s1, s2, log_n, cell_mass, log_n_max, beta, code1, code2, ids):
    return ids.new_empty(ids.shape, dtype=torch.float32)


@torch.library.register_fake(_lib + "midx_search_cells")
def _search_cells_fake(s1, s2, offsets, budget):
    b, k = s1.shape
    return offsets.new_empty((b, min(k * k, budget))), offsets.new_empty(b)


@torch.library.register_fake(_lib + "midx_search")
def _search_fake(query, weight, bias, s1, s2, offsets, class_ids, k, budget, rerank="auto"):
    b = query.shape[0]
    return offsets.new_empty((b, k)), query.new_empty((b, k), dtype=acc_dtype(weight.dtype))


@torch.library.register_fake(_lib + "sampled_softmax_forward")
def _forward_fake(x, weight, bias, ids, log_q, remove_accidental_hits, ignore_index, sparse_grad):
    acc = acc_dtype(x.dtype)
    return x.new_empty(x.shape[0], dtype=acc), x.new_empty(x.shape[0], dtype=acc)


@torch.library.register_fake(_lib + "sampled_softmax_train")
def _train_fake(x, weight, bias, ids, log_q, remove_accidental_hits, ignore_index, sparse_grad):
    acc = acc_dtype(x.dtype)
    return (x.new_empty(x.shape[0], dtype=acc), x.new_empty(x.shape[0], dtype=acc),
            x.new_empty(ids.shape, dtype=acc), x.new_empty(x.shape, dtype=acc))


@torch.library.register_fake(_lib + "sampled_softmax_backward")
def _backward_fake(grad_loss, x, weight, bias, ids, log_q, lse, remove_accidental_hits, ignore_index):
    return torch.empty_like(x), x.new_empty(ids.shape, dtype=acc_dtype(x.dtype))


@torch.library.register_fake(_lib + "dense_weight_grad")
def _dense_grad_fake(coef, ids, x, num_classes):
    return x.new_empty((num_classes, x.shape[1])), x.new_empty(num_classes)


@torch.library.register_fake(_lib + "sparse_weight_grad")
def _sparse_grad_fake(coef, ids, x, num_classes):
    u = torch.library.get_ctx().new_dynamic_size()
    return x.new_empty(u, dtype=torch.int64), x.new_empty((u, x.shape[1])), x.new_empty(u)


@torch.library.register_fake(_lib + "row_sparse_adam_")
def _row_sparse_adam_fake(param, exp_avg, exp_avg_sq, rows, grad, lr, beta1, beta2, eps, weight_decay, step):
    return None  # in place on param and its state: no outputs


@torch.library.register_fake(_lib + "row_wise_adagrad_")
def _row_wise_adagrad_fake(param, sum, rows, grad, lr, eps, weight_decay):
    return None


def _weight_grads(ctx, coef: Tensor, ids: Tensor, x: Tensor, bias_shape):
    """(grad_w, grad_b) from the coefficients scaled by grad_loss: sparse COO or dense."""
    num_classes, weight_shape = ctx.num_classes, ctx.weight_shape
    grad_w = grad_b = None
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        if ctx.sparse_grad:
            uniq, rows, bias_rows = ops.sparse_weight_grad(coef, ids, x, num_classes)
            index = uniq.unsqueeze(0)
            grad_w = torch.sparse_coo_tensor(index, rows, weight_shape, is_coalesced=True, check_invariants=False)
            if bias_shape is not None:
                grad_b = torch.sparse_coo_tensor(index, bias_rows, bias_shape, is_coalesced=True,
                                                 check_invariants=False)
        else:
            grad_w, grad_b = ops.dense_weight_grad(coef, ids, x, num_classes)
            if bias_shape is None:
                grad_b = None
    return grad_w, grad_b


def _save_weight_grad_flags(ctx, weight: Tensor, bias: Optional[Tensor], sparse_grad: bool) -> None:
    """What _weight_grads reads from ctx: the gradient layout and the shapes to build it in."""
    ctx.sparse_grad = sparse_grad
    ctx.num_classes = weight.shape[0]
    ctx.weight_shape = weight.shape
    ctx.bias_shape = None if bias is None else bias.shape


def _mark_constant_outputs(ctx, *outputs) -> None:
    """Outputs no gradient flows through. Their gradients are not materialized either: autograd would
    otherwise fill a zero tensor per output in every backward (``[B, M + 1]`` and ``[B, d]`` for the
    training ops), each fill a parallel region outside serial_glue(); the backward formulas take
    ``None`` for them."""
    ctx.mark_non_differentiable(*outputs)
    ctx.set_materialize_grads(False)


def _save_flags(ctx, inputs):
    x, weight, bias, ids, log_q, remove_accidental_hits, ignore_index, sparse_grad = inputs
    ctx.remove_accidental_hits = remove_accidental_hits
    ctx.ignore_index = ignore_index
    _save_weight_grad_flags(ctx, weight, bias, sparse_grad)


def _setup_context(ctx, inputs, output):
    keep_anchors(ctx, *inputs[:3])  # x, weight, bias
    x, weight, bias, ids, log_q = inputs[:5]
    _, lse = output
    ctx.save_for_backward(x, weight, bias, ids, log_q, lse)
    _save_flags(ctx, inputs)
    _mark_constant_outputs(ctx, lse)


@differentiable_once("sampled_softmax_loss")
def _backward(ctx, grad_loss: Tensor, _grad_lse):
    x, weight, bias, ids, log_q, lse = ctx.saved_tensors
    if grad_loss is None:
        grad_loss = torch.zeros_like(lse)
    grad_x, coef = ops.sampled_softmax_backward(
        grad_loss, x, weight, bias, ids, log_q, lse, ctx.remove_accidental_hits, ctx.ignore_index
    )
    grad_w, grad_b = _weight_grads(ctx, coef, ids, x, ctx.bias_shape)
    return grad_x, grad_w, grad_b, None, None, None, None, None


torch.library.register_autograd(
    _lib + "sampled_softmax_forward", _backward, setup_context=_setup_context
)


def _train_setup_context(ctx, inputs, output):
    # The weight is not saved: the forward already took everything the backward needs from it.
    keep_anchors(ctx, *inputs[:3])  # x, weight, bias
    x, ids = inputs[0], inputs[3]
    _, lse, coef, grad_x = output
    ctx.save_for_backward(x, ids, coef, grad_x)
    _save_flags(ctx, inputs)
    _mark_constant_outputs(ctx, lse, coef, grad_x)


@with_serial_glue  # O(B * M) scaling around the weight-gradient kernel (imi_softmax/_serial_glue.py)
@differentiable_once("sampled_softmax_loss")  # coef and grad_x are constants here
def _train_backward(ctx, grad_loss: Tensor, _grad_lse, _grad_coef, _grad_x):
    x, ids, coef, grad_x = ctx.saved_tensors
    if grad_loss is None:
        grad_loss = torch.zeros(x.shape[0], dtype=coef.dtype, device=x.device)
    # Ignored rows get exactly zero, as the backward op gives them, even where grad_loss is not
    # finite (a mean over no target is 0/0): 0 * inf would be NaN.
    g = torch.where(ids[:, 0] == ctx.ignore_index, 0.0, grad_loss.to(coef.dtype)).unsqueeze(1)
    gx = (grad_x * g).to(x.dtype) if ctx.needs_input_grad[0] else None
    grad_w, grad_b = _weight_grads(ctx, coef * g, ids, x, ctx.bias_shape)
    return gx, grad_w, grad_b, None, None, None, None, None


torch.library.register_autograd(
    _lib + "sampled_softmax_train", _train_backward, setup_context=_train_setup_context
)


# -- multi-label sampled softmax (csrc/include/imi_softmax/multilabel_loss.h) -------------------------

@torch.library.register_fake(_lib + "multilabel_softmax_forward")
def _multilabel_forward_fake(x, weight, bias, ids, log_q, num_positives, remove_accidental_hits, sparse_grad):
    acc = acc_dtype(x.dtype)
    shape = (x.shape[0], num_positives)
    return x.new_empty(shape, dtype=acc), x.new_empty(shape, dtype=acc)


@torch.library.register_fake(_lib + "multilabel_softmax_train")
def _multilabel_train_fake(x, weight, bias, ids, log_q, pos_weight, num_positives, remove_accidental_hits,
                           sparse_grad):
    acc = acc_dtype(x.dtype)
    return x.new_empty(x.shape[0], dtype=acc), x.new_empty(ids.shape, dtype=acc), x.new_empty(x.shape, dtype=acc)


@torch.library.register_fake(_lib + "multilabel_softmax_backward")
def _multilabel_backward_fake(grad_loss, x, weight, bias, ids, log_q, lse, num_positives, remove_accidental_hits):
    return torch.empty_like(x), x.new_empty(ids.shape, dtype=acc_dtype(x.dtype))


def _multilabel_setup_context(ctx, inputs, output):
    keep_anchors(ctx, *inputs[:3])  # x, weight, bias
    x, weight, bias, ids, log_q, num_positives, remove_accidental_hits, sparse_grad = inputs
    _, lse = output
    ctx.save_for_backward(x, weight, bias, ids, log_q, lse)
    ctx.num_positives = num_positives
    ctx.remove_accidental_hits = remove_accidental_hits
    _save_weight_grad_flags(ctx, weight, bias, sparse_grad)
    _mark_constant_outputs(ctx, lse)


@differentiable_once("the multi-label sampled softmax loss")
def _multilabel_backward(ctx, grad_loss: Tensor, _grad_lse):
    x, weight, bias, ids, log_q, lse = ctx.saved_tensors
    if grad_loss is None:
        grad_loss = torch.zeros_like(lse)
    grad_x, coef = ops.multilabel_softmax_backward(grad_loss, x, weight, bias, ids, log_q, lse, ctx.num_positives,
                                                   ctx.remove_accidental_hits)
    grad_w, grad_b = _weight_grads(ctx, coef, ids, x, ctx.bias_shape)
    return grad_x, grad_w, grad_b, None, None, None, None, None


torch.library.register_autograd(
    _lib + "multilabel_softmax_forward", _multilabel_backward, setup_context=_multilabel_setup_context
)


def _multilabel_train_setup_context(ctx, inputs, output):
    # The weight is not saved: the forward already took everything the backward needs from it.
    keep_anchors(ctx, *inputs[:3])  # x, weight, bias
    x, weight, bias, ids, log_q, pos_weight, num_positives, remove_accidental_hits, sparse_grad = inputs
    _, coef, grad_x = output
    ctx.save_for_backward(x, ids, coef, grad_x)
    ctx.num_positives = num_positives
    _save_weight_grad_flags(ctx, weight, bias, sparse_grad)
    _mark_constant_outputs(ctx, coef, grad_x)


@with_serial_glue  # as _train_backward
@differentiable_once("the multi-label sampled softmax loss")
def _multilabel_train_backward(ctx, grad_row_loss: Tensor, _grad_coef, _grad_x):
    x, ids, coef, grad_x = ctx.saved_tensors
    if grad_row_loss is None:
        grad_row_loss = torch.zeros(x.shape[0], dtype=coef.dtype, device=x.device)
    # A row without positives gets exactly zero, as the backward op gives it, even where its grad is
    # not finite (a mean over no positive is 0/0): 0 * inf would be NaN.
    has_positive = (ids[:, : ctx.num_positives] >= 0).any(1)
    g = torch.where(has_positive, grad_row_loss.to(coef.dtype), 0.0).unsqueeze(1)
    gx = (grad_x * g).to(x.dtype) if ctx.needs_input_grad[0] else None
    grad_w, grad_b = _weight_grads(ctx, coef * g, ids, x, ctx.bias_shape)
    return gx, grad_w, grad_b, None, None, None, None, None, None


torch.library.register_autograd(
    _lib + "multilabel_softmax_train", _multilabel_train_backward, setup_context=_multilabel_train_setup_context
)
