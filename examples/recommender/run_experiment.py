"""All heads x M on a data set (default ml10m) for a fixed number of epochs.

    python examples/recommender/run_experiment.py                 # ml10m, 3 epochs, ~25 min on 2 cores
    python examples/recommender/run_experiment.py --data ml100k --epochs 40 --eval-users 0

Writes results/<data>_<machine>.csv (one row per head, M and evaluated epoch), .md (final-epoch table
with the ratio to the full softmax) and .png (NDCG@10 against cumulative training time, one line per
head, one panel per M). The full softmax does not depend on M: it is trained once and shown in every
panel. Per-epoch evaluation ranks all items for a fixed random subset of test users
(--eval-users, 0 = all); the final epoch is evaluated on all test users.
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "examples.recommender"

import numpy as np
import torch

from .data import load_dataset, make_split
from .model import ALL_HEADS, HEADS, M_FREE_HEADS
from .train import Config, METRIC_KEYS, eval_user_set, evaluate, train

RESULTS = Path(__file__).resolve().parent / "results"


def default_machine() -> str:
    gpu = torch.cuda.get_device_name(0).replace(" ", "-") if torch.cuda.is_available() else None
    return gpu or f"cpu{os.cpu_count()}"


def run_grid(args) -> list:
    split = make_split(load_dataset(args.data), args.test_frac, args.split_seed)
    print(f"{split.name}: {split.num_users} users, {split.num_items} items, {split.num_train} training interactions",
          flush=True)
    base = Config(data=args.data, epochs=args.epochs, dim=args.dim, hidden=args.hidden,
                  batch_users=args.batch_users, targets_per_user=args.targets_per_user, lr=args.lr,
                  seed=args.seed, split_seed=args.split_seed, test_frac=args.test_frac,
                  refresh_every=args.refresh_every, num_codewords=args.num_codewords,
                  eval_users=args.eval_users or None, eval_every=1, threads=args.threads,
                  progress=not args.no_progress)
    all_users = eval_user_set(split, None, args.seed)
    rows = []
    runs = [(h, m) for h in args.heads for m in ([0] if h in M_FREE_HEADS else args.num_samples)]
    for n, (head, m) in enumerate(runs, 1):
        cfg = base.replace(head=head, num_samples=max(m, 1))
        t0 = time.perf_counter()
        res = train(cfg, split, keep_model=True, log=None)
        final_all = evaluate(res.model, split, all_users, cfg.eval_chunk) if args.eval_users else None
        for h in res.history:
            row = {"data": split.name, "head": head, "M": m or "", "epoch": h["epoch"], "steps": h["steps"],
                   "loss": h["loss"], "epoch_time_s": h["epoch_time_s"], "step_time_s": h["step_time_s"],
                   "step_time_median_s": h.get("step_time_median_s", ""),
                   "cum_train_time_s": h["cum_train_time_s"], "eval_users": h.get("eval_users", ""),
                   **{k: h.get(k, "") for k in METRIC_KEYS}}
            rows.append(row)
        if final_all is not None:
            rows.append({**rows[-1], "eval_users": final_all["eval_users"], **{k: final_all[k] for k in METRIC_KEYS},
                         "final_all_users": 1})
        f = rows[-1]
        print(f"[{n}/{len(runs)}] {head:8s} M={m or '-':>3} epochs={args.epochs} "
              f"ndcg@10={f['ndcg@10']:.4f} recall@20={f['recall@20']:.4f} "
              f"s/epoch={f['cum_train_time_s'] / len(res.history):.1f} wall={time.perf_counter() - t0:.0f}s", flush=True)
    return rows


def read_rows(paths) -> list:
    """Rows of write_outputs' CSVs, numbers parsed back."""
    rows = []
    for path in paths:
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                for k, v in r.items():
                    if k not in ("data", "head") and v != "":
                        r[k] = float(v) if any(c in v for c in ".eEn") else int(v)
                r["final_all_users"] = r.get("final_all_users") or ""
                rows.append(r)
    return rows


def final_rows(rows):
    out = {}
    for r in rows:  # the last row of each run is its final evaluation (all users when requested)
        out[(r["head"], r["M"])] = r
    return out


def write_outputs(rows, stem: Path, args) -> str:
    stem.parent.mkdir(parents=True, exist_ok=True)
    keys = ["data", "head", "M", "epoch", "steps", "loss", "epoch_time_s", "step_time_s", "step_time_median_s",
            "cum_train_time_s",
            "eval_users", *METRIC_KEYS, "final_all_users"]
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in ((k, r.get(k, "")) for k in keys)})
    fin = final_rows(rows)
    full = fin.get(("full", ""))
    lines = [f"# {rows[0]['data']}: {args.epochs} epochs, machine {args.machine}", "",
             f"Command: `python examples/recommender/run_experiment.py {' '.join(sys.argv[1:])}`", "",
             f"Final metrics over ALL items (training items masked), on {fin[next(iter(fin))]['eval_users']} test users; "
             "s/epoch = mean training time per epoch (evaluation excluded); "
             "ms/step = median step time of the last epoch (robust to stalls caused by other processes on a shared machine).", "",
             "| head | M | NDCG@10 | vs full | NDCG@50 | Recall@20 | Recall@50 | s/epoch | ms/step (median) | final loss |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for (head, m), r in fin.items():
        ratio = f"{r['ndcg@10'] / full['ndcg@10']:.3f}" if full else ""
        lines.append(f"| {head} | {m or '-'} | {r['ndcg@10']:.4f} | {ratio} | {r['ndcg@50']:.4f} | {r['recall@20']:.4f} | "
                     f"{r['recall@50']:.4f} | {r['cum_train_time_s'] / r['epoch']:.1f} | {1000 * r['step_time_median_s']:.0f} | {r['loss']:.3f} |")
    verdict = goal_check(fin)
    lines += ["", verdict, ""]
    text = "\n".join(lines)
    stem.with_suffix(".md").write_text(text)
    plot(rows, stem.with_suffix(".png"), args)
    return text


def goal_check(fin) -> str:
    full = fin.get(("full", ""))
    rq = fin.get(("midx-rq", 256))
    if not (full and rq):
        return "Goal check skipped (needs full and midx-rq at M=256)."
    ratio = rq["ndcg@10"] / full["ndcg@10"]
    parts = [f"Goal: midx-rq M=256 NDCG@10 = {ratio:.1%} of full ({'met' if ratio >= 0.97 else 'NOT met'}, target >= 97%)"]
    for other in ("uniform", "unigram"):
        o = fin.get((other, 256))
        if o:
            parts.append(f"vs {other} M=256: {rq['ndcg@10']:.4f} vs {o['ndcg@10']:.4f} "
                         f"({'beats' if rq['ndcg@10'] > o['ndcg@10'] else 'does NOT beat'})")
    return "; ".join(parts) + "."


def plot(rows, path: Path, args) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        print("matplotlib missing: no plot")
        return
    ms = sorted({r["M"] for r in rows if r["M"] != ""}) or [""]
    fig, axes = plt.subplots(1, len(ms), figsize=(5 * len(ms), 4), sharey=True, squeeze=False)
    for ax, m in zip(axes[0], ms):
        for head in args.heads:
            pts = [r for r in rows if r["head"] == head and (head in M_FREE_HEADS or r["M"] == m)
                   and not r.get("final_all_users")]
            if pts:
                ax.plot([r["cum_train_time_s"] for r in pts], [r["ndcg@10"] for r in pts], marker="o",
                        label=head, linestyle="--" if head in M_FREE_HEADS else "-")
        ax.set_title(f"{rows[0]['data']}, M={m}")
        ax.set_xlabel("cumulative training time (s)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"NDCG@10 ({args.eval_users or 'all'} eval users)")
    axes[0][-1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="ml10m")
    p.add_argument("--heads", nargs="+", default=list(HEADS), choices=ALL_HEADS)
    p.add_argument("--num-samples", nargs="+", type=int, default=[32, 128, 256])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--batch-users", type=int, default=256)
    p.add_argument("--targets-per-user", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--refresh-every", type=int, default=50)
    p.add_argument("--num-codewords", type=int, default=64)
    p.add_argument("--eval-users", type=int, default=10000, help="per-epoch evaluation subset (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--test-frac", type=float, default=0.2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--machine", default=default_machine())
    p.add_argument("--out", default=None, help="output stem (default results/<data>_<machine>)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--from-csv", nargs="+", default=None,
                   help="write the table and plot from these CSVs of earlier runs (e.g. parts of the grid run "
                        "as parallel processes; every run is seeded on its own, so the metrics are the same)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    rows = read_rows(args.from_csv) if args.from_csv else run_grid(args)
    stem = Path(args.out) if args.out else RESULTS / f"{rows[0]['data']}_{args.machine}"
    print(write_outputs(rows, stem, args))
    print(f"total wall time {time.perf_counter() - t0:.0f}s; wrote {stem}.csv/.md/.png")


if __name__ == "__main__":
    main()
