"""Does KL refinement of the MIDX codebooks bring Q closer to P? (issue 13, part 2)

On a trained head, for quantizer in {rq, pq} and K in {16, 64}:
  1. build the MIDX index (k-means, as every refresh does);
  2. measure, with ``imi_softmax.diagnose`` on HELD-OUT queries (not used for fitting): KL(P || Q),
     the ESS-fraction limit and the gradient cosine of the sampled loss w.r.t. the query at M = 32
     and M = 128 (``--num-draws`` draws each); and KL on the FIT queries;
  3. ``sampler.refine_codebooks(fit_queries, W, b, steps, lr)`` (cells kept) and measure again.
The queries are split in two halves: refinement fits one, the numbers that matter are on the other.

Heads (``--source``):
  ml10m  the ML-10M reference model (``train_reference_model.py``: item weight W [8939, 64], bias b,
         2048 user queries with one held-out item each)
  lm     the Penn Treebank LSTM LM's output layer trained with the full softmax
         (``train_reference_lm.py``: W [10000, 200], b, 2048 validation-set LSTM outputs with their
         next token)

Writes bench/results/kl_refine_<source>.{csv,png} and prints a markdown table.

    python bench/kl_refine.py [--source ml10m|lm] [--steps 300] [--lr 0.01] [--threads 1] [--quantizers rq]
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from memory import RESULTS, machine_info  # noqa: E402

KS = (16, 64)
MS = (32, 128)
QUANTIZERS = ("rq", "pq")
# source: (saved head in bench/results, the script that writes it, its name in titles)
SOURCES = {"ml10m": ("reference_model_ml10m.pt", "train_reference_model.py", "ML-10M reference model"),
           "lm": ("reference_lm_ptb.pt", "train_reference_lm.py", "PTB LSTM LM head (full softmax)")}


def head_with(imi, W, b, sampler):
    n, d = W.shape
    head = imi.IMISoftmax(d, n, bias=b is not None, sampler=sampler)
    with torch.no_grad():
        head.weight.copy_(W)
        if b is not None:
            head.bias.copy_(b)
    head.refresh_index()
    return head


def measure(imi, head, fit_q, test_q, test_t, draws, seed):
    from imi_softmax.diagnose import proposal_divergence

    out = {"kl_fit": float(proposal_divergence(head.sampler, head.weight, head.bias, fit_q)["kl"].mean())}
    for m in MS:
        r = imi.diagnose(head, test_q, test_t, num_samples=m, num_draws=draws,
                         generator=torch.Generator().manual_seed(seed + m))
        out["kl_heldout"] = r["kl"]
        out["ess_limit_heldout"] = r["ess_fraction_limit"]
        out[f"grad_cos_M{m}"] = r["grad_cosine"]
        out[f"loss_bias_M{m}"] = r["loss_bias"]
    return out


def plot(rows, out_png, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    panels = (("kl_heldout", "KL(P||Q), held-out queries [nats]"), ("grad_cos_M32", "1 - grad cosine, M = 32"),
              ("grad_cos_M128", "1 - grad cosine, M = 128"))
    labels = [f"{r['quantizer']} K={r['K']}" for r in rows if not r["refined"]]
    x = range(len(labels))
    for j, (key, name) in enumerate(panels):
        for refined, off, color in ((False, -0.2, "tab:gray"), (True, 0.2, "tab:blue")):
            vals = [r[key] for r in rows if r["refined"] == refined]
            if key.startswith("grad"):
                vals = [1 - v for v in vals]
            ax[j].bar([i + off for i in x], vals, width=0.4, color=color,
                      label="k-means + KL refinement" if refined else "k-means")
        ax[j].set_xticks(list(x), labels)
        ax[j].set_title(name, fontsize=9)
        ax[j].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", choices=tuple(SOURCES), default="ml10m")
    p.add_argument("--model", default=None, help="the saved head (default: the source's reference file)")
    p.add_argument("--quantizers", nargs="+", choices=QUANTIZERS, default=list(QUANTIZERS))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--num-draws", type=int, default=8)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=RESULTS)
    a = p.parse_args(argv)
    import imi_softmax as imi
    from tqdm import tqdm

    if a.threads:
        torch.set_num_threads(a.threads)
    model_path = a.model or os.path.join(RESULTS, SOURCES[a.source][0])
    if not os.path.exists(model_path):
        sys.exit(f"{model_path} not found: run bench/{SOURCES[a.source][1]} first")
    info = machine_info("cpu")
    load_before = os.getloadavg()[0]
    ref = torch.load(model_path, weights_only=False)
    W, b = ref["weight"].float(), ref["bias"].float()
    q, t = ref["queries"].float(), ref["query_targets"].long()
    perm = torch.randperm(q.shape[0], generator=torch.Generator().manual_seed(a.seed))
    half = q.shape[0] // 2
    fit_q, test_q, test_t = q[perm[:half]], q[perm[half:]], t[perm[half:]]
    rows = []
    for quantizer in a.quantizers:
        for k in tqdm(KS, desc=f"{quantizer}: K"):
            head = head_with(imi, W, b, imi.MIDXSampler(k, quantizer))
            rows.append(dict(quantizer=quantizer, K=k, refined=False, steps=0, lr="", refine_s="",
                             **measure(imi, head, fit_q, test_q, test_t, a.num_draws, a.seed)))
            t0 = time.perf_counter()
            stats = head.sampler.refine_codebooks(fit_q, head.weight, head.bias, steps=a.steps, lr=a.lr)
            secs = time.perf_counter() - t0
            rows.append(dict(quantizer=quantizer, K=k, refined=True, steps=a.steps, lr=a.lr, refine_s=round(secs, 2),
                             **measure(imi, head, fit_q, test_q, test_t, a.num_draws, a.seed)))
            assert abs(stats["kl_after"] - rows[-1]["kl_fit"]) < 1e-6 * max(1.0, abs(stats["kl_after"]))
    n, d = W.shape
    for r in rows:
        r.update(N=n, d=d, fit_queries=fit_q.shape[0], heldout_queries=test_q.shape[0], draws=a.num_draws,
                 commit=info["git_commit"], threads=torch.get_num_threads(), load_1m=f"{load_before:.2f}")
    os.makedirs(a.out, exist_ok=True)
    csv_path = os.path.join(a.out, f"kl_refine_{a.source}.csv")
    with open(csv_path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    png = os.path.join(a.out, f"kl_refine_{a.source}.png")
    plot(rows, png, f"{SOURCES[a.source][2]}, N = {n}, d = {d}: {fit_q.shape[0]} fit / {test_q.shape[0]} held-out "
                    f"queries, {a.steps} Adam steps lr {a.lr} (commit {info['git_commit']})")
    print(f"\n{SOURCES[a.source][2]}, N = {n}, d = {d}; {info['cpu_model']}, {torch.get_num_threads()} threads, "
          f"load {load_before:.2f} -> {os.getloadavg()[0]:.2f}; commit {info['git_commit']}\n")
    print("| quantizer | K | codebooks | KL fit | KL held-out | ESS limit | cos M=32 | cos M=128 | refine s |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['quantizer']} | {r['K']} | {'refined' if r['refined'] else 'k-means'} | {r['kl_fit']:.3f} | "
              f"{r['kl_heldout']:.3f} | {r['ess_limit_heldout']:.3f} | {r['grad_cos_M32']:.4f} | "
              f"{r['grad_cos_M128']:.4f} | {r['refine_s'] or '–'} |")
    print(f"\nwrote {csv_path} and {png}")


if __name__ == "__main__":
    main()
