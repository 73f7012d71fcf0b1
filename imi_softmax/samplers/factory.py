"""The sampler a head builds from its ``sampler=`` argument (one place for IMISoftmax and the
class-sharded head)."""
from typing import Optional, Tuple, Union

from torch import Tensor

from .._validation import check_tensor
from .base import Sampler
from .midx import MIDXSampler
from .mixture import has_full_support
from .simple import ExactSampler, UniformSampler, UnigramSampler

SAMPLERS = ("midx", "uniform", "unigram", "exact")


def make_sampler(sampler: Union[str, Sampler], *, in_features: int, num_classes: int, num_codewords: int,
                 quantizer: str, class_counts: Optional[Tensor], kmeans_iters: int,
                 class_range: Optional[Tuple[int, int]] = None) -> Sampler:
    """A Sampler over ``num_classes`` classes, or over the shard ``class_range = (start, stop)`` of
    them (``class_counts`` then still covers all ``num_classes``; the shard keeps its slice).
    A Sampler instance is returned as it is."""
    if isinstance(sampler, Sampler):
        if not has_full_support(sampler):
            raise ValueError(f"sampler={type(sampler).__name__} gives most classes probability 0 (log Q = -inf for "
                             f"targets outside its cells: the loss would be NaN); use it as a component of a "
                             f"MixtureSampler with a full-support proposal, e.g. "
                             f"MixtureSampler([(midx, 0.9), (TopCellsSampler(midx, budget), 0.1)])")
        return sampler
    start, stop = class_range if class_range is not None else (0, num_classes)
    if sampler == "midx":
        if quantizer == "pq" and in_features % 2:
            raise ValueError(f"quantizer='pq' needs an even in_features, got {in_features}")
        return MIDXSampler(num_codewords, quantizer, kmeans_iters=kmeans_iters)
    if sampler == "uniform":
        return UniformSampler(stop - start)
    if sampler == "unigram":
        if class_counts is None:
            raise ValueError("sampler='unigram' needs class_counts=[num_classes] frequencies")
        check_tensor("class_counts", class_counts)
        if class_counts.numel() != num_classes:
            shard = "" if class_range is None else " (all classes; each rank keeps its shard's)"
            raise ValueError(f"class_counts must have {num_classes} entries{shard}, got {class_counts.numel()}")
        return UnigramSampler(class_counts.reshape(-1)[start:stop] if class_range is not None else class_counts)
    if sampler == "exact":
        return ExactSampler()
    raise ValueError(f"sampler must be one of {SAMPLERS} or a Sampler instance, got {sampler!r}")
