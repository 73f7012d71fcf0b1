"""Peer implementations the benchmarks compare ``imi_softmax`` against, all in plain PyTorch.

Every training head here has the call shape ``head(x [B, d], target [B]) -> scalar loss`` so the
benchmarks can swap them:

* :class:`FullSoftmax`       -- ``F.cross_entropy(F.linear(x, W, b), y)``.
* :class:`AdaptiveSoftmax`   -- ``nn.AdaptiveLogSoftmaxWithLoss`` with frequency-based cutoffs
  (:func:`cutoffs_by_mass`), classes renumbered by frequency.
* :class:`TFSampledSoftmax`  -- TensorFlow's ``sampled_softmax_loss`` recipe: M negatives shared by
  the whole batch, drawn with replacement from a log-uniform (Zipfian) or unigram sampler, logits
  corrected by ``-log(expected count)``, accidental hits removed.
* :class:`MIDXTorchSampler`  -- a pure-PyTorch port of the MIDX authors' sampler (the sampling speed
  baseline): K x K cell logits per query, ``torch.multinomial`` over cells, uniform class in the cell.
* :func:`cce_loss` / :class:`CutCrossEntropy` -- Cut Cross-Entropy (``cut_cross_entropy``) when
  installed (CUDA only); ``HAVE_CCE`` says whether it is.

:func:`make_head` builds any of them (and the ``imi_softmax`` heads) by name.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

try:  # Cut Cross-Entropy (Apple, 2024): GPU only; absent on the CPU machine.
    from cut_cross_entropy import linear_cross_entropy as _cce_linear_cross_entropy  # type: ignore

    HAVE_CCE = True
except Exception:  # pragma: no cover - depends on the environment
    _cce_linear_cross_entropy = None
    HAVE_CCE = False


def _add_linear_params(module: nn.Module, in_features: int, num_classes: int, bias: bool, device=None,
                       dtype=None) -> None:
    """``module.weight`` [num_classes, in_features] and ``module.bias`` [num_classes] (or None), with
    nn.Linear's initialisation (same as IMISoftmax.reset_parameters)."""
    module.weight = nn.Parameter(torch.empty(num_classes, in_features, device=device, dtype=dtype))
    module.bias = nn.Parameter(torch.empty(num_classes, device=device, dtype=dtype)) if bias else None
    nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5))
    if module.bias is not None:
        bound = 1 / math.sqrt(in_features)
        nn.init.uniform_(module.bias, -bound, bound)


# ------------------------------------------------------------------------------------------------
# 1. Full softmax
# ------------------------------------------------------------------------------------------------
class FullSoftmax(nn.Module):
    """The reference: every logit, ``F.cross_entropy(F.linear(x, W, b), y)``."""

    def __init__(self, in_features: int, num_classes: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        _add_linear_params(self, in_features, num_classes, bias, device, dtype)

    def forward(self, x: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(F.linear(x, self.weight, self.bias), target)


# ------------------------------------------------------------------------------------------------
# 2. Adaptive softmax with frequency-based cutoffs
# ------------------------------------------------------------------------------------------------
def cutoffs_by_mass(counts: Tensor, mass: Sequence[float] = (0.80, 0.15, 0.05)) -> Tuple[list, Tensor]:
    """Cutoffs for ``nn.AdaptiveLogSoftmaxWithLoss`` so that the head and tail clusters hold the
    given fractions of the frequency mass, classes ranked by decreasing count.

    Returns ``(cutoffs, rank)``: ``cutoffs`` is a strictly increasing list with 0 < c < N (one entry
    fewer than ``mass``), and ``rank[class_id]`` is the class's position in the frequency order
    (the renumbering the adaptive softmax needs: frequent classes first).
    """
    counts = counts.detach().to(torch.float64).cpu()
    n = counts.numel()
    if n < len(mass) + 1:
        raise ValueError(f"need at least {len(mass) + 1} classes for {len(mass)} clusters, got {n}")
    order = torch.argsort(counts, descending=True, stable=True)
    rank = torch.empty(n, dtype=torch.int64)
    rank[order] = torch.arange(n)
    cum = counts[order].cumsum(0)
    total = float(cum[-1]) if float(cum[-1]) > 0 else 1.0
    cum = cum / total
    cutoffs, acc, prev = [], 0.0, 0
    for frac in mass[:-1]:
        acc += frac
        c = int(torch.searchsorted(cum, torch.tensor([acc - 1e-12], dtype=torch.float64)).item()) + 1
        # strictly increasing, and leave room for the remaining clusters
        c = max(c, prev + 1)
        c = min(c, n - (len(mass) - 1 - len(cutoffs)))
        cutoffs.append(c)
        prev = c
    return cutoffs, rank


class AdaptiveSoftmax(nn.Module):
    """``nn.AdaptiveLogSoftmaxWithLoss`` (Grave et al. 2017) over frequency-renumbered classes.

    ``counts`` [N] are class frequencies; the cutoffs come from :func:`cutoffs_by_mass`. The module
    takes the original class ids and renumbers them internally.
    """

    def __init__(self, in_features: int, num_classes: int, counts: Tensor,
                 mass: Sequence[float] = (0.80, 0.15, 0.05), div_value: float = 4.0,
                 head_bias: bool = True, device=None, dtype=None):
        super().__init__()
        if counts.numel() != num_classes:
            raise ValueError(f"counts must have {num_classes} entries, got {counts.numel()}")
        cutoffs, rank = cutoffs_by_mass(counts, mass)
        self.cutoffs = cutoffs
        self.register_buffer("rank", rank.to(device), persistent=False)
        self.asm = nn.AdaptiveLogSoftmaxWithLoss(in_features, num_classes, cutoffs, div_value=div_value,
                                                 head_bias=head_bias, device=device, dtype=dtype)

    def forward(self, x: Tensor, target: Tensor) -> Tensor:
        return self.asm(x, self.rank[target]).loss


# ------------------------------------------------------------------------------------------------
# 3. TensorFlow-style sampled softmax (shared negatives)
# ------------------------------------------------------------------------------------------------
class LogUniformSampler:
    """TF's ``log_uniform_candidate_sampler``: P(k) = log((k+2)/(k+1)) / log(N+1), which is
    Zipfian if classes are numbered by decreasing frequency."""

    def __init__(self, num_classes: int, device=None):
        self.num_classes = num_classes
        self.log_range = math.log(num_classes + 1)
        self.device = device

    def sample(self, num_samples: int, generator=None) -> Tensor:
        u = torch.rand(num_samples, generator=generator, device=self.device, dtype=torch.float64)
        ids = (torch.exp(u * self.log_range) - 1).floor().to(torch.int64)
        return ids.clamp_(0, self.num_classes - 1)

    def prob(self, ids: Tensor) -> Tensor:
        k = ids.to(torch.float64)
        return (torch.log1p(1.0 / (k + 1.0)) / self.log_range)


class UnigramTableSampler:
    """Unigram sampler: P(k) proportional to counts[k] ** alpha (with replacement)."""

    def __init__(self, counts: Tensor, alpha: float = 1.0, device=None):
        w = counts.detach().to(torch.float64).clamp_min(1e-12).pow(alpha)
        self.p = (w / w.sum()).to(device)
        self.num_classes = counts.numel()

    def sample(self, num_samples: int, generator=None) -> Tensor:
        return torch.multinomial(self.p.to(torch.float32), num_samples, replacement=True, generator=generator)

    def prob(self, ids: Tensor) -> Tensor:
        return self.p[ids]


class TFSampledSoftmax(nn.Module):
    """``tf.nn.sampled_softmax_loss`` in PyTorch.

    One set of ``num_samples`` negatives per step, shared by every row of the batch, drawn with
    replacement from ``sampler`` ("log_uniform" or "unigram" with ``counts``). Each logit
    (true and sampled) has ``log(expected count)`` subtracted: ``log(M q)`` (``correction="mq"``,
    exact for draws with replacement) or ``log(1 - (1 - q)^M)`` (``correction="unique"``, TF's
    formula for unique draws). Sampled ids equal to the row's target are masked (accidental hits).
    ``sparse_grad`` makes the weight gradient sparse (``F.embedding(sparse=True)``).
    """

    def __init__(self, in_features: int, num_classes: int, num_samples: int = 256, bias: bool = True,
                 sampler: str = "log_uniform", counts: Optional[Tensor] = None, correction: str = "mq",
                 remove_accidental_hits: bool = True, sparse_grad: bool = False, device=None, dtype=None):
        super().__init__()
        _add_linear_params(self, in_features, num_classes, bias, device, dtype)
        self.num_samples = num_samples
        self.num_classes = num_classes
        if sampler == "log_uniform":
            self.sampler = LogUniformSampler(num_classes, device=device)
        elif sampler == "unigram":
            if counts is None:
                raise ValueError("sampler='unigram' needs counts")
            self.sampler = UnigramTableSampler(counts, device=device)
        else:
            raise ValueError(f"sampler must be 'log_uniform' or 'unigram', got {sampler!r}")
        if correction not in ("mq", "unique"):
            raise ValueError(f"correction must be 'mq' or 'unique', got {correction!r}")
        self.correction = correction
        self.remove_accidental_hits = remove_accidental_hits
        self.sparse_grad = sparse_grad

    def _log_expected_count(self, ids: Tensor) -> Tensor:
        q = self.sampler.prob(ids)
        m = self.num_samples
        if self.correction == "mq":
            return torch.log(q * m)
        return torch.log(-torch.expm1(m * torch.log1p(-q)))  # log(1 - (1 - q)^M)

    def _rows(self, ids: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        w = F.embedding(ids, self.weight, sparse=self.sparse_grad)
        b = None
        if self.bias is not None:
            b = F.embedding(ids, self.bias.unsqueeze(1), sparse=self.sparse_grad).squeeze(-1)
        return w, b

    def forward(self, x: Tensor, target: Tensor, generator=None) -> Tensor:
        sampled = self.sampler.sample(self.num_samples, generator=generator)          # [M]
        w_t, b_t = self._rows(target)                                                # [B, d], [B]
        w_s, b_s = self._rows(sampled)                                               # [M, d], [M]
        true_logit = (x * w_t).sum(-1)
        sampled_logit = x @ w_s.T                                                    # [B, M]
        if b_t is not None:
            true_logit = true_logit + b_t
            sampled_logit = sampled_logit + b_s
        true_logit = true_logit - self._log_expected_count(target).to(x.dtype)
        sampled_logit = sampled_logit - self._log_expected_count(sampled).to(x.dtype)
        if self.remove_accidental_hits:
            hits = sampled.unsqueeze(0) == target.unsqueeze(1)
            sampled_logit = sampled_logit.masked_fill(hits, float("-inf"))
        logits = torch.cat([true_logit.unsqueeze(1), sampled_logit], dim=1)
        return F.cross_entropy(logits, torch.zeros_like(target))


# ------------------------------------------------------------------------------------------------
# 4. Pure-PyTorch port of the MIDX sampler (speed baseline for sampling)
# ------------------------------------------------------------------------------------------------
def torch_kmeans(x: Tensor, k: int, iters: int = 10, generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
    """Plain Lloyd k-means in torch (random-row init, empty clusters re-seeded). -> (C [k, d], codes [N])."""
    n = x.shape[0]
    c = x[torch.randperm(n, generator=generator)[:k].to(x.device)].clone()
    x_sq = (x * x).sum(1, keepdim=True)
    codes = None
    for _ in range(max(iters, 1)):
        dist = x_sq - 2 * (x @ c.T) + (c * c).sum(1).unsqueeze(0)
        codes = dist.argmin(1)
        counts = torch.bincount(codes, minlength=k)
        sums = torch.zeros_like(c).index_add_(0, codes, x)
        filled = counts > 0
        c[filled] = sums[filled] / counts[filled].unsqueeze(1).to(x.dtype)
        empty = (~filled).nonzero().flatten()
        if empty.numel():
            c[empty] = x[torch.randint(0, n, (empty.numel(),), generator=generator).to(x.device)]
    dist = x_sq - 2 * (x @ c.T) + (c * c).sum(1).unsqueeze(0)
    return c, dist.argmin(1)


class MIDXTorchSampler:
    """Pure-PyTorch MIDX sampler (uniform within cell), after the MIDX authors' reference code.

    Per query h: ``s1 = h C1^T``, ``s2 = h C2^T`` (rq: full h on both; pq: the two halves), cell
    logits ``s1[:, :, None] + s2[:, None, :] + log n`` over the K x K cells (empty cells -inf),
    softmax over the K*K cells, ``torch.multinomial(probs, M, replacement=True)`` for the cells,
    then a uniform class within each drawn cell via the CSR layout (``offsets + floor(rand * count)``).
    ``log q = log softmax(cell logits)[cell] - log count[cell]``. This is the MIDX proposal of
    DESIGN.md without the bias term (beta = 0).

    ``mode="two_stage"`` samples as the authors' RecStudio code does instead: k1 from its marginal,
    then k2 | k1 with a second ``torch.multinomial`` over [B*M, K] rows (same distribution).

    Build with :meth:`build` (own torch k-means) or :meth:`from_imi` (reuse the codebooks and codes
    of a built ``imi_softmax.MIDXSampler`` so both samplers share the index).
    """

    def __init__(self, num_codewords: int = 64, quantizer: str = "rq", kmeans_iters: int = 10,
                 mode: str = "cells", seed: int = 0):
        if quantizer not in ("rq", "pq"):
            raise ValueError(f"quantizer must be 'rq' or 'pq', got {quantizer!r}")
        if mode not in ("cells", "two_stage"):
            raise ValueError(f"mode must be 'cells' or 'two_stage', got {mode!r}")
        self.K = num_codewords
        self.quantizer = quantizer
        self.kmeans_iters = kmeans_iters
        self.mode = mode
        self._gen = torch.Generator().manual_seed(seed)

    # -- index ---------------------------------------------------------------------------------
    def build(self, weight: Tensor) -> "MIDXTorchSampler":
        w = weight.detach().float()
        k = self.K
        if self.quantizer == "rq":
            c1, a1 = torch_kmeans(w, k, self.kmeans_iters, self._gen)
            c2, a2 = torch_kmeans(w - c1[a1], k, self.kmeans_iters, self._gen)
        else:
            h = w.shape[1] // 2
            c1, a1 = torch_kmeans(w[:, :h].contiguous(), k, self.kmeans_iters, self._gen)
            c2, a2 = torch_kmeans(w[:, h:].contiguous(), k, self.kmeans_iters, self._gen)
        return self.set_index(c1, c2, a1, a2)

    def set_index(self, c1: Tensor, c2: Tensor, code1: Tensor, code2: Tensor) -> "MIDXTorchSampler":
        """Adopt codebooks C1, C2 [K, d'] and codes [N]; builds the CSR cell layout."""
        k = c1.shape[0]
        self.K = k
        self.C1, self.C2 = c1.float(), c2.float()
        self.code1, self.code2 = code1.long(), code2.long()
        cell = self.code1 * k + self.code2
        order = torch.argsort(cell, stable=True)
        self.class_ids = order                                     # classes grouped by cell
        counts = torch.bincount(cell, minlength=k * k)
        self.counts = counts                                       # [K*K]
        self.offsets = torch.zeros(k * k + 1, dtype=torch.int64, device=cell.device)
        self.offsets[1:] = counts.cumsum(0)
        cnt = counts.to(torch.float32).view(k, k)
        self.log_n = torch.where(cnt > 0, cnt.log(), torch.full_like(cnt, float("-inf")))
        self.num_classes = code1.numel()
        return self

    @classmethod
    def from_imi(cls, sampler, mode: str = "cells") -> "MIDXTorchSampler":
        """Same index as a built ``imi_softmax.MIDXSampler`` (its ``codebooks``, ``code1``, ``code2``)."""
        c1, c2 = sampler.codebooks
        if c1 is None:
            raise RuntimeError("the imi_softmax sampler has no index yet: build it first")
        port = cls(c1.shape[0], sampler.quantizer, mode=mode)
        return port.set_index(c1, c2, sampler.code1, sampler.code2)

    # -- proposal ------------------------------------------------------------------------------
    def scores(self, query: Tensor) -> Tuple[Tensor, Tensor]:
        q = query.detach().float()
        if self.quantizer == "rq":
            return q @ self.C1.T, q @ self.C2.T
        h = q.shape[1] // 2
        return q[:, :h] @ self.C1.T, q[:, h:] @ self.C2.T

    def cell_log_probs(self, query: Tensor) -> Tensor:
        """log P(cell | query), [B, K*K]."""
        s1, s2 = self.scores(query)
        logits = s1[:, :, None] + s2[:, None, :] + self.log_n            # [B, K, K]
        return torch.log_softmax(logits.reshape(query.shape[0], -1), dim=-1)

    @torch.no_grad()
    def sample(self, query: Tensor, num_samples: int, generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
        """(ids [B, M] int64, log_q [B, M] float32)."""
        b, k = query.shape[0], self.K
        if self.mode == "cells":
            cell_lp = self.cell_log_probs(query)                            # [B, K*K]
            probs = cell_lp.exp()
            cells = torch.multinomial(probs, num_samples, replacement=True, generator=generator)
            lq_cell = cell_lp.gather(1, cells)
        else:  # the authors' two-stage draw: k1 ~ marginal, then k2 | k1
            s1, s2 = self.scores(query)
            n = self.log_n.exp()                                             # [K, K]
            r1 = torch.softmax(s1, -1)
            r2 = torch.softmax(s2, -1)
            p1 = (r2 @ n.T) * r1                                             # [B, K]
            k1 = torch.multinomial(p1, num_samples, replacement=True, generator=generator)
            p2 = n[k1] * r2.unsqueeze(1)                                     # [B, M, K]
            k2 = torch.multinomial(p2.reshape(-1, k), 1, generator=generator).view(b, num_samples)
            cells = k1 * k + k2
            logits = s1[:, :, None] + s2[:, None, :] + self.log_n
            lq_cell = torch.log_softmax(logits.reshape(b, -1), -1).gather(1, cells)
        cnt = self.counts[cells]
        r = torch.rand(cells.shape, generator=generator, device=query.device)
        within = torch.clamp((r * cnt).floor().to(torch.int64), max=cnt - 1)
        ids = self.class_ids[self.offsets[cells] + within]
        log_q = lq_cell - cnt.to(torch.float32).log()
        return ids, log_q

    @torch.no_grad()
    def log_prob(self, query: Tensor, ids: Tensor) -> Tensor:
        """Exact log Q(ids | query) of this proposal (ids [B, ...])."""
        cell_lp = self.cell_log_probs(query)
        flat = ids.reshape(ids.shape[0], -1)
        cells = self.code1[flat] * self.K + self.code2[flat]
        out = cell_lp.gather(1, cells) - self.counts[cells].to(torch.float32).log()
        return out.reshape(ids.shape)


# ------------------------------------------------------------------------------------------------
# 5. Cut Cross-Entropy (GPU)
# ------------------------------------------------------------------------------------------------
class CutCrossEntropy(nn.Module):
    """``cut_cross_entropy.linear_cross_entropy`` (no logit matrix in memory); CUDA + bf16/fp16."""

    def __init__(self, in_features: int, num_classes: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        if not HAVE_CCE:
            raise RuntimeError("cut_cross_entropy is not installed")
        _add_linear_params(self, in_features, num_classes, bias, device, dtype)

    def forward(self, x: Tensor, target: Tensor) -> Tensor:
        return _cce_linear_cross_entropy(x, self.weight, target, bias=self.bias)


# ------------------------------------------------------------------------------------------------
# Factory
# ------------------------------------------------------------------------------------------------
METHODS = ("imi_dense", "imi_sparse", "full", "adaptive", "tf_sampled", "midx_torch", "cce")


def zipf_counts(num_classes: int, exponent: float = 1.0, total: float = 1e9) -> Tensor:
    """Synthetic class frequencies, Zipfian in the class id (class 0 most frequent)."""
    r = torch.arange(1, num_classes + 1, dtype=torch.float64)
    p = r.pow(-exponent)
    return (p / p.sum() * total)


class MIDXTorchHead(nn.Module):
    """A training head that samples per-query negatives with :class:`MIDXTorchSampler` and computes
    the corrected sampled softmax in plain PyTorch (gather rows, einsum, cross-entropy): what a user
    of the authors' code would run. The index is built once (refresh excluded, as for the IMI head)."""

    def __init__(self, in_features: int, num_classes: int, num_samples: int = 256, num_codewords: int = 64,
                 bias: bool = True, remove_accidental_hits: bool = True, device=None, dtype=None):
        super().__init__()
        _add_linear_params(self, in_features, num_classes, bias, device, dtype)
        self.num_samples = num_samples
        self.remove_accidental_hits = remove_accidental_hits
        self.sampler = MIDXTorchSampler(num_codewords)
        self._built = False

    def refresh_index(self) -> None:
        self.sampler.build(self.weight)
        self._built = True

    def forward(self, x: Tensor, target: Tensor) -> Tensor:
        if not self._built:
            self.refresh_index()
        ids, log_q = self.sampler.sample(x, self.num_samples)
        t_lq = self.sampler.log_prob(x, target.unsqueeze(1))
        all_ids = torch.cat([target.unsqueeze(1), ids], 1)                   # [B, 1+M]
        w = self.weight[all_ids]                                              # [B, 1+M, d]
        logits = torch.einsum("bd,bmd->bm", x, w)
        if self.bias is not None:
            logits = logits + self.bias[all_ids]
        logits = logits - torch.cat([t_lq, log_q], 1).to(logits.dtype)
        if self.remove_accidental_hits:
            hits = torch.cat([torch.zeros_like(target, dtype=torch.bool).unsqueeze(1),
                              ids == target.unsqueeze(1)], 1)
            logits = logits.masked_fill(hits, float("-inf"))
        return F.cross_entropy(logits, torch.zeros_like(target))


def make_head(method: str, in_features: int, num_classes: int, *, num_samples: int = 256,
              num_codewords: int = 64, counts: Optional[Tensor] = None, device=None, dtype=None) -> nn.Module:
    """Build a training head by name (see ``METHODS``). ``counts`` (class frequencies) is needed by
    "adaptive" and used by "tf_sampled" for nothing (log-uniform sampler, classes are assumed to be
    numbered by frequency, which :func:`zipf_counts` data are)."""
    f = dict(device=device, dtype=dtype)
    if method in ("imi_dense", "imi_sparse"):
        import imi_softmax

        return imi_softmax.IMISoftmax(in_features, num_classes, num_samples=num_samples,
                                      num_codewords=num_codewords, refresh_every=0,
                                      sparse_grad=(method == "imi_sparse"), **f)
    if method == "full":
        return FullSoftmax(in_features, num_classes, **f)
    if method == "adaptive":
        if counts is None:
            counts = zipf_counts(num_classes)
        return AdaptiveSoftmax(in_features, num_classes, counts, **f)
    if method == "tf_sampled":
        return TFSampledSoftmax(in_features, num_classes, num_samples=num_samples, **f)
    if method == "midx_torch":
        return MIDXTorchHead(in_features, num_classes, num_samples=num_samples, num_codewords=num_codewords, **f)
    if method == "cce":
        return CutCrossEntropy(in_features, num_classes, **f)
    raise ValueError(f"unknown method {method!r}; one of {METHODS}")


def prepare_head(head: nn.Module) -> None:
    """Build whatever index the head needs, outside the timed region."""
    if hasattr(head, "refresh_index"):
        head.refresh_index()
