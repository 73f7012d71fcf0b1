"""1,000,000-item synthetic catalogue: full softmax vs IMISoftmax (MIDX-rq) timing, and recovery of
the planted structure.

    python examples/recommender/run_large_catalogue.py            # ~3-5 min on 2 cores

The same two-tower model and training loop as the MovieLens runs (train.train), dense gradients and
torch's fused Adam for both heads (--sparse switches to sparse gradients + SparseAdam, which on 2 CPU
cores was ~5x SLOWER per step here: SparseAdam's coalesce/sparse_mask dominate). IMISoftmax trains
for --steps steps and is evaluated over ALL items for --eval-users test users; the full softmax
(nn.Linear over 1M items + F.cross_entropy) is only timed for --full-steps steps, and its epoch time is EXTRAPOLATED as step time x steps per epoch. Recovery is
judged against a uniformly random ranking, the training popularity ranking and the planted model
itself (the oracle, the best achievable).
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "examples.recommender"

import numpy as np
import torch

from .data import make_split
from .run_experiment import RESULTS, default_machine
from .synthetic import make_planted, planted_scores
from .train import Config, METRIC_KEYS, eval_user_set, evaluate_scorer, train


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-items", type=int, default=1_000_000)
    p.add_argument("--num-clusters", type=int, default=200)
    p.add_argument("--num-users", type=int, default=50_000)
    p.add_argument("--interactions-per-user", type=int, default=30)
    p.add_argument("--steps", type=int, default=600, help="IMISoftmax training steps")
    p.add_argument("--full-steps", type=int, default=3, help="full-softmax steps timed (then extrapolated)")
    p.add_argument("--num-samples", type=int, default=256)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--batch-users", type=int, default=128)
    p.add_argument("--targets-per-user", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--refresh-every", type=int, default=100)
    p.add_argument("--eval-users", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-full", action="store_true")
    p.add_argument("--sparse", action="store_true", help="sparse gradients + SparseAdam for the embedding tables")
    p.add_argument("--machine", default=default_machine())
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    data, planted = make_planted(args.num_items, args.num_clusters, args.num_users, args.interactions_per_user,
                                 seed=args.seed)
    split = make_split(data, 0.2, args.seed)
    print(f"{data} generated + split in {time.perf_counter() - t0:.1f}s; {split.num_train} training interactions")
    users = eval_user_set(split, args.eval_users, args.seed)
    rows = []

    def add(name, steps, step_time, metrics, note=""):
        steps_per_epoch = math.ceil(int((np.diff(split.train_indptr) >= 2).sum()) / args.batch_users)
        rows.append({"method": name, "steps": steps, "step_time_s": step_time,
                     "epoch_time_s": step_time * steps_per_epoch if step_time else "", **metrics, "note": note})
        r = rows[-1]
        print(f"{name:22s} steps={steps!s:>5} s/step={step_time or float('nan'):.4f} "
              + " ".join(f"{k}={r[k]:.4f}" for k in METRIC_KEYS if r.get(k, "") != "") + f" {note}", flush=True)

    rand = {"recall@20": 20 / args.num_items, "recall@50": 50 / args.num_items}
    add("random (expected)", "", None, rand, "k / num_items")
    pop = torch.from_numpy(split.item_counts).float()
    add("popularity", "", None, evaluate_scorer(lambda u, *a: pop.expand(len(u), -1).clone(), split, users, 64))
    add("planted oracle", "", None, evaluate_scorer(lambda u, *a: planted_scores(planted, u), split, users, 64))

    base = Config(data=data.name, dim=args.dim, hidden=2 * args.dim, batch_users=args.batch_users,
                  targets_per_user=args.targets_per_user, lr=args.lr, seed=args.seed, sparse=args.sparse,
                  refresh_every=args.refresh_every, epochs=10 ** 6, eval_users=args.eval_users, eval_chunk=64,
                  progress=True)
    cfg = base.replace(head="midx-rq", num_samples=args.num_samples, max_steps=args.steps)
    res = train(cfg, split, keep_model=True, log=None)
    h = res.final
    first, last = np.mean(res.losses[:20]), np.mean(res.losses[-20:])
    add(f"IMISoftmax midx-rq M={args.num_samples}", h["steps"], h["cum_train_time_s"] / h["steps"],
        {k: h[k] for k in METRIC_KEYS}, f"loss {first:.2f} -> {last:.2f}")
    if not args.skip_full:
        cfg = base.replace(head="full", max_steps=args.full_steps, do_eval=False, sparse=False)
        res_f = train(cfg, split, log=None)
        add("full softmax (timed)", res_f.final["steps"], res_f.final["cum_train_time_s"] / res_f.final["steps"], {},
            "epoch time extrapolated from the timed steps; not evaluated")
    full = next((r for r in rows if r["method"].startswith("full")), None)
    imi = next(r for r in rows if r["method"].startswith("IMISoftmax"))
    lines = [f"# Synthetic planted catalogue: {args.num_items:,} items, {args.num_users:,} users, "
             f"{split.num_train:,} training interactions; machine {args.machine}", "",
             f"Command: `python examples/recommender/run_large_catalogue.py {' '.join(sys.argv[1:])}`", "",
             f"Batch: {args.batch_users} users x {args.targets_per_user} targets = "
             f"{args.batch_users * args.targets_per_user} rows per step; d={args.dim}. Metrics over ALL items, "
             f"{len(users)} test users, training items masked.", "",
             "| method | steps | s/step | s/epoch | Recall@20 | Recall@50 | NDCG@10 | note |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    fmt = lambda v, f: (f"{v:{f}}" if isinstance(v, (float, np.floating)) else str(v))
    for r in rows:
        lines.append(f"| {r['method']} | {r['steps']} | {fmt(r['step_time_s'] or '', '.3f')} | "
                     f"{fmt(r['epoch_time_s'], '.0f')} | {fmt(r.get('recall@20', ''), '.4f')} | "
                     f"{fmt(r.get('recall@50', ''), '.4f')} | {fmt(r.get('ndcg@10', ''), '.4f')} | {r['note']} |")
    if full:
        lines += ["", f"Speedup per step (IMISoftmax vs full softmax): {full['step_time_s'] / imi['step_time_s']:.1f}x "
                      "(full-softmax epoch time extrapolated)."]
    ratio = imi["recall@50"] / rand["recall@50"]
    lines += [f"Recovery: IMISoftmax Recall@50 = {imi['recall@50']:.4f}, {ratio:.0f}x the random ranking "
              f"({rand['recall@50']:.1e}) -> {'planted structure recovered' if ratio > 10 else 'NOT recovered'}."]
    text = "\n".join(lines)
    print(text)
    stem = Path(args.out) if args.out else RESULTS / f"large_catalogue_{args.machine}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(text + "\n")
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        keys = ["method", "steps", "step_time_s", "epoch_time_s", *METRIC_KEYS, "note"]
        w = csv.DictWriter(f, keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    print(f"total {time.perf_counter() - t0:.0f}s; wrote {stem}.md/.csv")
    return rows


if __name__ == "__main__":
    main()
