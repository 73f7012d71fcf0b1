"""How close is each proposal Q to the true softmax P, and how good are the sampled gradients?

Two embedding sets:
  * ``trained``: the MovieLens-10M retrieval model of ``train_reference_model.py`` (item weight W,
    bias b, user query vectors h, one held-out item per user as target);
  * ``random``: Gaussian W [N, d] with the same N and d, no bias, Gaussian queries scaled so that the
    per-query standard deviation of the logits matches the trained model's (median over queries);
    targets drawn from P(.|h).

Proposals: uniform, unigram (``UnigramSampler(item_counts)``, alpha = 0.75, counts = training
interactions; trained set only: the random set has no frequencies), MIDX with ``quantizer`` in
{pq, rq} and K in {16, 32, 64, 128} (``MIDXSampler.build(W, b)``; Q from ``log_prob(h, all_ids)``),
and ``exact`` (Q = P) as the ideal reference in the gradient plot.

Distribution metrics, exact (all N classes, float64, ``imi_softmax.diagnose.proposal_divergence``: the
computation behind ``imi_softmax.diagnose``), per query then averaged over queries:
  * ``KL(P || Q) = sum_i P_i (log P_i - log Q_i)`` (nats);
  * ``ESS fraction = (E_Q[w])^2 / E_Q[w^2] = 1 / sum_i P_i^2 / Q_i``, with w = P / Q. This is the
    limit of ESS / M = (sum_j w_j)^2 / (M sum_j w_j^2) for M draws from Q (the effective number of
    samples per draw): 1 for Q = P, -> 0 for a useless proposal. Equivalently 1 / (1 + chi^2(P||Q)).
Gradient quality, per single draw of M samples (the library's fused loss, accidental hits removed):
  the gradient of the sampled loss w.r.t. the query vs the full-softmax gradient
  ``W^T (P - e_y)``: cosine similarity and relative error ||g_s - g|| / ||g||, averaged over queries
  and ``--repeats`` independent draws, for M in {16, 64, 256, 1024}.

Writes bench/results/proposal_quality_{dist,grad}.csv, proposal_quality_{kl,ess,grad}.png and
proposal_quality.md (the markdown tables, also printed).
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from memory import RESULTS, machine_info  # noqa: E402

KS = (16, 32, 64, 128)
MS = (16, 64, 256, 1024)


def load_sets(path: str, num_queries: int, seed: int):
    ref = torch.load(path, weights_only=False)
    g = torch.Generator().manual_seed(seed)
    W, b = ref["weight"].float(), ref["bias"].float()
    q, t = ref["queries"].float(), ref["query_targets"].long()
    sel = torch.randperm(q.shape[0], generator=g)[:num_queries]
    q, t = q[sel], t[sel]
    sets = {"trained": dict(W=W, b=b, q=q, t=t, counts=ref["item_counts"])}
    # random Gaussian set with the trained model's logit scale
    n, d = W.shape
    Wr = torch.randn(n, d, generator=g) / math.sqrt(d)
    qr = torch.randn(q.shape[0], d, generator=g)
    trained_std = F.linear(q, W, b).std(dim=1).median()
    random_std = (qr @ Wr.T).std(dim=1).median()
    qr = qr * (trained_std / random_std)
    logits = (qr @ Wr.T).double()
    tr = torch.multinomial(torch.softmax(logits, 1), 1, generator=g).squeeze(1)
    sets["random"] = dict(W=Wr, b=None, q=qr, t=tr, counts=None)
    return sets, ref.get("meta", {}), float(trained_std)


def make_proposals(imi, s, counts):
    props = {"uniform": imi.UniformSampler(s["W"].shape[0])}
    if counts is not None:
        props["unigram"] = imi.UnigramSampler(counts)
    for quant in ("pq", "rq"):
        for k in KS:
            t0 = time.perf_counter()
            props[f"midx-{quant}-K{k}"] = imi.MIDXSampler(k, quant).build(s["W"], s["b"])
            props[f"midx-{quant}-K{k}"]._build_s = time.perf_counter() - t0
    return props


def log_p_full(s):
    return torch.log_softmax(F.linear(s["q"].double(), s["W"].double(),
                                      None if s["b"] is None else s["b"].double()), dim=1)


def grad_quality(imi, s, sampler, M, repeats, gen_seed, chunk=256):
    """(cos [repeats*S], relerr [repeats*S]) of the sampled-loss query gradient vs the full one."""
    IF = imi.functional
    W, b, q, t = s["W"], s["b"], s["q"], s["t"]
    log_p = log_p_full(s)
    g_full = (log_p.exp() - F.one_hot(t, W.shape[0]).double()) @ W.double()     # [S, d]
    cos, rel = [], []
    gen = torch.Generator().manual_seed(gen_seed)
    for _ in range(repeats):
        for c in range(0, q.shape[0], chunk):
            qc, tc = q[c:c + chunk], t[c:c + chunk]
            ids, log_q = sampler.sample(qc, M, generator=gen)
            t_lq = sampler.log_prob(qc, tc.unsqueeze(1)).squeeze(1)
            x = qc.clone().requires_grad_(True)
            loss = IF.sampled_softmax_loss(x, W, b, tc, ids, log_q, t_lq, remove_accidental_hits=True,
                                           reduction="sum")
            (gx,) = torch.autograd.grad(loss, x)
            gf = g_full[c:c + chunk]
            gx = gx.double()
            cos.append(F.cosine_similarity(gx, gf, dim=1))
            rel.append((gx - gf).norm(dim=1) / gf.norm(dim=1))
    return torch.cat(cos), torch.cat(rel)


def plot(dist_rows, grad_rows, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = sorted({r["set"] for r in dist_rows})
    for metric, fname, ylabel, logy in (("kl_mean", "proposal_quality_kl.png", "mean KL(P || Q) [nats]", True),
                                        ("ess_mean", "proposal_quality_ess.png", "mean ESS fraction 1/E_Q[w^2]", True)):
        fig, axes = plt.subplots(1, len(sets), figsize=(5.5 * len(sets), 4), squeeze=False)
        for ax, st in zip(axes[0], sets):
            rows = [r for r in dist_rows if r["set"] == st]
            for quant, mk in (("pq", "o-"), ("rq", "s-")):
                pts = sorted((r["K"], r[metric]) for r in rows if r["proposal"].startswith(f"midx-{quant}"))
                ax.plot([p[0] for p in pts], [p[1] for p in pts], mk, label=f"MIDX-{quant}")
            for name, ls in (("uniform", "--"), ("unigram", ":")):
                v = [r[metric] for r in rows if r["proposal"] == name]
                if v:
                    ax.axhline(v[0], ls=ls, color="gray" if name == "uniform" else "k", label=name)
            ax.set_xscale("log", base=2)
            if logy:
                ax.set_yscale("log")
            ax.set_xticks(KS, [str(k) for k in KS])
            ax.set_xlabel("K (codewords per codebook)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{st} embeddings")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out, fname), dpi=120)
        plt.close(fig)
    fig, axes = plt.subplots(2, len(sets), figsize=(5.5 * len(sets), 7.5), squeeze=False)
    for j, st in enumerate(sets):
        rows = [r for r in grad_rows if r["set"] == st]
        for name in sorted({r["sampler"] for r in rows}):
            pts = sorted((r["M"], r["cos_mean"], r["relerr_mean"]) for r in rows if r["sampler"] == name)
            style = "--" if name in ("uniform", "unigram") else (":" if name == "exact" else "-")
            axes[0][j].plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", ms=3, label=name)
            axes[1][j].plot([p[0] for p in pts], [p[2] for p in pts], style, marker="o", ms=3, label=name)
        for i, yl in enumerate(("cosine(sampled grad, full grad)", "relative error")):
            axes[i][j].set_xscale("log", base=2)
            axes[i][j].set_xticks(MS, [str(m) for m in MS])
            axes[i][j].set_xlabel("M (samples per query)")
            axes[i][j].set_ylabel(yl)
            axes[i][j].set_title(f"{st} embeddings")
        axes[1][j].set_yscale("log")
        axes[0][j].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "proposal_quality_grad.png"), dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.path.join(RESULTS, "reference_model_ml10m.pt"))
    p.add_argument("--num-queries", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=5, help="independent draws per query for the gradient")
    p.add_argument("--grad-K", type=int, nargs="*", default=[16, 64, 128],
                   help="K values of the MIDX samplers in the gradient study")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=RESULTS)
    a = p.parse_args(argv)
    import imi_softmax as imi
    from imi_softmax.diagnose import proposal_divergence

    torch.manual_seed(a.seed)
    os.makedirs(a.out, exist_ok=True)
    sets, meta, logit_std = load_sets(a.model, a.num_queries, a.seed)
    info = machine_info("cpu")
    print(f"reference model: {meta.get('model', '?')}, epochs {meta.get('epochs')}, "
          f"recall@20 {meta.get('recall_at_20', ['?'])[-1]}; logit std (median) {logit_std:.3f}")
    dist_rows, grad_rows = [], []
    for st, s in sets.items():
        n = s["W"].shape[0]
        props = make_proposals(imi, s, s["counts"])
        for name, sampler in props.items():
            # the package's exact chunked computation (the same one imi_softmax.diagnose reports)
            dv = proposal_divergence(sampler, s["W"], s["b"], s["q"])
            kl, ess = dv["kl"], dv["ess_fraction_limit"]
            lse_err = dv["log_q_mass"].abs().max().item()
            quant, k = ("", "")
            if name.startswith("midx"):
                _, quant, kk = name.split("-")
                k = int(kk[1:])
            dist_rows.append(dict(set=st, proposal=name, quantizer=quant, K=k, N=n, d=s["W"].shape[1],
                                  queries=s["q"].shape[0], kl_mean=kl.mean().item(), kl_median=kl.median().item(),
                                  ess_mean=ess.mean().item(), ess_median=ess.median().item(),
                                  logsumexp_err=lse_err,
                                  build_s=getattr(sampler, "_build_s", "")))
            print(f"[{st}] {name:<16} KL mean {kl.mean():8.4f}  median {kl.median():8.4f}  "
                  f"ESS frac mean {ess.mean():.4f}  |logsumexp log Q| {lse_err:.1e}", flush=True)
        ex = imi.ExactSampler().build(s["W"], s["b"])
        grad_samplers = {"uniform": props["uniform"], "exact": ex}
        if "unigram" in props:
            grad_samplers["unigram"] = props["unigram"]
        for quant in ("pq", "rq"):
            for k in a.grad_K:
                grad_samplers[f"midx-{quant}-K{k}"] = props[f"midx-{quant}-K{k}"]
        for name, sampler in grad_samplers.items():
            for m in MS:
                cos, rel = grad_quality(imi, s, sampler, m, a.repeats, a.seed + m)
                grad_rows.append(dict(set=st, sampler=name, M=m, draws=cos.numel(), cos_mean=cos.mean().item(),
                                      cos_std=cos.std().item(), relerr_mean=rel.mean().item(),
                                      relerr_median=rel.median().item()))
            print(f"[{st}] grad {name:<16} cos " + "  ".join(
                f"M={r['M']}:{r['cos_mean']:.4f}" for r in grad_rows if r["set"] == st and r["sampler"] == name),
                flush=True)

    with open(os.path.join(a.out, "proposal_quality_dist.csv"), "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(dist_rows[0]))
        wr.writeheader()
        wr.writerows(dist_rows)
    with open(os.path.join(a.out, "proposal_quality_grad.csv"), "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(grad_rows[0]))
        wr.writeheader()
        wr.writerows(grad_rows)
    plot(dist_rows, grad_rows, a.out)

    # markdown
    lines = [f"# Proposal quality (imi_softmax {getattr(imi, '__version__', '?')}, commit {info['git_commit']}, "
             f"torch {info['torch_version']}, {info['cpu_model']})", "",
             f"Trained set: ML-10M retrieval model ({meta.get('model', '')}; {meta.get('epochs')} epochs, "
             f"recall@20 {meta.get('recall_at_20', [float('nan')])[-1]:.4f}), N = {sets['trained']['W'].shape[0]}, "
             f"d = {sets['trained']['W'].shape[1]}, {a.num_queries} user queries. Random set: Gaussian W and "
             f"queries, same N, d, logit std matched ({logit_std:.2f}), no bias.", "",
             "KL(P||Q) and ESS fraction = 1 / sum_i P_i^2/Q_i are exact over all classes, averaged over "
             "queries. Gradient cosine: sampled-loss gradient w.r.t. the query vs the full-softmax gradient, "
             f"one draw of M samples, averaged over queries x {a.repeats} draws.", ""]
    for st in sets:
        lines += [f"## {st} embeddings", "",
                  "| proposal | KL(P‖Q) mean | ESS fraction mean | " + " | ".join(f"cos M={m}" for m in MS) + " |",
                  "|---|---:|---:|" + "---:|" * len(MS)]
        for r in [r for r in dist_rows if r["set"] == st] + [dict(proposal="exact", kl_mean=0.0, ess_mean=1.0)]:
            g = {gr["M"]: gr for gr in grad_rows if gr["set"] == st and gr["sampler"] == r["proposal"]}
            cells = " | ".join(f"{g[m]['cos_mean']:.4f}" if m in g else "–" for m in MS)
            lines.append(f"| {r['proposal']} | {r['kl_mean']:.4f} | {r['ess_mean']:.4f} | {cells} |")
        lines.append("")
    # the acceptance check: MIDX below uniform and unigram in KL, above them in gradient cosine at every M
    checks = []
    for st in sets:
        base = [r for r in dist_rows if r["set"] == st and r["proposal"] in ("uniform", "unigram")]
        best_base_kl = min(r["kl_mean"] for r in base)
        for r in [r for r in dist_rows if r["set"] == st and r["proposal"].startswith("midx")]:
            ok_kl = r["kl_mean"] < best_base_kl
            gm = {gr["M"]: gr["cos_mean"] for gr in grad_rows if gr["set"] == st and gr["sampler"] == r["proposal"]}
            gb = {m: max(gr["cos_mean"] for gr in grad_rows if gr["set"] == st and gr["M"] == m
                         and gr["sampler"] in ("uniform", "unigram")) for m in MS}
            ok_cos = all(gm[m] > gb[m] for m in gm) if gm else None
            checks.append((st, r["proposal"], ok_kl, ok_cos))
    lines += ["## Check: MIDX lower KL than uniform and unigram, higher gradient cosine at every M", "",
              "| set | proposal | KL lower | cosine higher at every M |", "|---|---|---|---|"]
    for st, name, ok_kl, ok_cos in checks:
        lines.append(f"| {st} | {name} | {'yes' if ok_kl else 'NO'} | "
                     f"{'n/a (not in gradient study)' if ok_cos is None else ('yes' if ok_cos else 'NO')} |")
    md = "\n".join(lines) + "\n"
    with open(os.path.join(a.out, "proposal_quality.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
