"""Batch samplers for training with in-batch negatives."""
from .clustered import ClusteredBatchSampler

__all__ = ["ClusteredBatchSampler"]
