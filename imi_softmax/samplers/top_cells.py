"""Hard negatives: draws from the classes of the query's top-scoring MIDX cells, with exact log Q."""
import math
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from .._validation import check_positive_int, check_tensor
from .base import Sampler
from .midx import MIDXIndex, MIDXSampler


class TopCellsSampler(Sampler):
    r"""Hard negatives from the query's best cells of an MIDX index.

    For a query h the cells (k1, k2) are ranked by ``s1[k1] + s2[k2]`` (the MIDX codeword scores,
    ties broken by cell number); the selected set S(h) is the smallest prefix of that ranking whose
    cells hold at least ``budget`` classes (every non-empty cell when the index holds fewer).
    Draws are uniform over the classes of S(h), or proportional to ``exp(beta_i)`` when the index
    was built with a bias, so

        log Q(i | h) = beta_i - log sum_{c in S(h)} n[c]   if i's cell is in S(h), else -inf

    (n[c] the cell mass of DESIGN.md, beta = 0 without bias). ``log_prob`` and the draws use the
    same selection, so ``sample`` returns ``log_q == log_prob(query, ids)``.

    Q is zero outside S(h): this proposal is only meaningful as a component of a
    :class:`MixtureSampler` with a full-support proposal (the MIDX sampler itself), e.g.
    ``MixtureSampler([(midx, 0.9), (TopCellsSampler(midx, budget=512), 0.1)])``, so that the
    mixture gives every class Q_mix > 0 and the correction stays finite for every target.

    The selection sorts the [B, K*K] cell scores per query (O(B K^2 log K) per call).

    Args:
        midx: the MIDXSampler whose index (codebooks, cells) is used; building this sampler
            builds that one (a MixtureSampler listing both builds it once).
        budget: the number of classes the selected cells must reach (>= 1).
    """

    full_support = False

    def __init__(self, midx: MIDXSampler, budget: int = 1024):
        if not isinstance(midx, MIDXSampler):
            raise TypeError(f"midx must be an MIDXSampler (the index whose cells are ranked), got {type(midx).__name__}")
        self.midx = midx
        self.budget = check_positive_int("budget", budget)
        # the last selection, reused when the same unmodified query tensor is scored against the
        # same index (a MixtureSampler draws, then scores, with one query): one sort per step
        self._last = None

    @property
    def num_classes(self) -> Optional[int]:
        return self.midx.num_classes

    @property
    def device(self) -> Optional[torch.device]:
        return self.midx.device

    def build(self, weight: Tensor, bias: Optional[Tensor] = None) -> "TopCellsSampler":
        """Builds the wrapped MIDX index from weight [N, d] (and bias [N])."""
        self.midx.build(weight, bias)
        return self

    def to(self, device) -> "TopCellsSampler":
        self.midx = self.midx.to(device)
        return self

    # -- selection ------------------------------------------------------------------------------
    def selection(self, query: Tensor, index: Optional[MIDXIndex] = None) -> Tuple[Tensor, Tensor]:
        """(selected [B, K*K] bool, log_mass [B] float32): the cells S(h) of each query and
        log sum_{c in S(h)} n[c]."""
        selected, log_mass, _, _ = self._selection(query, index)
        return selected, log_mass

    def _selection(self, query: Tensor, index: Optional[MIDXIndex] = None):
        """selection() plus the prefix itself: top [B, L] cell numbers in ranking order and their
        log n [B, L] (-inf past each row's prefix), L the longest prefix of the batch."""
        index = self.midx._require_index() if index is None else index
        self.midx._check_query(index, query)
        last = self._last
        if (last is not None and last[0] is query and last[1] == query._version and last[2] is index
                and last[3] == self.budget):
            return last[4]
        out = self._select(query, index)
        self._last = (query, query._version, index, self.budget, out)
        return out

    def _select(self, query: Tensor, index: MIDXIndex):
        s1, s2 = self.midx.scores(query, index)
        b, k = s1.shape
        cells = (s1.unsqueeze(2) + s2.unsqueeze(1)).reshape(b, k * k)
        counts = index.offsets[1:] - index.offsets[:-1]                                # [K*K]
        order = torch.sort(cells, dim=1, descending=True, stable=True).indices       # [B, K*K]
        sorted_counts = counts[order]
        before = torch.cumsum(sorted_counts, dim=1) - sorted_counts  # classes in the cells ranked above
        take = before < self.budget                                  # a prefix of each row
        selected = torch.zeros_like(order, dtype=torch.bool).scatter_(1, order, take)
        # the prefixes are short (budget classes): the masses and the draws work on them only
        longest = int(take.sum(1).max()) if b > 0 else 0
        top = order[:, :longest]
        top_log_n = index.log_n.reshape(k * k).to(torch.float32)[top].masked_fill(~take[:, :longest], float("-inf"))
        log_mass = torch.logsumexp(top_log_n, dim=1) if longest > 0 else torch.empty(0, device=query.device)
        return selected, log_mass, top, top_log_n

    def _class_log_q(self, index: MIDXIndex, selected: Tensor, log_mass: Tensor, ids: Tensor) -> Tensor:
        """log Q of ids [B, L] given the selection (float32 [B, L])."""
        k = self.midx.num_codewords
        cell = index.code1[ids].long() * k + index.code2[ids].long()  # the index's codes are int32
        inside = selected.gather(1, cell)
        beta = index.beta[ids] if index.beta is not None else torch.zeros(ids.shape, dtype=torch.float32,
                                                                           device=ids.device)
        lq = beta.to(torch.float32) - log_mass.unsqueeze(1)
        return torch.where(inside, lq, torch.full_like(lq, float("-inf")))

    # -- proposal -------------------------------------------------------------------------------
    def log_prob(self, query: Tensor, ids: Tensor) -> Tensor:
        """Exact log Q(ids | query) (-inf outside the selected cells); ids [B, ...] -> float32."""
        index = self.midx._require_index()
        self.midx._check_query(index, query)
        self.midx._check_index_ids("ids", index, query, ids)
        selected, log_mass, _, _ = self._selection(query, index)
        flat = ids.reshape(ids.shape[0], math.prod(ids.shape[1:]))  # -1 is ambiguous when B = 0
        return self._class_log_q(index, selected, log_mass, flat).reshape(ids.shape)

    def sample(self, query: Tensor, num_samples: int, generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
        """num_samples draws per query row from its selected cells: (ids [B, M] int64, log_q [B, M])."""
        index = self.midx._require_index()
        self.midx._check_query(index, query)
        check_positive_int("num_samples", num_samples, minimum=0)
        b, m = query.shape[0], num_samples
        if b * m == 0:
            return self._empty_draw(query, m)
        selected, log_mass, top, top_log_n = self._selection(query, index)
        # cell ~ n[c] over the row's prefix by inverse CDF, shifted by the row's log mass (no
        # underflow to 0); searchsorted(right) never lands on a zero-mass (empty or padding) cell,
        # and the clamp to the last positive cell absorbs a u * total rounded up to total
        w = torch.exp((top_log_n - log_mass.unsqueeze(1)).to(torch.float64))
        cdf = torch.cumsum(w, dim=1)
        last = (torch.arange(w.shape[1], device=w.device) * (w > 0)).amax(1, keepdim=True)
        gen_device = generator.device if generator is not None else query.device
        u_cell = torch.rand((b, m), dtype=torch.float64, generator=generator, device=gen_device).to(query.device)
        slot = torch.minimum(torch.searchsorted(cdf, u_cell * cdf[:, -1:], right=True), last)
        cell = top.gather(1, slot)
        begin = index.offsets[cell]
        size = index.offsets[cell + 1] - begin
        u = torch.rand((b, m), dtype=torch.float64, generator=generator, device=gen_device).to(query.device)
        pos = begin + torch.minimum((u * size).to(torch.int64), size - 1)
        if index.alias_prob is not None:  # within-cell law exp(beta): the cell's alias table
            accept = torch.rand((b, m), dtype=torch.float32, generator=generator, device=gen_device).to(query.device)
            pos = torch.where(accept < index.alias_prob[pos], pos, index.alias_pos[pos].long())
        ids = index.class_ids[pos].long()  # int32 in the index, int64 for users
        return ids, self._class_log_q(index, selected, log_mass, ids)

    # -- checkpoints ------------------------------------------------------------------------
    def own_state_dict(self) -> Dict[str, Any]:
        return {"budget": self.budget}

    def load_own_state_dict(self, state: Dict[str, Any]) -> None:
        if int(state["budget"]) != self.budget:
            raise ValueError(f"TopCellsSampler state was saved with budget={state['budget']}, this one has "
                             f"budget={self.budget}: construct it with the same budget")

    def state_dict(self) -> Dict[str, Any]:
        return {**self.own_state_dict(), "midx": self.midx.state_dict()}

    def load_state_dict(self, state: Dict[str, Any], device=None) -> bool:
        self.load_own_state_dict(state)
        return self.midx.load_state_dict(state["midx"], device=device)

    def extra_repr(self) -> str:
        return f"budget={self.budget}, num_classes={self.num_classes}"
