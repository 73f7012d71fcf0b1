"""In-batch negatives with a streaming frequency estimate (Yi et al., RecSys 2019), alone or mixed
with a sampled proposal (Yang et al., WWW 2020's mixed negative sampling)."""
import math
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from .._validation import check_class_ids, check_positive_int, check_tensor
from .base import Sampler
from .mixture import build_components, mix_log_q

# Recompute the running sum of the estimates from scratch this often (float64 drift of the updates)
_RESUM_EVERY = 1024


class InBatchSampler(Sampler):
    r"""In-batch negatives: every row's negatives are the batch's targets, corrected by log Q.

    **Frequency estimate** (Yi et al., "Sampling-bias-corrected neural modeling for large corpus
    item recommendations", RecSys 2019). Each training call with targets is one step t = 1, 2, ...
    For a class j in the step's batch, with A[j] the step it was last seen, the estimated gap
    between its appearances is updated ``B[j] <- (1 - alpha) B[j] + alpha (t - A[j])`` and
    ``A[j] <- t``; a class seen for the first time starts at ``B[j] = t`` (its first gap, counted
    from step 0). ``p_hat(j) = 1 / B[j]`` estimates the probability that j is in a batch; a class
    never seen has ``p_hat = 1 / (t + 1)``. The proposal is the normalized estimate
    ``Q_ib(j) = p_hat(j) / sum_i p_hat(i)``: log Q of every column and target is
    ``log p_hat(j) - log sum_i p_hat(i)``. The constant shift cancels between the target and the
    negatives, so alone this is Yi et al.'s ``s(x, j) - log p_j`` correction. It is an *estimate*
    of the data's law, not a proposal we draw from: the one non-exact log Q of the library.
    The step's own targets update the estimate before it is read.

    **Mixed negative sampling** (``mix_with=sampler``; Yang et al., "Mixed Negative Sampling for
    Learning Two-tower Neural Networks in Recommendations", WWW 2020): a row's negatives are the
    batch's n_ib = B_valid targets plus ``num_samples`` = n_s draws from ``mix_with``. Every
    column j (and the target) is corrected by the balance heuristic of multiple importance
    sampling, ``log(n_ib Q_ib(j) + n_s Q_s(j | h))`` up to a constant, i.e. the log Q of the
    mixture with weights ``w_c = n_c / (n_ib + n_s)``:
    ``log_q(j) = logsumexp(log w_ib + log Q_ib(j), log w_s + log Q_s(j | h))``. The sum over
    columns of exp(o_j) / (n_ib Q_ib(j) + n_s Q_s(j)) is an unbiased estimate of the partition
    function when the in-batch ids follow Q_ib (Veach's balance heuristic), so each source's
    columns need no separate correction.

    The ids returned are just extra sample columns of the fused loss: ``[B, B_valid]`` (the
    batch's valid targets, the same for every row) followed by the ``[B, n_s]`` draws. A row's own
    target is among the in-batch columns: keep ``remove_accidental_hits=True`` (IMISoftmax's
    default) so it is not counted as its own negative.

    Use: ``IMISoftmax(d, N, num_samples=0, sampler=InBatchSampler(N))`` (in-batch alone; the
    batch size sets the number of negatives) or ``IMISoftmax(d, N, num_samples=M,
    sampler=InBatchSampler(N, mix_with=MIDXSampler()))``.

    Args:
        num_classes: N.
        alpha: the estimator's learning rate in (0, 1] (0.01: Yi et al.'s order of magnitude).
        mix_with: an optional Sampler for the sampled part (``num_samples`` draws per row).
    """

    batch_aware = True  # IMISoftmax passes which targets are valid (not ignore_index)

    def __init__(self, num_classes: int, alpha: float = 0.01, mix_with: Optional[Sampler] = None):
        self.num_classes = check_positive_int("num_classes", num_classes)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (0 < alpha <= 1):
            raise ValueError(f"alpha must be a number in (0, 1], got {alpha!r}")
        if mix_with is not None:
            if not isinstance(mix_with, Sampler) or getattr(mix_with, "batch_aware", False):
                raise TypeError(f"mix_with must be a sampled proposal (a Sampler other than InBatchSampler), "
                                f"got {type(mix_with).__name__}")
            if mix_with.num_classes is not None and mix_with.num_classes != num_classes:
                raise ValueError(f"mix_with covers {mix_with.num_classes} classes, this InBatchSampler "
                                 f"{num_classes}: they must cover the same classes")
        self.alpha = float(alpha)
        self.mix_with = mix_with
        self.reset()

    def reset(self) -> None:
        """Forget every observation (step 0, no class seen)."""
        n = self.num_classes
        self.step = 0
        self.last_seen = torch.zeros(n, dtype=torch.int64)   # A: 0 = never seen
        self.gap = torch.zeros(n, dtype=torch.float64)       # B: meaningful where last_seen > 0
        self._seen_sum = 0.0                                  # sum of 1 / B over seen classes
        self._num_seen = 0
        self._mix_counts: Optional[Tuple[int, int]] = None

    # -- estimator ------------------------------------------------------------------------------
    @torch.no_grad()
    def observe(self, ids: Tensor) -> None:
        """One step of the estimator with the batch's class ids (any shape; duplicates count once)."""
        check_tensor("ids", ids)
        check_class_ids("ids", ids, self.num_classes)
        self.step += 1
        t = self.step
        uniq = torch.unique(ids.reshape(-1).to(self.last_seen.device))
        prev = self.last_seen[uniq]
        seen = prev > 0
        old_gap = self.gap[uniq]
        new_gap = torch.where(seen, (1 - self.alpha) * old_gap + self.alpha * (t - prev).to(torch.float64),
                              torch.full_like(old_gap, float(t)))
        self._seen_sum += float((1.0 / new_gap).sum()) - float((1.0 / old_gap[seen]).sum())
        self._num_seen += int((~seen).sum())
        self.gap[uniq] = new_gap
        self.last_seen[uniq] = t
        if t % _RESUM_EVERY == 0:
            self._seen_sum = float((1.0 / self.gap[self.last_seen > 0]).sum())

    def log_p_hat(self, ids: Tensor) -> Tensor:
        """log p_hat(ids): the estimated log-probability that each class is in a batch (float64)."""
        seen = self.last_seen[ids] > 0
        unseen = torch.full(ids.shape, -math.log(self.step + 1), dtype=torch.float64, device=ids.device)
        return torch.where(seen, -self.gap[ids].log(), unseen)

    def log_normalizer(self) -> float:
        """log sum_i p_hat(i) over all classes."""
        return math.log(self._seen_sum + (self.num_classes - self._num_seen) / (self.step + 1))

    def _log_q_ib(self, ids: Tensor) -> Tensor:
        dev = self.last_seen.device
        return (self.log_p_hat(ids.to(dev)) - self.log_normalizer()).to(torch.float32).to(ids.device)

    # -- interface ------------------------------------------------------------------------------
    def build(self, weight: Tensor, bias: Optional[Tensor] = None) -> "InBatchSampler":
        """Builds ``mix_with`` (if any); the estimator itself derives nothing from the weights."""
        super().build(weight, bias)
        if self.mix_with is not None:
            build_components([self.mix_with], weight, bias)
        return self

    @property
    def device(self) -> Optional[torch.device]:
        return None if self.mix_with is None else getattr(self.mix_with, "device", None)

    def to(self, device) -> "InBatchSampler":
        self.last_seen, self.gap = self.last_seen.to(device), self.gap.to(device)
        if self.mix_with is not None:
            self.mix_with = self.mix_with.to(device)
        return self

    def sample(self, query: Tensor, num_samples: int, generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
        raise TypeError("InBatchSampler's negatives are the batch's targets: call sample_with_targets(query, "
                        "num_samples, targets) (IMISoftmax does), not sample(query, num_samples)")

    def _mix_weights(self, n_ib: int, n_s: int):
        total = n_ib + n_s
        return [math.log(n_ib / total) if n_ib else float("-inf"), math.log(n_s / total) if n_s else float("-inf")]

    def log_prob(self, query: Tensor, ids: Tensor) -> Tensor:
        """log Q(ids) of the estimate (alone), or of the mixture with the counts (n_ib, n_s) of the
        last batch drawn (with ``mix_with``); ids [B, ...] int64 -> float32 of the same shape."""
        self._check_ids(query, ids)
        lq_ib = self._log_q_ib(ids)
        if self.mix_with is None:
            return lq_ib
        if self._mix_counts is None:
            raise RuntimeError("the mixed in-batch proposal's weights depend on the batch: draw a batch with "
                               "sample_with_targets first (log_prob uses the last batch's counts)")
        return self._mix(lq_ib, self.mix_with.log_prob(query, ids), *self._mix_counts)

    def _mix(self, lq_ib: Tensor, lq_s: Tensor, n_ib: int, n_s: int) -> Tensor:
        lw_ib, lw_s = self._mix_weights(n_ib, n_s)
        if n_s == 0:
            return lq_ib
        if n_ib == 0:
            return lq_s.to(torch.float32)
        return mix_log_q([lw_ib, lw_s], [lq_ib, lq_s])

    def sample_with_targets(self, query: Tensor, num_samples: int, targets: Optional[Tensor],
                            generator: Optional[torch.Generator] = None,
                            valid: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """One training step: observes the batch's valid targets, then returns
        (ids [B, B_valid + M], log_q of the same shape, target_log_q [B, L]).

        targets: [B, L] int64 class ids (required: they are the negatives).
        valid: optional bool mask of targets' shape (or [B]) of the targets that count (IMISoftmax
            passes ``target != ignore_index``; the masked ones hold a placeholder id).
        num_samples: the draws from ``mix_with`` per row (must be 0 without it).
        """
        self._require_built()
        check_tensor("query", query, dims=(2,))
        num_samples = check_positive_int("num_samples", num_samples, minimum=0)
        if targets is None:
            raise TypeError("InBatchSampler needs the batch's targets: sample_with_targets(query, num_samples, "
                            "targets [B, L])")
        self._check_ids(query, targets)
        if targets.dim() != 2:
            raise ValueError(f"targets must be [B, L], got {tuple(targets.shape)}")
        if self.mix_with is None and num_samples != 0:
            raise ValueError(f"InBatchSampler without mix_with draws no sampled negatives, but num_samples="
                             f"{num_samples}: use num_samples=0 (IMISoftmax(..., num_samples=0)), the batch's "
                             "targets being the negatives, or give mix_with=MIDXSampler() for num_samples draws")
        b = query.shape[0]
        batch_ids = targets.reshape(-1)
        if valid is not None:
            check_tensor("valid", valid, dtypes=(torch.bool,))
            if valid.numel() != batch_ids.numel():
                raise ValueError(f"valid must have one entry per target ({batch_ids.numel()}), got {tuple(valid.shape)}")
            batch_ids = batch_ids[valid.reshape(-1).to(batch_ids.device)]
        if batch_ids.numel() > 0:
            self.observe(batch_ids)
        n_ib = batch_ids.numel()
        inb = batch_ids.unsqueeze(0).expand(b, n_ib)
        scored = torch.cat([inb, targets], dim=1)
        lq_ib = self._log_q_ib(scored)
        if self.mix_with is None:
            self._mix_counts = None
            return inb.contiguous(), lq_ib[:, :n_ib].contiguous(), lq_ib[:, n_ib:].contiguous()
        drawn, _ = self.mix_with.sample(query, num_samples, generator=generator)
        ids = torch.cat([inb, drawn], dim=1)
        scored = torch.cat([ids, targets], dim=1)
        lq_ib = torch.cat([lq_ib[:, :n_ib], self._log_q_ib(drawn), lq_ib[:, n_ib:]], dim=1)
        self._mix_counts = (n_ib, num_samples)
        log_q = self._mix(lq_ib, self.mix_with.log_prob(query, scored), n_ib, num_samples)
        m = ids.shape[1]
        return ids, log_q[:, :m].contiguous(), log_q[:, m:].contiguous()

    # -- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """The estimator (step, last-seen steps, gaps) and ``mix_with``'s state."""
        return {"num_classes": self.num_classes, "alpha": self.alpha, "step": self.step,
                "last_seen": self.last_seen, "gap": self.gap,
                "mix_with": None if self.mix_with is None else self.mix_with.state_dict()}

    def load_state_dict(self, state: Dict[str, Any], device=None) -> bool:
        if int(state["num_classes"]) != self.num_classes:
            raise ValueError(f"InBatchSampler state covers {state['num_classes']} classes, this one {self.num_classes}")
        if (state["mix_with"] is None) != (self.mix_with is None):
            raise ValueError("InBatchSampler state was saved " + ("without" if state["mix_with"] is None else "with")
                             + " mix_with; construct the sampler the same way")
        self.alpha, self.step = float(state["alpha"]), int(state["step"])
        dev = device if device is not None else self.last_seen.device
        self.last_seen, self.gap = state["last_seen"].to(dev), state["gap"].to(dev)
        seen = self.last_seen > 0
        self._seen_sum, self._num_seen = float((1.0 / self.gap[seen]).sum()), int(seen.sum())
        self._mix_counts = None
        ready = True
        if self.mix_with is not None:
            ready = bool(self.mix_with.load_state_dict(state["mix_with"], device=device)) or self.mix_with.is_built
        return ready

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, alpha={self.alpha}, step={self.step}, mix_with={self.mix_with!r}"
