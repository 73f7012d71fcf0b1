"""Choose K (codewords per codebook) and M (samples per query) with ``imi_softmax.diagnose``.

On the ML-10M reference model (``train_reference_model.py``: item weight, bias, user queries and one
held-out item per user as target) or, with ``--synthetic``, on a planted Gaussian catalogue, runs
``imi_softmax.diagnose`` for MIDX (rq) with K in {16, 32, 64, 128} and M in {32, 128, 512}, and for
the uniform and unigram proposals as references. KL(P||Q) depends on K only (exact, all classes);
the gradient cosine and the ESS fraction depend on both.

Writes bench/results/diagnose_sweep_<ml10m|synthetic>.{csv,png} (KL and ESS limit vs K, 1 - gradient
cosine vs M per K), and prints a markdown table.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from memory import RESULTS, machine_info  # noqa: E402

KS = (16, 32, 64, 128)
MS = (32, 128, 512)


def load(path: str, num_queries: int, synthetic: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    if synthetic:  # planted catalogue: 64 clusters of items, queries near a cluster centre
        n, d = 20_000, 64
        centres = torch.randn(64, d, generator=g)
        W = centres[torch.randint(0, 64, (n,), generator=g)] + 0.5 * torch.randn(n, d, generator=g)
        W = W / math.sqrt(d)
        q = 2.0 * centres[torch.randint(0, 64, (num_queries,), generator=g)] + torch.randn(num_queries, d, generator=g)
        logits = (q @ W.T).double()
        t = torch.multinomial(torch.softmax(logits, 1), 1, generator=g).squeeze(1)
        counts = torch.bincount(torch.multinomial(torch.softmax(logits, 1).mean(0), 100 * n, replacement=True,
                                                  generator=g), minlength=n).float()
        return dict(W=W, b=None, q=q, t=t, counts=counts, name="synthetic planted catalogue")
    ref = torch.load(path, weights_only=False)
    sel = torch.randperm(ref["queries"].shape[0], generator=g)[:num_queries]
    return dict(W=ref["weight"].float(), b=ref["bias"].float(), q=ref["queries"].float()[sel],
                t=ref["query_targets"].long()[sel], counts=ref["item_counts"].float(),
                name=f"ML-10M reference model ({ref.get('meta', {}).get('model', '')})")


def head_with(imi, s, sampler):
    n, d = s["W"].shape
    head = imi.IMISoftmax(d, n, bias=s["b"] is not None, sampler=sampler)
    with torch.no_grad():
        head.weight.copy_(s["W"])
        if s["b"] is not None:
            head.bias.copy_(s["b"])
    head.refresh_index()
    return head


def plot(rows, out_png, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    midx = [r for r in rows if r["proposal"] == "midx"]
    base = {name: [r for r in rows if r["proposal"] == name] for name in ("uniform", "unigram")}
    for j, (key, label) in enumerate((("kl", "KL(P || Q) [nats], mean over queries"),
                                      ("ess_fraction_limit", "ESS fraction as M -> inf (1 / E_P[P/Q])"))):
        pts = sorted({(r["K"], r[key]) for r in midx})
        ax[j].plot([p[0] for p in pts], [p[1] for p in pts], "o-", label="MIDX (rq)")
        for name, ls in (("uniform", "--"), ("unigram", ":")):
            if base[name]:
                ax[j].axhline(base[name][0][key], ls=ls, color="gray", label=name)
        ax[j].set_xscale("log", base=2)
        ax[j].set_xticks(KS, [str(k) for k in KS])
        ax[j].set_xlabel("K (codewords per codebook)")
        ax[j].set_ylabel(label)
        ax[j].set_yscale("log")
        ax[j].legend(fontsize=8)
    for k in KS:
        pts = sorted((r["M"], 1 - r["grad_cosine"]) for r in midx if r["K"] == k)
        ax[2].plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"MIDX K={k}")
    for name, ls in (("uniform", "--"), ("unigram", ":")):
        pts = sorted((r["M"], 1 - r["grad_cosine"]) for r in base[name])
        if pts:
            ax[2].plot([p[0] for p in pts], [p[1] for p in pts], ls, color="gray" if name == "uniform" else "k",
                       marker="x", label=name)
    ax[2].set_xscale("log", base=2)
    ax[2].set_xticks(MS, [str(m) for m in MS])
    ax[2].set_xlabel("M (samples per query)")
    ax[2].set_ylabel("1 - cosine(sampled grad, exact grad) w.r.t. x")
    ax[2].set_yscale("log")
    ax[2].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.path.join(RESULTS, "reference_model_ml10m.pt"))
    p.add_argument("--synthetic", action="store_true", help="planted Gaussian catalogue instead of the model")
    p.add_argument("--num-queries", type=int, default=1024)
    p.add_argument("--num-draws", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=RESULTS)
    a = p.parse_args(argv)
    import imi_softmax as imi
    from tqdm import tqdm

    if not a.synthetic and not os.path.exists(a.model):
        sys.exit(f"{a.model} not found: run bench/train_reference_model.py first, or pass --synthetic")
    info = machine_info("cpu")
    s = load(a.model, a.num_queries, a.synthetic, a.seed)
    n, d = s["W"].shape
    props = [("uniform", "", lambda: "uniform"), ("unigram", "", lambda: imi.UnigramSampler(s["counts"]))]
    props += [("midx", k, (lambda k=k: imi.MIDXSampler(k, "rq"))) for k in KS]
    rows = []
    t0 = time.perf_counter()
    for name, k, make in tqdm(props, desc="proposals"):
        head = head_with(imi, s, make())
        for m in MS:
            r = imi.diagnose(head, s["q"], s["t"], num_samples=m, num_draws=a.num_draws,
                             generator=torch.Generator().manual_seed(a.seed + m))
            rows.append(dict(proposal=name, K=k, M=m, N=n, d=d, queries=r["num_rows"], draws=a.num_draws,
                             kl=r["kl"], kl_median=r["kl_median"], ess_fraction=r["ess_fraction"],
                             ess_fraction_limit=r["ess_fraction_limit"], loss_bias=r["loss_bias"],
                             loss_std=r["loss_std"], grad_cosine=r["grad_cosine"],
                             grad_cosine_batch=r["grad_cosine_batch"], grad_rel_error=r["grad_rel_error"],
                             seconds=r["seconds"]))
    elapsed = time.perf_counter() - t0
    tag = "synthetic" if a.synthetic else "ml10m"
    os.makedirs(a.out, exist_ok=True)
    csv_path = os.path.join(a.out, f"diagnose_sweep_{tag}.csv")
    with open(csv_path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    png = os.path.join(a.out, f"diagnose_sweep_{tag}.png")
    plot(rows, png, f"{s['name']}: N = {n}, d = {d}, {a.num_queries} queries, {a.num_draws} draws per point "
                    f"(imi_softmax.diagnose; commit {info['git_commit']})")
    print(f"\n{s['name']}, N = {n}, d = {d}; {elapsed:.1f} s on {info['cpu_model']}, {info['torch_threads']} "
          f"threads, load {info.get('load_avg_1m')} -> {os.getloadavg()[0]:.2f}; commit {info['git_commit']}\n")
    print("| proposal | K | KL(P‖Q) | ESS frac. limit | " + " | ".join(f"cos M={m}" for m in MS)
          + " | " + " | ".join(f"loss bias M={m}" for m in MS) + " |")
    print("|---|---:|---:|---:|" + "---:|" * (2 * len(MS)))
    for name, k, _ in props:
        rs = {r["M"]: r for r in rows if r["proposal"] == name and r["K"] == k}
        first = rs[MS[0]]
        print(f"| {name} | {k or '–'} | {first['kl']:.3f} | {first['ess_fraction_limit']:.3f} | "
              + " | ".join(f"{rs[m]['grad_cosine']:.3f}" for m in MS) + " | "
              + " | ".join(f"{100 * rs[m]['loss_bias']:+.1f}%" for m in MS) + " |")
    print(f"\nwrote {csv_path} and {png}")


if __name__ == "__main__":
    main()
