"""KL refinement of the MIDX codebooks (the MIDX paper's codeword learning).

After k-means, the codebooks C1, C2 are moved by Adam to lower KL(P || Q) on a sample of queries,
with every class's cell (its codes a1, a2) kept. With the cells fixed,

    log Q(i|h) = s1[a1(i)] + s2[a2(i)] + beta_i - log Z(h),
    KL(P||Q)(h) = const(h) - sum_{k1,k2} P_cell[k1,k2](h) (s1[k1] + s2[k2]) + log Z(h),

where P_cell(h) is the exact softmax mass of the cell's classes. P_cell is computed once, exactly,
over class chunks (no [B, N] tensor); every optimisation step then costs O(B K^2 + B K d).

Why the assignment is kept: the objective above is exact only for fixed cells, so each step is a
step on the true KL, and the result is accepted only when it does not increase the KL on its own
sample. Re-assigning each class to its nearest refined codeword would change the cells in a way
the gradient never saw (and could increase the KL). Whatever codebooks come out, the index stays
exact: cells, masses and the within-cell law do not depend on the codebooks, which only enter
through the scores s1, s2 (MIDXIndex with the two codebooks replaced).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["cell_softmax_mass", "refine_codebooks"]

_CHUNK_ELEMENTS = 1 << 22  # rows x classes per chunk of exact logits (32 MiB in float64)


@torch.no_grad()
def cell_softmax_mass(query: Tensor, weight: Tensor, bias: Optional[Tensor], cell: Tensor, num_cells: int,
                      beta: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Exact softmax mass of every cell: (P_cell [B, num_cells] float64, const [B] float64).

    P = softmax(query @ weight.T + bias) over all N classes, summed over the classes of each cell
    (``cell`` [N] int64, the flat cell id of each class). ``const = sum_i P_i (log P_i - beta_i)``
    is the part of KL(P||Q) that does not depend on the codebooks. Two passes over class chunks."""
    n, b = weight.shape[0], query.shape[0]
    chunk = max(1, _CHUNK_ELEMENTS // max(b, 1))
    q = query.to(torch.float64)

    def logits(c0: int, c1: int) -> Tensor:
        o = q @ weight[c0:c1].to(torch.float64).T
        return o if bias is None else o + bias[c0:c1].to(torch.float64)

    lse = torch.full((b,), float("-inf"), dtype=torch.float64, device=query.device)
    for c0 in range(0, n, chunk):
        lse = torch.logaddexp(lse, logits(c0, min(c0 + chunk, n)).logsumexp(1))
    mass = torch.zeros(b, num_cells, dtype=torch.float64, device=query.device)
    const = torch.zeros(b, dtype=torch.float64, device=query.device)
    for c0 in range(0, n, chunk):
        c1 = min(c0 + chunk, n)
        log_p = logits(c0, c1) - lse.unsqueeze(1)
        p = log_p.exp()
        mass.index_add_(1, cell[c0:c1], p)
        if beta is not None:
            log_p = log_p - beta[c0:c1].to(torch.float64)
        const += (p * log_p).sum(1)
    return mass, const


def _split_query(query: Tensor, quantizer: str) -> Tuple[Tensor, Tensor]:
    if quantizer == "rq":
        return query, query
    h = query.shape[1] // 2
    return query[:, :h], query[:, h:]


def _objective(q1: Tensor, q2: Tensor, c1: Tensor, c2: Tensor, m1: Tensor, m2: Tensor,
               mass_scaled: Tensor) -> Tensor:
    """Per query: log Z(h) - sum_cells P_cell (s1 + s2), with log Z through a [B,K]x[K,K] product
    (no [B, K, K] tensor): Z = sum_k1 exp(s1[k1]) sum_k2 n[k1,k2] exp(s2[k2]).
    m1 [B, K], m2 [B, K]: P's marginals over k1 and over k2. mass_scaled = n / max(n)."""
    s1, s2 = q1 @ c1.T, q2 @ c2.T
    top2 = s2.max(1, keepdim=True).values.detach()
    inner = torch.exp(s2 - top2) @ mass_scaled.T           # [B, K1]: sum_k2 n[k1,k2] e^{s2[k2]}
    log_z = torch.logsumexp(s1 + torch.log(inner), 1) + top2.squeeze(1)
    return log_z - (m1 * s1).sum(1) - (m2 * s2).sum(1)


def refine_codebooks(index, quantizer: str, query: Tensor, weight: Tensor, bias: Optional[Tensor], *,
                     steps: int, lr: float) -> Tuple[Tensor, Tensor, Dict[str, float]]:
    """Adam on the mean KL(P||Q) over ``query`` [B, d] for ``steps`` steps, cells of ``index`` kept.

    ``lr`` is relative to the root-mean-square entry of the k-means codebooks (scale free).
    Returns (codebook1, codebook2, stats): the codebooks with the lowest KL seen, float32 (the
    k-means ones when no step improved it), and stats with ``kl_before`` / ``kl_after`` (mean nats
    over the sample, exact in float64 up to P's float64 rounding), ``steps`` and ``improved``."""
    k = index.codebook1.shape[0]
    dev = index.codebook1.device
    cell = index.code1.long() * k + index.code2.long()  # int64 cell ids (the index keeps int32 codes)
    mass, const = cell_softmax_mass(query.detach(), weight.detach(), None if bias is None else bias.detach(),
                                    cell, k * k, index.beta)
    p_cell = mass.view(-1, k, k)
    m1, m2 = p_cell.sum(2), p_cell.sum(1)
    # cell masses n = sum_cell exp(beta) in float64 from the beta snapshot (the index keeps float32 logs)
    if index.beta is None:
        weights, beta_max = torch.ones_like(cell, dtype=torch.float64), 0.0
    else:
        beta = index.beta.to(torch.float64)
        beta_max = float(beta.max())
        weights = torch.exp(beta - beta_max)
    cell_n = torch.zeros(k * k, dtype=torch.float64, device=dev).index_add_(0, cell, weights).view(k, k)
    log_n_max = float(torch.log(cell_n.max())) + beta_max
    mass_scaled = cell_n / cell_n.max()  # log Z gets log_n_max back
    q1, q2 = _split_query(query.detach().to(torch.float64), quantizer)
    c1 = index.codebook1.detach().to(torch.float64).clone().requires_grad_(True)
    c2 = index.codebook2.detach().to(torch.float64).clone().requires_grad_(True)
    scale = float(torch.cat([c1.detach().flatten(), c2.detach().flatten()]).pow(2).mean().sqrt())
    opt = torch.optim.Adam([c1, c2], lr=lr * (scale if scale > 0 else 1.0))

    def kl_of(a: Tensor, b: Tensor) -> Tensor:
        return (_objective(q1, q2, a, b, m1, m2, mass_scaled) + log_n_max + const).mean()

    with torch.enable_grad():
        best = kl_of(c1, c2).detach()
        kl_before = float(best)
        best_c1, best_c2 = c1.detach().clone(), c2.detach().clone()
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = kl_of(c1, c2)
            # the loss of these codebooks: keep the best iterate, so the result never has a higher KL
            if float(loss.detach()) < float(best):
                best, best_c1, best_c2 = loss.detach(), c1.detach().clone(), c2.detach().clone()
            loss.backward()
            opt.step()
        with torch.no_grad():
            last = kl_of(c1, c2)
            if float(last) < float(best):
                best, best_c1, best_c2 = last, c1.detach().clone(), c2.detach().clone()
        # the index stores float32 codebooks: judge the rounded ones, against the k-means KL
        cand1, cand2 = best_c1.to(torch.float32), best_c2.to(torch.float32)
        kl_after = float(kl_of(cand1.to(torch.float64), cand2.to(torch.float64)))
    improved = math.isfinite(kl_after) and kl_after < kl_before
    if not improved:
        cand1, cand2, kl_after = index.codebook1.detach(), index.codebook2.detach(), kl_before
    out1 = cand1.to(device=dev, dtype=torch.float32).contiguous()
    out2 = cand2.to(device=dev, dtype=torch.float32).contiguous()
    return out1, out2, {"kl_before": kl_before, "kl_after": kl_after, "steps": steps, "improved": improved}
