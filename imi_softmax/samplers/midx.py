"""The MIDX proposal: an Inverted Multi-Index over two quantizations of the class vectors."""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .._ops import ops
from .._validation import check_finite, check_positive_int, check_tensor
from ..kmeans import assign, assign_residual, kmeans
from .base import Sampler

QUANTIZERS = ("rq", "pq")


class MIDXSampler(Sampler):
    """Adaptive proposal Q(i|h) proportional to exp(s1[a1(i)] + s2[a2(i)] + beta_i).

    ``quantizer="rq"``: residual quantization, C1 = kmeans(W), C2 = kmeans(W - C1[a1]); both score
    the full query. ``"pq"``: product quantization of the two halves of the dimensions (d even).
    ``beta`` is the bias snapshot taken at build time (0 without bias). Sampling and log_prob are
    exact for that Q (DESIGN.md, "Proposal").

    Args:
        num_codewords: K codewords per codebook, K*K cells.
        quantizer: "rq" or "pq".
        kmeans_iters: Lloyd iterations per rebuild (warm-started from the previous codebooks).
        max_points_per_centroid: k-means is fitted on at most this many classes per codeword.
        seed: seed of the k-means subsampling/initialisation generator.
    """

    def __init__(self, num_codewords: int = 64, quantizer: str = "rq", kmeans_iters: int = 10,
                 max_points_per_centroid: int = 256, seed: int = 0):
        self.num_codewords = check_positive_int("num_codewords", num_codewords)
        if quantizer not in QUANTIZERS:
            raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {quantizer!r}")
        self.quantizer = quantizer
        self.kmeans_iters = check_positive_int("kmeans_iters", kmeans_iters, minimum=0)
        self.max_points_per_centroid = check_positive_int("max_points_per_centroid", max_points_per_centroid)
        self._generator = torch.Generator().manual_seed(seed)
        self.num_classes = None
        self.codebooks: Tuple[Optional[Tensor], Optional[Tensor]] = (None, None)

    # -- index ------------------------------------------------------------------------------
    def build(self, weight: Tensor, bias: Optional[Tensor] = None) -> "MIDXSampler":
        """(Re)build codebooks and cells from weight [N, d] (and bias [N]); warm-starts k-means."""
        check_tensor("weight", weight, dims=(2,))
        n, d = weight.shape
        if n < 1:
            raise ValueError("weight must hold at least one class (got 0 rows)")
        if self.quantizer == "pq" and d % 2 != 0:
            raise ValueError(f"quantizer='pq' splits the dimensions in two halves: in_features must be even, got {d}")
        if bias is not None:
            check_tensor("bias", bias, dims=(1,))
            if bias.shape[0] != n:
                raise ValueError(f"bias must be [{n}] to match weight, got {tuple(bias.shape)}")
        w = weight.detach().to(torch.float32)
        check_finite("weight", w)
        beta = None if bias is None else bias.detach().to(torch.float32).contiguous()
        if beta is not None:
            check_finite("bias", beta)
        k = self.num_codewords
        fit = dict(iters=self.kmeans_iters, max_points_per_centroid=self.max_points_per_centroid,
                   generator=self._generator)
        prev1, prev2 = self.codebooks
        if self.quantizer == "rq":
            c1 = kmeans(w, k, init=prev1, **fit)
            code1, _ = assign(w, c1)
            # the second codebook is fitted on the residuals of a subsample only
            cap = self.max_points_per_centroid * k
            sub = torch.randperm(n, generator=self._generator)[:cap].to(w.device) if n > cap else slice(None)
            c2 = kmeans(w[sub] - c1[code1[sub]], k, init=prev2, **fit)
            code2 = assign_residual(w, c1, code1, c2)
        else:
            h = d // 2
            c1 = kmeans(w[:, :h].contiguous(), k, init=prev1, **fit)
            c2 = kmeans(w[:, h:].contiguous(), k, init=prev2, **fit)
            code1, _ = assign(w[:, :h].contiguous(), c1)
            code2, _ = assign(w[:, h:].contiguous(), c2)
        (self.offsets, self.class_ids, alias_prob, alias_pos, beta_csr, self.log_n, self.cell_mass,
         self.log_n_max) = ops.build_cells(code1, code2, beta, k)
        has_bias = beta is not None
        self.alias_prob = alias_prob if has_bias else None
        self.alias_pos = alias_pos if has_bias else None
        self.beta_csr = beta_csr if has_bias else None
        self.codebooks = (c1, c2)
        self.code1, self.code2, self.beta = code1, code2, beta
        self.num_classes = n
        self.in_features = d
        return self

    @property
    def device(self) -> Optional[torch.device]:
        return None if self.codebooks[0] is None else self.codebooks[0].device

    def cell_counts(self) -> Tensor:
        """Classes per cell, [K, K] int64 (for inspection)."""
        self._require_built()
        return (self.offsets[1:] - self.offsets[:-1]).view(self.num_codewords, self.num_codewords)

    # -- proposal ---------------------------------------------------------------------------
    def scores(self, query: Tensor) -> Tuple[Tensor, Tensor]:
        """Codeword scores s1, s2: [B, K] float32 each."""
        c1, c2 = self.codebooks
        q = query.detach().to(torch.float32)
        if self.quantizer == "rq":
            return q @ c1.T, q @ c2.T
        h = q.shape[1] // 2
        return q[:, :h] @ c1.T, q[:, h:] @ c2.T

    def _check_query(self, query: Tensor) -> None:
        if query.shape[1] != self.in_features:
            raise ValueError(f"query must be [B, {self.in_features}], got {tuple(query.shape)}")
        if query.device != self.device:
            raise ValueError(f"query is on {query.device} but the index is on {self.device}; rebuild or move it")
        check_finite("query", query)

    def sample(self, query: Tensor, num_samples: int, generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
        """Draw num_samples classes per query row: (ids [B, M] int64, log_q [B, M] float32)."""
        self._check_sample_args(query, num_samples)
        self._check_query(query)
        s1, s2 = self.scores(query)
        ids, log_q, _ = ops.midx_sample(s1, s2, self.log_n, self.cell_mass, self.log_n_max, self.offsets,
                                        self.class_ids, self.alias_prob, self.alias_pos, self.beta_csr,
                                        num_samples, generator)
        return ids, log_q

    def log_prob(self, query: Tensor, ids: Tensor) -> Tensor:
        """Exact log Q(ids | query); ids [B, ...] int64 -> float32 of the same shape."""
        self._check_ids(query, ids)
        self._check_query(query)
        s1, s2 = self.scores(query)
        flat = ids.reshape(ids.shape[0], -1)
        out = ops.midx_log_prob(s1, s2, self.log_n, self.cell_mass, self.log_n_max, self.beta,
                                self.code1, self.code2, flat)
        return out.reshape(ids.shape)

    def extra_repr(self) -> str:
        return (f"num_codewords={self.num_codewords}, quantizer={self.quantizer!r}, "
                f"kmeans_iters={self.kmeans_iters}, num_classes={self.num_classes}")
