"""Downstream effect of the KL codebook refinement: NDCG@10 of MIDX-rq at M = 32 with and without.

    python examples/recommender/run_kl_refine.py                      # ml10m, K in {16, 64}, 3 epochs
    python examples/recommender/run_kl_refine.py --steps 100 --num-codewords 64
    python examples/recommender/run_kl_refine.py --num-codewords 64 --only on --out /tmp/k64_on   # one run

Every run uses the same seed, split and schedule (index refresh every ``--refresh-every`` steps,
one in ``--full-refresh-every`` a full rebuild: k-means, then, with refinement, ``--steps`` Adam
steps on the last ``--queries`` training query rows; the other refreshes re-assign the touched
classes against the current codebooks). Only the refinement differs. Training time includes the
refreshes (and so the refinement's cost). Writes results/kl_refine_<data>_<machine>.{csv,md,png}.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "examples.recommender"

import torch

from .data import load_dataset, make_split
from .report import write_csv
from .train import Config, METRIC_KEYS, eval_user_set, evaluate, train

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="ml10m")
    p.add_argument("--num-codewords", nargs="+", type=int, default=[16, 64])
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--refresh-every", type=int, default=50)
    p.add_argument("--full-refresh-every", type=int, default=5, help="one refresh in this many is full (and refines)")
    p.add_argument("--steps", type=int, default=100, help="Adam steps of each refinement")
    p.add_argument("--queries", type=int, default=2048, help="recent query rows each refinement fits")
    p.add_argument("--eval-users", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--only", choices=("off", "on"), default=None,
                   help="run only the k-means (off) or only the refined (on) run of each K, e.g. to run a pair "
                        "as two processes (give each its own --out)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    split = make_split(load_dataset(a.data), 0.2, 0)
    all_users = eval_user_set(split, None, a.seed)
    load0 = os.getloadavg()[0]
    rows = []
    for k in a.num_codewords:
        for steps in {"off": (0,), "on": (a.steps,), None: (0, a.steps)}[a.only]:
            cfg = Config(data=a.data, head="midx-rq", num_samples=a.num_samples, epochs=a.epochs, seed=a.seed,
                         refresh_every=a.refresh_every, full_refresh_every=a.full_refresh_every, num_codewords=k,
                         kl_refine_steps=steps, kl_refine_queries=a.queries, eval_users=a.eval_users or None,
                         progress=False)
            t0 = time.perf_counter()
            res = train(cfg, split, keep_model=True, log=None)
            final = evaluate(res.model, split, all_users, cfg.eval_chunk)
            last = res.model.head.layer.sampler.last_refine
            for h in res.history:
                rows.append({"K": k, "refine_steps": steps, "epoch": h["epoch"], "steps": h["steps"], "loss": h["loss"],
                             "cum_train_time_s": h["cum_train_time_s"], "eval_users": h.get("eval_users", ""),
                             **{m: h.get(m, "") for m in METRIC_KEYS}, "final_all_users": 0})
            rows.append({**rows[-1], "eval_users": final["eval_users"], **{m: final[m] for m in METRIC_KEYS},
                         "final_all_users": 1,
                         "last_refine_kl_before": "" if last is None else last["kl_before"],
                         "last_refine_kl_after": "" if last is None else last["kl_after"]})
            print(f"K={k} refine_steps={steps}: ndcg@10 {final['ndcg@10']:.4f} recall@20 {final['recall@20']:.4f} "
                  f"train {res.history[-1]['cum_train_time_s']:.0f}s wall {time.perf_counter() - t0:.0f}s"
                  + ("" if last is None else f"; last refinement KL {last['kl_before']:.3f} -> {last['kl_after']:.3f}"),
                  flush=True)
    info = f"{torch.get_num_threads()} threads, {os.cpu_count()} cores, load {load0:.2f} -> {os.getloadavg()[0]:.2f}"
    stem = Path(a.out) if a.out else RESULTS / f"kl_refine_{split.name}_cpu{os.cpu_count()}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    write_csv(stem.with_suffix(".csv"), rows, keys)
    lines = [f"# KL-refined codebooks, downstream: {split.name}, midx-rq, M = {a.num_samples}, {a.epochs} epochs", "",
             f"Command: `python examples/recommender/run_kl_refine.py {' '.join(sys.argv[1:])}`; {info}", "",
             f"Index refresh every {a.refresh_every} steps, one in {a.full_refresh_every} a full rebuild (k-means, then "
             f"the refinement if on: {a.steps} Adam "
             f"steps on the last {a.queries} query rows. Metrics over all items on all test users after the last "
             "epoch; train s includes the refreshes. KL columns: the last refinement's KL on its own sample.", "",
             "| K | refinement | NDCG@10 | Recall@20 | NDCG@50 | train s | KL before -> after (last refresh) |",
             "| ---: | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        if r["final_all_users"]:
            kl = (f"{r['last_refine_kl_before']:.3f} -> {r['last_refine_kl_after']:.3f}"
                  if r.get("last_refine_kl_before", "") != "" else "–")
            lines.append(f"| {r['K']} | {r['refine_steps'] or 'off'} | {r['ndcg@10']:.4f} | {r['recall@20']:.4f} | "
                         f"{r['ndcg@50']:.4f} | {r['cum_train_time_s']:.0f} | {kl} |")
    text = "\n".join(lines) + "\n"
    stem.with_suffix(".md").write_text(text)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        for k in a.num_codewords:
            for steps in {"off": (0,), "on": (a.steps,), None: (0, a.steps)}[a.only]:
                pts = [r for r in rows if r["K"] == k and r["refine_steps"] == steps and not r["final_all_users"]]
                ax.plot([r["epoch"] for r in pts], [r["ndcg@10"] for r in pts], marker="o",
                        linestyle="-" if steps else "--", label=f"K={k}, {'refined' if steps else 'k-means'}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"NDCG@10 ({a.eval_users} eval users)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(stem.with_suffix(".png"), dpi=110)
        plt.close(fig)
    except ImportError:  # pragma: no cover
        pass
    print(text)
    print(f"wrote {stem}.csv/.md/.png")


if __name__ == "__main__":
    main()
