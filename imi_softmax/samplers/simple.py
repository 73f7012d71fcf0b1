"""Query-independent proposals (uniform, unigram) and the exact softmax proposal (tests, small N)."""
import math
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .._validation import FLOAT_DTYPES, check_positive_int, check_tensor
from .base import Sampler, no_autocast


class UniformSampler(Sampler):
    """Q(i) = 1 / num_classes for every query."""

    def __init__(self, num_classes: int):
        self.num_classes = check_positive_int("num_classes", num_classes)

    def sample(self, query: Tensor, num_samples: int, generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
        num_samples = self._check_sample_args(query, num_samples, generator)
        shape = (query.shape[0], num_samples)
        ids = torch.randint(0, self.num_classes, shape, generator=generator, device=query.device)
        # float32 whatever torch's default dtype is (the Sampler contract)
        return ids, torch.full(shape, -math.log(self.num_classes), dtype=torch.float32, device=query.device)

    def log_prob(self, query: Tensor, ids: Tensor) -> Tensor:
        self._check_ids(query, ids)
        return torch.full(ids.shape, -math.log(self.num_classes), dtype=torch.float32, device=ids.device)


class UnigramSampler(Sampler):
    """Q(i) proportional to counts[i] ** alpha (word2vec's 0.75 by default), for every query.

    counts: [num_classes] non-negative class frequencies. Classes with count 0 get the mass of a
    count of 1, so every class can be drawn and has a finite log Q.
    """

    def __init__(self, counts: Tensor, alpha: float = 0.75):
        check_tensor("counts", counts, dims=(1,))
        if counts.numel() < 1:
            raise ValueError("counts must have at least one class")
        counts = counts.detach().to(torch.float64)
        if not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()):
            raise ValueError("counts must be finite and non-negative")
        if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
        self.alpha = float(alpha)
        self.num_classes = counts.numel()
        weights = counts.clamp_min(1.0).pow(self.alpha)
        self._log_p = (weights / weights.sum()).log().to(torch.float32)

    def to(self, device) -> "UnigramSampler":
        self._log_p = self._log_p.to(device)
        return self

    def sample(self, query: Tensor, num_samples: int, generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
        num_samples = self._check_sample_args(query, num_samples, generator)
        log_p = self._log_p.to(query.device)
        b = query.shape[0]
        if b * num_samples == 0:  # multinomial refuses to draw 0 samples
            return self._empty_draw(query, num_samples)
        ids = torch.multinomial(log_p.exp(), b * num_samples, replacement=True, generator=generator)
        ids = ids.view(b, num_samples)
        return ids, log_p[ids]

    def log_prob(self, query: Tensor, ids: Tensor) -> Tensor:
        self._check_ids(query, ids)
        return self._log_p.to(ids.device)[ids]

    def state_dict(self) -> Dict[str, Any]:
        return {"log_p": self._log_p, "alpha": self.alpha}

    def load_state_dict(self, state: Dict[str, Any], device=None) -> bool:
        log_p = state["log_p"]
        if log_p.shape != self._log_p.shape:
            raise ValueError(f"unigram state holds {log_p.numel()} classes, this sampler has {self.num_classes}")
        self._log_p, self.alpha = log_p.to(device or self._log_p.device), float(state["alpha"])
        return True

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, alpha={self.alpha}"


class ExactSampler(Sampler):
    """Q = the true softmax P(i | query) = softmax(query @ weight.T + bias): the ideal proposal.

    Costs a full [B, num_classes] logit matrix per call, so it is for tests and small catalogues.
    It reads the live weight it was built with (no snapshot), so Q tracks training exactly.
    """

    def build(self, weight: Tensor, bias: Optional[Tensor] = None) -> "ExactSampler":
        check_tensor("weight", weight, dims=(2,), dtypes=FLOAT_DTYPES)
        if bias is not None:
            check_tensor("bias", bias, dims=(1,), dtypes=FLOAT_DTYPES)
            if bias.shape[0] != weight.shape[0] or bias.device != weight.device:
                raise ValueError(f"bias must be [{weight.shape[0]}] on {weight.device} to match weight "
                                 f"{tuple(weight.shape)}, got {tuple(bias.shape)} on {bias.device}")
        super().build(weight, bias)
        self._live = (weight, bias)  # one assignment: a concurrent sample sees one (weight, bias)
        return self

    def _check_query(self, query: Tensor) -> None:
        weight = self._live[0]
        check_tensor("query", query, dims=(2,), dtypes=FLOAT_DTYPES)
        if query.shape[1] != weight.shape[1]:
            raise ValueError(f"query must be [B, {weight.shape[1]}] to match the weight the sampler was built "
                             f"with, got {tuple(query.shape)}")
        if query.device != weight.device:
            raise ValueError(f"query is on {query.device} but the weight is on {weight.device}")

    def _log_p(self, query: Tensor) -> Tensor:
        self._check_query(query)
        weight, bias = self._live
        w = weight.detach()
        b = None if bias is None else bias.detach()
        with no_autocast(query.device):
            logits = F.linear(query.detach().to(torch.float64), w.to(torch.float64),
                              None if b is None else b.to(torch.float64))
        log_p = torch.log_softmax(logits, dim=-1)
        # The softmax reads the live weight (no snapshot to check at build): a NaN / Inf query,
        # weight or bias shows here as NaN, before multinomial fails on it with a message naming none.
        # (A -inf log P, from a -inf bias masking a class, is a valid proposal.)
        if log_p.numel() and bool(torch.isnan(log_p.sum())):
            raise ValueError("ExactSampler: the softmax of query @ weight.T + bias holds NaN: the query, the "
                             "weight or the bias contains NaN or Inf")
        return log_p

    def sample(self, query: Tensor, num_samples: int, generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
        num_samples = self._check_sample_args(query, num_samples, generator)
        self._check_query(query)
        if query.shape[0] * num_samples == 0:  # multinomial refuses to draw 0 samples
            return self._empty_draw(query, num_samples)
        log_p = self._log_p(query)
        ids = torch.multinomial(log_p.exp(), num_samples, replacement=True, generator=generator)
        return ids, log_p.gather(1, ids).to(torch.float32)

    def log_prob(self, query: Tensor, ids: Tensor) -> Tensor:
        self._check_ids(query, ids)
        log_p = self._log_p(query)
        flat = ids.reshape(ids.shape[0], math.prod(ids.shape[1:]))  # -1 is ambiguous when B = 0
        return log_p.gather(1, flat).reshape(ids.shape).to(torch.float32)
