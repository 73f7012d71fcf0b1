"""Pure-PyTorch implementation of every imi_softmax op, used when the compiled library is missing.

Each function takes and returns what the op of the same name in csrc/ops.cpp does (the sampling
ops follow CONTRACT.md), so tests call them directly to compare with the kernels.
"""
from .cells import assign_codewords, assign_rows, build_cells, update_cells, update_cells_
from .loss import (dense_weight_grad, sampled_softmax_backward, sampled_softmax_forward, sampled_softmax_train,
                   sparse_weight_grad)
from .multilabel import multilabel_softmax_backward, multilabel_softmax_forward, multilabel_softmax_train
from .optim import row_sparse_adam_, row_wise_adagrad_
from .proposal import midx_log_prob, midx_sample, midx_sample_seeded
from .search import midx_search, midx_search_cells

__all__ = ["assign_codewords", "assign_rows", "build_cells", "update_cells", "update_cells_", "midx_sample", "midx_sample_seeded",
           "midx_log_prob", "midx_search_cells", "midx_search",
           "sampled_softmax_forward", "sampled_softmax_train", "sampled_softmax_backward", "dense_weight_grad",
           "sparse_weight_grad", "row_sparse_adam_", "row_wise_adagrad_", "multilabel_softmax_forward",
           "multilabel_softmax_backward", "multilabel_softmax_train"]
