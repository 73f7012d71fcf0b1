"""How good is the head's proposal on a probe batch? (``imi_softmax.diagnose``)

Compares the proposal Q the head samples from with the softmax P it approximates, exactly over all
classes (in class chunks, float64), and runs a few sampled-loss draws against the exact loss.
"""
from __future__ import annotations

import math
import time
from typing import Any, Dict, Optional

import torch
from torch import Tensor

from ._validation import check_finite, check_positive_int
from .functional import sampled_softmax_loss
from .samplers.base import no_autocast

__all__ = ["diagnose", "DiagnoseReport", "proposal_divergence"]

DEFAULT_CHUNK = 16384


class DiagnoseReport(dict):
    """The result of :func:`diagnose`: a plain dict (floats and per-row float64 tensors) with a
    readable ``repr``. Keys are listed in :func:`diagnose`'s docstring."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __repr__(self) -> str:
        r = self
        return "\n".join([
            f"DiagnoseReport(sampler={r['sampler']}, rows={r['num_rows']}, classes={r['num_classes']}, "
            f"M={r['num_samples']}, draws={r['num_draws']}{', index STALE' if r['index_stale'] else ''})",
            f"  KL(P||Q)         mean {r['kl']:.4f} nats  (median {r['kl_median']:.4f}, max {r['kl_max']:.4f})",
            f"  ESS / M          mean {r['ess_fraction']:.4f}  (ESS {r['ess']:.1f} of {r['num_samples']}; "
            f"limit for M -> inf: {r['ess_fraction_limit']:.4f})",
            f"  sampled loss     exact {r['loss_exact']:.4f}, relative bias {100 * r['loss_bias']:+.2f}%, "
            f"relative std {100 * r['loss_std']:.2f}%  (raw sampled loss {r['loss_sampled']:.4f})",
            f"  grad cosine (x)  per row {r['grad_cosine']:.4f}, whole batch {r['grad_cosine_batch']:.4f}  "
            f"(relative error {r['grad_rel_error']:.4f})",
            f"  took {r['seconds']:.2f} s",
        ])


def _check_head(head) -> None:
    for attr in ("weight", "bias", "sampler", "ignore_index", "remove_accidental_hits", "_check_input"):
        if not hasattr(head, attr):
            raise TypeError(f"head must be an imi_softmax.IMISoftmax (it has no {attr!r}), got {type(head).__name__}")
    if not head.sampler.is_built:
        raise RuntimeError(f"the head's sampler {head.sampler!r} has no index yet: call head.refresh_index() "
                           f"(or run one training step) before diagnose; diagnose never builds or refreshes it")
    sdev = getattr(head.sampler, "device", None)
    if sdev is not None and sdev != head.weight.device:
        raise RuntimeError(f"the head's index is on {sdev} but its weight is on {head.weight.device}: call "
                           f"head.refresh_index() first (diagnose does not move or rebuild it)")


@torch.no_grad()
def _exact_pass(sampler, weight: Tensor, bias: Optional[Tensor], xq: Tensor, t: Optional[Tensor],
                chunk: int) -> Dict[str, Tensor]:
    """Two passes over class chunks: P's logsumexp, then KL(P||Q), sum_i P_i^2/Q_i, log Q's total
    mass and (given targets t) the exact gradient sum_i P_i w_i - w_y. Peak extra memory O(B * chunk)."""
    W, b = weight.detach(), None if bias is None else bias.detach()
    n, B = W.shape[0], xq.shape[0]
    xd = xq.double()
    neg_inf = torch.full((B,), float("-inf"), dtype=torch.float64, device=xq.device)

    def logits(c0: int, c1: int) -> Tensor:
        o = xd @ W[c0:c1].double().T
        return o if b is None else o + b[c0:c1].double()

    lse = neg_inf.clone()
    for c0 in range(0, n, chunk):
        lse = torch.logaddexp(lse, logits(c0, min(c0 + chunk, n)).logsumexp(1))
    kl = torch.zeros(B, dtype=torch.float64, device=xq.device)
    chi = neg_inf.clone()       # log sum_i P_i^2 / Q_i
    q_mass = neg_inf.clone()    # log sum_i Q_i (0 for a normalized proposal)
    g = torch.zeros(B, W.shape[1], dtype=torch.float64, device=xq.device) if t is not None else None
    for c0 in range(0, n, chunk):
        c1 = min(c0 + chunk, n)
        log_p = logits(c0, c1) - lse.unsqueeze(1)
        ids = torch.arange(c0, c1, device=xq.device).expand(B, c1 - c0).contiguous()
        log_q = sampler.log_prob(xq, ids).double()
        p = log_p.exp()
        log_ratio = log_p - log_q
        # P_i = 0 contributes 0 to KL even where log Q_i = -inf
        kl += torch.where(p > 0, p * log_ratio, 0.0).sum(1)
        chi = torch.logaddexp(chi, (log_p + log_ratio).logsumexp(1))
        q_mass = torch.logaddexp(q_mass, log_q.logsumexp(1))
        if g is not None:
            g += p @ W[c0:c1].double()
    out = dict(lse=lse, kl=kl, ess_limit=torch.exp(-chi), q_mass=q_mass)
    if t is not None:
        out["o_y"] = (xd * W[t].double()).sum(1) + (0.0 if b is None else b[t].double())
        out["grad"] = g - W[t].double()
    return out


def proposal_divergence(sampler, weight: Tensor, bias: Optional[Tensor], query: Tensor, *,
                        chunk_size: Optional[int] = None) -> Dict[str, Tensor]:
    """The exact, target-free part of :func:`diagnose` for any built sampler and class vectors:
    per query row, ``kl`` [B] = KL(P || Q) with P = softmax(query @ weight.T + bias), ``ess_fraction_limit``
    [B] = 1 / sum_i P_i^2 / Q_i, and ``log_q_mass`` [B] = log sum_i Q_i (0 for a normalized Q); float64.
    query [B, d], weight [N, d], bias [N] or None. Cost: two passes of O(B * N * d) over class chunks."""
    from ._validation import check_tensor

    check_tensor("query", query, dims=(2,))
    check_tensor("weight", weight, dims=(2,))
    if query.shape[1] != weight.shape[1]:
        raise ValueError(f"query must be [B, {weight.shape[1]}] to match weight [N, d], got {tuple(query.shape)}")
    if not sampler.is_built or sampler.num_classes != weight.shape[0]:
        raise ValueError(f"sampler {sampler!r} must be built over the {weight.shape[0]} classes of weight")
    check_finite("query", query)
    chunk = DEFAULT_CHUNK if chunk_size is None else check_positive_int("chunk_size", chunk_size)
    ex = _exact_pass(sampler, weight, bias, query.detach(), None, chunk)
    return dict(kl=ex["kl"], ess_fraction_limit=ex["ess_limit"], log_q_mass=ex["q_mass"])


def diagnose(head, x: Tensor, target: Tensor, *, num_draws: int = 8, num_samples: Optional[int] = None,
             chunk_size: Optional[int] = None, generator: Optional[torch.Generator] = None) -> DiagnoseReport:
    """Measures, on a probe batch, how well the head's proposal Q approximates the softmax P and
    what that does to the sampled loss and its gradient.

    Args:
        head: an :class:`~imi_softmax.IMISoftmax` whose sampler is built (``head.refresh_index()``);
            any sampler ("midx", "uniform", "unigram", "exact" or a custom :class:`Sampler`).
        x: ``[*, in_features]`` queries, on the head's device and in its dtype.
        target: ``[*]`` int64 class ids (one label per row); rows equal to ``head.ignore_index`` are left out.
        num_draws: independent draws of M samples (>= 2: the loss spread needs two).
        num_samples: M per draw (default ``head.num_samples``).
        chunk_size: classes per exact chunk (default 16384): the exact parts hold O(B * chunk) floats.
        generator: the draws' generator (on the head's device); default a fresh one seeded 0, so the
            report is reproducible and the global RNG is untouched.

    Returns a :class:`DiagnoseReport` (a dict; floats unless marked [B], per-row float64 tensors):
        ``kl``, ``kl_median``, ``kl_max``, ``kl_rows`` [B]: KL(P || Q) = sum_i P_i (log P_i - log Q_i)
            in nats, exact over all classes. 0 iff Q = P.
        ``ess``, ``ess_rows`` [B]: effective sample size of the importance weights of one draw,
            ``(sum_j w_j)^2 / sum_j w_j^2`` with ``w_j = exp(o_j - log Q_j)`` over the M drawn ids
            (accidental hits included: these weights estimate Z), mean over draws;
            ``ess_fraction``, ``ess_fraction_rows`` [B]: ESS / M;
            ``ess_fraction_limit``, ``ess_fraction_limit_rows`` [B]: its M -> inf limit
            ``1 / sum_i P_i^2 / Q_i`` (exact; 1 iff Q = P).
        ``loss_exact``: mean exact cross-entropy ``logsumexp(o) - o_y``.
        ``loss_sampled``: mean of the head's sampled loss (what training prints), over rows and draws.
            It is not on the exact loss's scale: ``logsumexp(u) ~ log(M Z)`` and ``u_0`` carries
            ``-log Q(y)``. So the bias is measured on the shifted loss ``sampled - log M - log Q(y|h)``
            (a per-row constant: same gradient), which tends to the exact loss as M grows when Q is
            good, plus log((M + 1 - hits) / M)-type terms from accidental-hit removal.
        ``loss_estimate``: mean of that shifted loss; ``loss_bias``: (loss_estimate - loss_exact) /
            |loss_exact|; ``loss_std``: std over draws of the batch-mean loss / |loss_exact| (the
            shift does not change it).
        ``grad_cosine``, ``grad_cosine_rows`` [B]: cosine between the sampled and the exact gradient
            of each row's loss w.r.t. its x row, mean over draws (and rows);
            ``grad_cosine_batch``: cosine of the whole [B, d] gradients, mean over draws;
            ``grad_rel_error``: ``||g_s - g|| / ||g||`` per row, mean over rows and draws.
        ``log_q_mass_err``: max over rows of ``|log sum_i Q_i|`` (0 up to rounding for an exact Q).
        ``index_stale``: the head will rebuild its index before its next training step (the report
            describes the current index), ``seconds``, ``num_rows``, ``num_classes``, ``num_samples``,
            ``num_draws``, ``sampler``.

    Cost: two exact passes over class chunks, each O(B * N * d) float64 multiply-adds plus the
    sampler's ``log_prob`` over all B * N (row, class) pairs (O(B * N) gathers for MIDX, uniform and
    unigram; ``ExactSampler.log_prob`` recomputes [B, N] logits per chunk, so it costs N / chunk
    times more), then ``num_draws`` sampled steps (draw + fused loss + backward w.r.t. x), about
    ``num_draws`` training steps of the head. Measured with bench/diagnose_cost.py (d = 64, B = 256,
    MIDX K = 64, M = 256, 8 draws) on a quiet 2-core AMD EPYC, 2 threads: 2.0 s at N = 100k (131
    training steps of the same head) and 22 s at N = 1M (55 steps). Extra memory: O(B * (chunk + d + M)).

    The head is left as it was: no index refresh or move, no change to its training-call counter,
    no gradient on its parameters (they are used detached), its train/eval mode unchanged.
    """
    t_start = time.perf_counter()
    _check_head(head)
    num_draws = check_positive_int("num_draws", num_draws, minimum=2)
    m = head.num_samples if num_samples is None else num_samples
    m = check_positive_int("num_samples", m)
    chunk = DEFAULT_CHUNK if chunk_size is None else check_positive_int("chunk_size", chunk_size)
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor of class ids, got {type(target).__name__}")
    if isinstance(x, Tensor) and x.dim() >= 1 and target.shape != x.shape[:-1]:
        raise ValueError(f"target must be one class id per row of x, shape {tuple(x.shape[:-1])}, got "
                         f"{tuple(target.shape)} (multi-label targets are not supported by diagnose)")
    head._check_input(x, target)
    check_finite("x", x)
    dev = head.weight.device
    if generator is None:
        generator = torch.Generator(device=dev).manual_seed(0)
    elif not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    elif generator.device.type != dev.type:
        raise ValueError(f"generator is on {generator.device} but the head is on {dev}: pass "
                         f"torch.Generator(device='{dev.type}')")

    was_training = head.training
    autocast_off = no_autocast(dev)  # as in training: the proposal and the loss run in the weight's dtype
    autocast_off.__enter__()
    try:
        xf = x.reshape(-1, head.in_features).detach().to(head.weight.dtype)
        tf = target.reshape(-1)
        keep = tf != head.ignore_index
        xq, t = xf[keep], tf[keep]
        if xq.shape[0] == 0:
            raise ValueError(f"every target equals ignore_index ({head.ignore_index}): no row to diagnose")
        ex = _exact_pass(head.sampler, head.weight, head.bias, xq, t, chunk)
        loss_exact_rows = ex["lse"] - ex["o_y"]
        g_exact = ex["grad"]

        W, b = head.weight.detach(), None if head.bias is None else head.bias.detach()
        ess_rows, cos_rows, rel_rows = [], [], []
        batch_cos, loss_raw, loss_est = [], [], []
        for _ in range(num_draws):
            with torch.no_grad():
                ids, log_q, t_lq = head.sampler.sample_with_targets(xq, m, t.unsqueeze(1), generator=generator)
                t_lq = t_lq.squeeze(1)
                o = torch.einsum("bd,bmd->bm", xq.double(), W[ids].double())
                if b is not None:
                    o = o + b[ids].double()
                log_w = o - log_q.double()
                ess_rows.append(torch.exp(2 * log_w.logsumexp(1) - (2 * log_w).logsumexp(1)))
            with torch.enable_grad():
                xg = xq.clone().requires_grad_(True)
                rows = sampled_softmax_loss(xg, W, b, t, ids, log_q, t_lq,
                                            remove_accidental_hits=head.remove_accidental_hits,
                                            ignore_index=head.ignore_index, reduction="none")
                (gs,) = torch.autograd.grad(rows.sum(), xg)
            gs, rows = gs.double(), rows.detach().double()
            loss_raw.append(rows.mean())
            loss_est.append((rows - math.log(m) - t_lq.double()).mean())
            cos_rows.append(torch.nn.functional.cosine_similarity(gs, g_exact, dim=1))
            rel_rows.append((gs - g_exact).norm(dim=1) / g_exact.norm(dim=1))
            batch_cos.append(torch.nn.functional.cosine_similarity(gs.flatten(), g_exact.flatten(), dim=0))
    finally:
        autocast_off.__exit__(None, None, None)
        head.train(was_training)

    ess = torch.stack(ess_rows).mean(0)
    cos = torch.stack(cos_rows).mean(0)
    est = torch.stack(loss_est)
    exact = loss_exact_rows.mean()
    scale = exact.abs()
    kl = ex["kl"]
    report = DiagnoseReport(
        sampler=repr(head.sampler), num_rows=int(xq.shape[0]), num_classes=int(W.shape[0]), num_samples=m,
        num_draws=num_draws, index_stale=bool(getattr(head, "_index_stale", False)),
        kl=kl.mean().item(), kl_median=kl.median().item(), kl_max=kl.max().item(), kl_rows=kl.cpu(),
        ess=ess.mean().item(), ess_rows=ess.cpu(), ess_fraction=(ess / m).mean().item(),
        ess_fraction_rows=(ess / m).cpu(), ess_fraction_limit=ex["ess_limit"].mean().item(),
        ess_fraction_limit_rows=ex["ess_limit"].cpu(),
        loss_exact=exact.item(), loss_sampled=torch.stack(loss_raw).mean().item(),
        loss_estimate=est.mean().item(), loss_bias=((est.mean() - exact) / scale).item(),
        loss_std=(est.std() / scale).item(),
        grad_cosine=cos.mean().item(), grad_cosine_rows=cos.cpu(),
        grad_cosine_batch=torch.stack(batch_cos).mean().item(),
        grad_rel_error=torch.stack(rel_rows).mean().item(),
        log_q_mass_err=ex["q_mass"].abs().max().item(),
    )
    report["seconds"] = time.perf_counter() - t_start
    return report
