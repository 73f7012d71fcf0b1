"""Proposals for the sampled softmax; all share the Sampler interface."""
from .base import Sampler
from .in_batch import InBatchSampler
from .midx import MIDXSampler
from .mixture import MixtureSampler
from .simple import ExactSampler, UniformSampler, UnigramSampler
from .top_cells import TopCellsSampler

__all__ = ["Sampler", "MIDXSampler", "UniformSampler", "UnigramSampler", "ExactSampler", "MixtureSampler",
           "TopCellsSampler", "InBatchSampler"]
