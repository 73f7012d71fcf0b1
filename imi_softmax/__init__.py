"""imi_softmax: adaptive sampled softmax over an Inverted Multi-Index (MIDX).

A drop-in replacement for ``nn.Linear`` + softmax cross-entropy over huge output spaces.
"""
from . import functional, metrics, optim
from ._ops import ops
from .module import IMISoftmax
from .distributed import ShardedIMISoftmax
from .samplers import (ExactSampler, InBatchSampler, MIDXSampler, MixtureSampler, Sampler, TopCellsSampler,
                       UniformSampler, UnigramSampler)
from .diagnose import DiagnoseReport, diagnose  # noqa: E402  (the function shadows the submodule name)
from . import stale  # noqa: E402
from .stale import EmbeddingCorrector, StaleEmbeddingIndex  # noqa: E402

__version__ = "0.1.0"
__all__ = ["IMISoftmax", "ShardedIMISoftmax", "MIDXSampler", "UniformSampler", "UnigramSampler", "ExactSampler",
           "MixtureSampler", "TopCellsSampler", "InBatchSampler", "Sampler", "functional", "ops", "metrics", "optim",
           "diagnose", "DiagnoseReport", "stale", "EmbeddingCorrector", "StaleEmbeddingIndex"]
