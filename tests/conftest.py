import math

import pytest
import torch

import imi_softmax  # noqa: F401  (loads the ops)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def reference_midx_log_q(sampler, query):
    """float64 log Q(i | query) for all classes, straight from the definition:
    log_softmax_i(s1[a1(i)] + s2[a2(i)] + beta_i), with s1, s2 from the codebooks."""
    c1, c2 = (c.to(torch.float64) for c in sampler.codebooks)
    q = query.to(torch.float64)
    if sampler.quantizer == "rq":
        s1, s2 = q @ c1.T, q @ c2.T
    else:
        h = q.shape[1] // 2
        s1, s2 = q[:, :h] @ c1.T, q[:, h:] @ c2.T
    logits = s1[:, sampler.code1] + s2[:, sampler.code2]
    if sampler.beta is not None:
        logits = logits + sampler.beta.to(torch.float64)
    return torch.log_softmax(logits, dim=1)


def reference_loss(x, w, b, target, ids, log_q, target_log_q, remove_hits=True, ignore_index=-100):
    """Row losses of DESIGN.md's formula, with plain torch ops in float64."""
    x, w = x.double(), w.double()
    all_ids = torch.cat([target.clamp_min(0).unsqueeze(1), ids], 1)
    o = torch.einsum("bd,bmd->bm", x, w[all_ids])
    if b is not None:
        o = o + b.double()[all_ids]
    u = o - torch.cat([target_log_q.unsqueeze(1), log_q], 1).double()
    if remove_hits:
        u[:, 1:] = u[:, 1:].masked_fill(ids == target.unsqueeze(1), -math.inf)
    rows = torch.logsumexp(u, 1) - u[:, 0]
    return torch.where(target == ignore_index, torch.zeros_like(rows), rows)


def make_loss_inputs(B=6, N=40, d=5, M=7, dtype=torch.float64, device="cpu", seed=0, bias=True):
    """Inputs of the sampled loss: x [B, d], w [N, d], b [N] (requiring grad, drawn in float64 and
    cast to dtype, so every dtype sees the same values), targets [B], negatives [B, M] with
    accidental hits in row 0, and their log Q (target_log_q [B])."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g, dtype=torch.float64).to(dtype).to(device).requires_grad_()
    w = torch.randn(N, d, generator=g, dtype=torch.float64).to(dtype).to(device).requires_grad_()
    b = torch.randn(N, generator=g, dtype=torch.float64).to(dtype).to(device).requires_grad_() if bias else None
    target = torch.randint(0, N, (B,), generator=g).to(device)
    ids = torch.randint(0, N, (B, M), generator=g).to(device)
    ids[0, :3] = target[0]  # accidental hits
    log_q = (torch.rand(B, M, generator=g) * -3 - 1).to(device)
    tlq = (torch.rand(B, generator=g) * -3 - 1).to(device)
    return x, w, b, target, ids, log_q, tlq
