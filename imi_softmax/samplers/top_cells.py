"""Hard negatives: draws from the classes of the query's top-scoring MIDX cells, with exact log Q."""
import math
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from .._ops import ops
from .._validation import check_positive_int
from .base import Sampler
from .midx import MIDXIndex, MIDXSampler


class TopCellsSampler(Sampler):
    r"""Hard negatives from the query's best cells of an MIDX index.

    For a query h the cells (k1, k2) are ranked by ``s1[k1] + s2[k2]`` (the MIDX codeword scores;
    ties broken as :meth:`MIDXSampler.search` breaks them: by the codewords' ranks in their own
    lists, score descending then codeword ascending); the selected set S(h) is the smallest prefix
    of that ranking's non-empty cells that holds at least ``budget`` classes (every non-empty cell
    when the index holds fewer).
    Draws are uniform over the classes of S(h), or proportional to ``exp(beta_i)`` when the index
    was built with a bias, so

        log Q(i | h) = beta_i - log sum_{c in S(h)} n[c]   if i's cell is in S(h), else -inf

    (n[c] the cell mass of DESIGN.md, beta = 0 without bias). ``log_prob`` and the draws use the
    same selection, so ``sample`` returns ``log_q == log_prob(query, ids)``.

    Q is zero outside S(h): this proposal is only meaningful as a component of a
    :class:`MixtureSampler` with a full-support proposal (the MIDX sampler itself), e.g.
    ``MixtureSampler([(midx, 0.9), (TopCellsSampler(midx, budget=512), 0.1)])``, so that the
    mixture gives every class Q_mix > 0 and the correction stays finite for every target.

    The selection is the retrieval op's multi-sequence visit (``ops.midx_search_cells``: a heap
    over the two sorted codeword lists), O(K log K + C log K) per query for C visited cells, not a
    sort of all K*K cell scores; a query's selection is computed once and shared by its draws and
    its targets' log Q.

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
        """(selected [B, K*K] bool, log_mass [B] float32): the non-empty cells of S(h) of each query
        and log sum_{c in S(h)} n[c]. The dense mask is built here for inspection only: sampling
        and scoring work on the visited cells."""
        with self.midx._lock:  # the wrapped sampler's in-place update never runs meanwhile
            index = self.midx._require_index() if index is None else index
            top, _, log_mass, top_log_n = self._selection(query, index)
            kk = self.midx.num_codewords ** 2
            # padding goes to an extra column, so it never overwrites a selected cell's flag
            slot = top.masked_fill(top_log_n.isneginf(), kk)
            selected = torch.zeros(top.shape[0], kk + 1, dtype=torch.bool, device=top.device)
            return selected.scatter_(1, slot, True)[:, :kk], log_mass

    def _selection(self, query: Tensor, index: MIDXIndex):
        """(top, sorted_top, log_mass, top_log_n): the visited cells [B, L] in visit order (L the
        longest visit of the batch, shorter rows padded with -1), the same cells sorted ascending per
        row with padding K*K (for membership by binary search), log sum n [B] and log n [B, L] (-inf
        on padding). Cached for the same unmodified query tensor and index (a MixtureSampler draws,
        then scores, with one query: one visit per step)."""
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
        # the retrieval op's multi-sequence visit (csrc/include/imi_softmax/search.h): non-empty cells
        # in decreasing s1 + s2 until the budget is reached, O(K log K + visited) per query instead of
        # a sort of all K*K cells
        cells, _ = ops.midx_search_cells(s1, s2, index.offsets, self.budget)
        valid = cells >= 0                                        # a prefix of each row
        longest = int(valid.sum(1).max()) if b > 0 else 0
        top, take = cells[:, :longest], valid[:, :longest]
        top_log_n = index.log_n.reshape(k * k).to(torch.float32)[top.clamp_min(0)]
        top_log_n = top_log_n.masked_fill(~take, float("-inf"))
        log_mass = (torch.logsumexp(top_log_n, dim=1) if longest > 0
                    else torch.full((b,), float("-inf"), device=query.device))
        sorted_top = torch.sort(top.masked_fill(~take, k * k), dim=1).values
        return top, sorted_top, log_mass, top_log_n

    def _class_log_q(self, index: MIDXIndex, sorted_top: Tensor, log_mass: Tensor, ids: Tensor) -> Tensor:
        """log Q of ids [B, L] given the selection (float32 [B, L]): -inf unless the id's cell is
        among the row's visited cells (binary search in sorted_top [B, C])."""
        k = self.midx.num_codewords
        cell = index.code1[ids].long() * k + index.code2[ids].long()  # the index's codes are int32
        if sorted_top.shape[1] == 0:
            inside = torch.zeros(cell.shape, dtype=torch.bool, device=cell.device)
        else:
            pos = torch.searchsorted(sorted_top, cell).clamp_max(sorted_top.shape[1] - 1)
            inside = sorted_top.gather(1, pos) == cell
        return torch.where(inside, self._inside_log_q(index, log_mass, ids), float("-inf"))

    @staticmethod
    def _inside_log_q(index: MIDXIndex, log_mass: Tensor, ids: Tensor) -> Tensor:
        """beta_i - log mass, the log Q of ids [B, L] known to lie in the selection."""
        if index.beta is None:
            return (-log_mass).unsqueeze(1).expand(ids.shape).contiguous()
        return index.beta[ids].to(torch.float32) - log_mass.unsqueeze(1)

    # -- proposal -------------------------------------------------------------------------------
    def log_prob(self, query: Tensor, ids: Tensor) -> Tensor:
        """Exact log Q(ids | query) (-inf outside the selected cells); ids [B, ...] -> float32."""
        with self.midx._lock:  # the wrapped sampler's in-place update never runs meanwhile
            index = self.midx._require_index()
            self.midx._check_query(index, query)
            self.midx._check_index_ids("ids", index, query, ids)
            _, sorted_top, log_mass, _ = self._selection(query, index)
            flat = ids.reshape(ids.shape[0], math.prod(ids.shape[1:]))  # -1 is ambiguous when B = 0
            return self._class_log_q(index, sorted_top, log_mass, flat).reshape(ids.shape)

    def sample(self, query: Tensor, num_samples: int, generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
        """num_samples draws per query row from its selected cells: (ids [B, M] int64, log_q [B, M])."""
        with self.midx._lock:  # the wrapped sampler's in-place update never runs meanwhile
            index = self.midx._require_index()
            self.midx._check_query(index, query)
            num_samples = check_positive_int("num_samples", num_samples, minimum=0)
            b, m = query.shape[0], num_samples
            if b * m == 0:
                return self._empty_draw(query, m)
            top, _, log_mass, top_log_n = self._selection(query, index)
            # cell ~ n[c] over the row's visited cells by inverse CDF, shifted by the row's log mass (no
            # underflow to 0); searchsorted(right) never lands on a zero-mass (padding) slot, and the
            # clamp to the last positive slot absorbs a u * total rounded up to total
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
            # every draw lies in a visited cell: the same expression log_prob gives it, without the search
            return ids, self._inside_log_q(index, log_mass, ids)

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
