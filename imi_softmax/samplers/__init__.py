"""Proposals for the sampled softmax; all share the Sampler interface."""
from .base import Sampler
from .midx import MIDXSampler
from .simple import ExactSampler, UniformSampler, UnigramSampler

__all__ = ["Sampler", "MIDXSampler", "UniformSampler", "UnigramSampler", "ExactSampler"]
