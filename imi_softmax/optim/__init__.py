"""Row-sparse fused optimizers for the head (``IMISoftmax(sparse_grad=True)``): each step touches
only the rows in the sparse gradient, in one C++/CUDA pass.

* :class:`SparseAdam`: lazy Adam (moments of a row advance only when the row is touched).
* :class:`RowWiseAdagrad`: FBGEMM's row-wise Adagrad (one float32 accumulator per row).
"""
from .rowwise_adagrad import RowWiseAdagrad
from .sparse_adam import SparseAdam

__all__ = ["SparseAdam", "RowWiseAdagrad"]
