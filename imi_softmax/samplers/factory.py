"""The sampler a head builds from its ``sampler=`` argument (one place for IMISoftmax and the
class-sharded head)."""
from typing import Optional, Tuple, Union

from torch import Tensor

from .base import Sampler
from .midx import MIDXSampler
from .simple import ExactSampler, UniformSampler, UnigramSampler

SAMPLERS = ("midx", "uniform", "unigram", "exact")


def make_sampler(sampler: Union[str, Sampler], *, in_features: int, num_classes: int, num_codewords: int,
                 quantizer: str, class_counts: Optional[Tensor], kmeans_iters: int,
                 class_range: Optional[Tuple[int, int]] = None) -> Sampler:
    """A Sampler over ``num_classes`` classes, or over the shard ``class_range = (start, stop)`` of
    them (``class_counts`` then still covers all ``num_classes``; the shard keeps its slice).
    A Sampler instance is returned as it is."""
    if isinstance(sampler, Sampler):
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
        if class_counts.numel() != num_classes:
            shard = "" if class_range is None else " (all classes; each rank keeps its shard's)"
            raise ValueError(f"class_counts must have {num_classes} entries{shard}, got {class_counts.numel()}")
        return UnigramSampler(class_counts.reshape(-1)[start:stop] if class_range is not None else class_counts)
    if sampler == "exact":
        return ExactSampler()
    raise ValueError(f"sampler must be one of {SAMPLERS} or a Sampler instance, got {sampler!r}")
