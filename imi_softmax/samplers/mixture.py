"""A mixture of proposals with the exact log-probability of the mixture."""
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .._validation import check_positive_int, check_tensor
from .base import Sampler

# Weights must sum to 1 within this (float64 sums of a few user-written decimals)
_WEIGHT_SUM_TOL = 1e-6


def mix_log_q(log_weights: Sequence[float], log_qs: Sequence[Tensor]) -> Tensor:
    """log sum_c w_c Q_c(i): logsumexp over the components of log w_c + log Q_c(i) (same shapes).
    -inf entries (a component that cannot draw i) add nothing; float32 like every log Q."""
    terms = torch.stack([lq.to(torch.float32) + lw for lw, lq in zip(log_weights, log_qs)], dim=0)
    return torch.logsumexp(terms, dim=0)


def has_full_support(sampler: Sampler) -> bool:
    """Whether every class has Q > 0 under ``sampler`` (TopCellsSampler does not)."""
    return getattr(sampler, "full_support", True)


def build_components(samplers: Sequence[Sampler], weight: Tensor, bias: Optional[Tensor]) -> None:
    """Builds each distinct sampler once: a TopCellsSampler that wraps an MIDX sampler also listed
    builds nothing itself (its index is the listed sampler's)."""
    built = set()

    def build_one(s: Sampler) -> None:
        inner = getattr(s, "midx", None)
        if inner is not None:  # TopCellsSampler: its index is its MIDX sampler's
            build_one(inner)
            return
        if id(s) not in built:
            s.build(weight, bias)
            built.add(id(s))

    for s in samplers:
        build_one(s)


class MixtureSampler(Sampler):
    r"""Q_mix(i | h) = sum_c w_c Q_c(i | h) over component samplers with weights w_c > 0, sum 1.

    Each of the M draws of a row picks its component c with probability w_c (a categorical draw
    from ``generator``), then draws from Q_c; the returned log Q of every drawn id and of every
    target is ``logsumexp_c(log w_c + log Q_c(i | h))``: every component scores every id, not only
    the one that drew it, so the correction is exact for the mixture actually sampled.

    Example: ``MixtureSampler([(midx, 0.8), (unigram, 0.1), (uniform, 0.1)])``, or hard negatives
    ``MixtureSampler([(midx, 0.9), (TopCellsSampler(midx, budget=512), 0.1)])`` (one index, built
    once). Usable as ``IMISoftmax(..., sampler=MixtureSampler(...))``: the head's refreshes call
    :meth:`build`, which builds every component that derives from the weights (each distinct
    sampler once).

    Args:
        components: sequence of ``(sampler, weight)``; weights finite, > 0, summing to 1.
            At least one component must give every class a positive probability (a
            TopCellsSampler alone would give log Q = -inf to most targets).

    Shapes: query [B, d]; ``sample`` -> ids [B, M] int64, log_q [B, M] float32; ``log_prob(query,
    ids [B, ...])`` -> float32 of ids' shape.
    """

    def __init__(self, components: Sequence[Tuple[Sampler, float]]):
        if isinstance(components, (str, bytes)) or not hasattr(components, "__iter__"):
            raise TypeError(f"components must be a sequence of (sampler, weight) pairs, got {type(components).__name__}")
        components = list(components)
        if not components:
            raise ValueError("components must hold at least one (sampler, weight) pair, got none")
        samplers: List[Sampler] = []
        weights: List[float] = []
        for i, pair in enumerate(components):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise TypeError(f"components[{i}] must be a (sampler, weight) pair, got {pair!r}")
            s, w = pair
            if not isinstance(s, Sampler):
                raise TypeError(f"components[{i}][0] must be an imi_softmax Sampler, got {type(s).__name__}")
            if getattr(s, "batch_aware", False):
                raise TypeError(f"components[{i}] is an InBatchSampler: its negatives are the batch's targets, "
                                "not independent draws; mix it with a sampled proposal through "
                                "InBatchSampler(num_classes, mix_with=sampler) instead")
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
                raise ValueError(f"components[{i}] has weight {w!r}: every weight must be a finite number > 0 "
                                 "(drop a component instead of giving it weight 0)")
            samplers.append(s)
            weights.append(float(w))
        total = math.fsum(weights)
        if abs(total - 1.0) > _WEIGHT_SUM_TOL:
            raise ValueError(f"mixture weights must sum to 1, got {weights} (sum {total!r}); "
                             f"divide them by their sum, e.g. {[round(w / total, 6) for w in weights]}")
        if not any(has_full_support(s) for s in samplers):
            raise ValueError("no component gives every class a positive probability (TopCellsSampler draws only "
                             "from its top cells): add a full-support component, e.g. the MIDX sampler itself")
        self.samplers = samplers
        self.weights = weights
        self._log_w = [math.log(w) for w in weights]
        self._probs = torch.tensor(weights, dtype=torch.float64)
        self._check_num_classes()

    # -- consistency ----------------------------------------------------------------------------
    def _check_num_classes(self) -> Optional[int]:
        """The components' common num_classes (None while none is built); a clear error when two
        built components disagree."""
        seen = [(i, s.num_classes) for i, s in enumerate(self.samplers) if s.num_classes is not None]
        for i, n in seen[1:]:
            if n != seen[0][1]:
                raise ValueError(f"mixture components disagree on num_classes: components[{seen[0][0]}] "
                                 f"({type(self.samplers[seen[0][0]]).__name__}) has {seen[0][1]}, components[{i}] "
                                 f"({type(self.samplers[i]).__name__}) has {n}; every component must cover the "
                                 "same classes")
        return seen[0][1] if seen else None

    @property
    def num_classes(self) -> Optional[int]:
        if any(s.num_classes is None for s in self.samplers):
            return None
        return self._check_num_classes()

    @num_classes.setter
    def num_classes(self, value) -> None:  # Sampler.build assigns it; the components own it
        pass

    @property
    def device(self) -> Optional[torch.device]:
        for s in self.samplers:
            dev = getattr(s, "device", None)
            if dev is not None:
                return dev
        return None

    def build(self, weight: Tensor, bias: Optional[Tensor] = None) -> "MixtureSampler":
        """Builds every component that derives from the class vectors (each distinct one once),
        then checks that all components cover weight's classes."""
        check_tensor("weight", weight, dims=(2,))
        build_components(self.samplers, weight, bias)
        n = self._check_num_classes()
        if n != weight.shape[0]:
            raise ValueError(f"mixture components cover {n} classes but weight has {weight.shape[0]} rows")
        return self

    def to(self, device) -> "MixtureSampler":
        self.samplers = [s.to(device) for s in self.samplers]
        return self

    # -- proposal -------------------------------------------------------------------------------
    def _require_all_built(self) -> int:
        for i, s in enumerate(self.samplers):
            if s.num_classes is None:
                raise RuntimeError(f"mixture components[{i}] ({type(s).__name__}) has no index yet: call "
                                   "build(weight, bias) on the MixtureSampler first")
        return self._check_num_classes()

    def log_prob(self, query: Tensor, ids: Tensor) -> Tensor:
        """Exact log Q_mix(ids | query); ids [B, ...] int64 -> float32 of the same shape."""
        self._require_all_built()
        self._check_ids(query, ids)
        return mix_log_q(self._log_w, [s.log_prob(query, ids) for s in self.samplers])

    def sample(self, query: Tensor, num_samples: int, generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
        ids, log_q, _ = self.sample_with_targets(query, num_samples, None, generator)
        return ids, log_q

    def sample_with_targets(self, query: Tensor, num_samples: int, targets: Optional[Tensor],
                            generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """(ids [B, M], log_q [B, M], target_log_q [B, L]) with log Q of the mixture for both."""
        n = self._require_all_built()
        check_tensor("query", query, dims=(2,))
        num_samples = check_positive_int("num_samples", num_samples, minimum=0)
        if targets is not None:
            self._check_ids(query, targets)
            if targets.dim() != 2:
                raise ValueError(f"targets must be [B, L], got {tuple(targets.shape)}")
        b, m = query.shape[0], num_samples
        ids = self._draw(query, m, generator, n)
        scored = ids if targets is None else torch.cat([ids, targets.to(ids.device)], dim=1)
        log_q = mix_log_q(self._log_w, [s.log_prob(query, scored) for s in self.samplers])
        if targets is None:
            return ids, log_q, log_q.new_empty((b, 0))
        return ids, log_q[:, :m].contiguous(), log_q[:, m:].contiguous()

    def _draw(self, query: Tensor, m: int, generator: Optional[torch.Generator], n: int) -> Tensor:
        """[B, M] ids: each position's component is a categorical draw by weight; component c draws
        as many ids per row as the row's busiest position count needs, and position j of row b that
        chose c takes c's r-th draw of that row, r = how many earlier positions of the row chose c.
        The draws of c are iid from Q_c and independent of the choices: each position is Q_mix."""
        b = query.shape[0]
        device = query.device
        if b * m == 0:
            return torch.empty((b, m), dtype=torch.int64, device=device)
        gen_device = generator.device if generator is not None else device
        choice = torch.multinomial(self._probs.to(gen_device), b * m, replacement=True,
                                   generator=generator).view(b, m).to(device)
        ids = torch.zeros((b, m), dtype=torch.int64, device=device)
        for c, s in enumerate(self.samplers):  # a loop over the few components, not over samples
            mine = choice == c
            rank = torch.cumsum(mine, dim=1) - 1
            need = int(rank.max()) + 1 if bool(mine.any()) else 0
            if need == 0:
                continue
            drawn, _ = s.sample(query, need, generator=generator)
            picked = drawn.gather(1, rank.clamp_min(0))
            ids = torch.where(mine, picked, ids)
        return ids

    # -- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """The weights and each component's state; a TopCellsSampler whose MIDX sampler is also a
        component stores only that component's position (its index is saved once)."""
        pos = {id(s): i for i, s in enumerate(self.samplers)}
        states = []
        for s in self.samplers:
            inner = getattr(s, "midx", None)
            if inner is not None and id(inner) in pos:
                states.append({"shared_midx": pos[id(inner)], "extra": s.own_state_dict()})
            else:
                states.append(s.state_dict())
        return {"weights": list(self.weights), "components": states}

    def load_state_dict(self, state: Dict[str, Any], device=None) -> bool:
        weights, states = state.get("weights"), state.get("components")
        if states is None or len(states) != len(self.samplers):
            raise ValueError(f"mixture state holds {0 if states is None else len(states)} components, this "
                             f"MixtureSampler has {len(self.samplers)}: construct it with the same components")
        if weights is None or any(abs(a - b) > 1e-12 for a, b in zip(weights, self.weights)):
            raise ValueError(f"mixture state was saved with weights {weights}, this sampler has {self.weights}")
        ready = []
        for s, st in zip(self.samplers, states):
            if isinstance(st, dict) and "shared_midx" in st:
                s.load_own_state_dict(st["extra"])
                continue
            # a sampler with nothing derived to restore (uniform) is ready once constructed
            ready.append(bool(s.load_state_dict(st, device=device)) or s.is_built)
        for s, st in zip(self.samplers, states):  # after their MIDX sampler is restored
            if isinstance(st, dict) and "shared_midx" in st:
                ready.append(s.midx.is_built)
        return all(ready)

    def extra_repr(self) -> str:
        parts = ", ".join(f"({s!r}, {w:g})" for s, w in zip(self.samplers, self.weights))
        return f"[{parts}]"
