"""Multi-label training on ML-10M: "predict all of a user's held-out items".

    python examples/multilabel/run.py                       # full vs uniform vs MIDX, 3 epochs each
    python examples/multilabel/run.py --epochs 1 --eval-users 2000   # quicker

Each user is one multi-label example. Data: a random 80/20 per-user holdout (examples/recommender
data loaders, split seed 0). Input: the user's training items, encoded as the mean of item
embeddings plus an MLP (examples/recommender's UserEncoder). Training: each epoch re-splits every
user's training items at random into an input part (80%) and a label part (20%, at most
--max-labels labels a row), so the model learns to complete a history without seeing the test
items. Evaluation: input = all of the user's training items, labels = the held-out 20%; all items
are ranked with the training items masked; P@k and nDCG@k (k = 5, 10) from imi_softmax.metrics.

Heads (equal epochs, same encoder, same seed):
  full     the exact multi-label softmax loss (imi_softmax.chunked.chunked_multilabel_loss: every
           item is a negative, the row's other positives excluded);
  uniform  IMISoftmax(sampler="uniform"), M negatives, multi-label sampled loss;
  midx     IMISoftmax(sampler="midx", quantizer="rq"), M negatives, multi-label sampled loss.
Writes results/ml10m_multilabel_<machine>.csv and .md (machine, threads, load, commit recorded).
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "examples.multilabel"

import numpy as np
import torch
import torch.nn as nn

from imi_softmax import IMISoftmax, metrics
from imi_softmax.chunked import chunked_multilabel_loss

from ..recommender.data import Split, load_dataset, make_split
from ..recommender.model import UserEncoder

RESULTS = Path(__file__).resolve().parent / "results"
HEADS = ("full", "uniform", "midx")
KS = (5, 10)


class Model(nn.Module):
    """User encoder + output layer (an IMISoftmax; the "full" head uses only its weight and bias)."""

    def __init__(self, kind: str, num_items: int, dim: int, hidden: int, num_samples: int, refresh_every: int,
                 num_codewords: int):
        super().__init__()
        self.kind = kind
        self.encoder = UserEncoder(num_items, dim, hidden)
        sampler = "midx" if kind == "midx" else "uniform"
        self.head = IMISoftmax(dim, num_items, num_samples=num_samples, sampler=sampler, quantizer="rq",
                               num_codewords=num_codewords, refresh_every=refresh_every)

    def loss(self, hist, offsets, counts, positives: torch.Tensor) -> torch.Tensor:
        q = self.encoder(hist, offsets, counts)
        if self.kind == "full":
            return chunked_multilabel_loss(q, self.head.weight, self.head.bias, positives,
                                           chunk_size=self.head.num_classes)
        pad = self.head.ignore_index
        return self.head(q, torch.where(positives < 0, torch.full_like(positives, pad), positives))


def _as_long(a) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))


def training_batch(split: Split, users: np.ndarray, rng: np.random.Generator, label_frac: float, max_labels: int):
    """Per user: a random label_frac of the training items (at least 1, at most max_labels) as the
    padded positives [B, L] (-1 pads), the rest as the input bag. Users with < 2 items are skipped."""
    hist, offs, counts, rows = [], [], [], []
    start = 0
    for u in users:
        items = split.train_indices[split.train_indptr[u]:split.train_indptr[u + 1]]
        if len(items) < 2:
            continue
        perm = rng.permutation(items)
        n_lab = min(max(1, int(round(label_frac * len(items)))), max_labels, len(items) - 1)
        rows.append(perm[:n_lab])
        bag = perm[n_lab:]
        hist.append(bag)
        offs.append(start)
        counts.append(len(bag))
        start += len(bag)
    width = max(len(r) for r in rows)
    positives = np.full((len(rows), width), -1, dtype=np.int64)
    for i, r in enumerate(rows):
        positives[i, :len(r)] = r
    return _as_long(np.concatenate(hist)), _as_long(offs), _as_long(counts), _as_long(positives)


@torch.no_grad()
def evaluate(model: Model, split: Split, users: np.ndarray, chunk: int = 2048) -> dict:
    """Mean P@k and nDCG@k over ``users``: all items ranked, training items masked, the held-out
    items as the label set (CSR target)."""
    model.eval()
    sums = {f"{m}@{k}": 0.0 for m in ("P", "nDCG") for k in KS}
    for s in range(0, len(users), chunk):
        u = users[s:s + chunk]
        tr = [split.train_indices[split.train_indptr[x]:split.train_indptr[x + 1]] for x in u]
        te = [split.test_indices[split.test_indptr[x]:split.test_indptr[x + 1]] for x in u]
        counts = np.array([len(t) for t in tr])
        q = model.encoder(_as_long(np.concatenate(tr)), _as_long(np.r_[0, np.cumsum(counts)[:-1]]), _as_long(counts))
        scores = model.head(q)
        rows = np.repeat(np.arange(len(u)), counts)
        scores[_as_long(rows), _as_long(np.concatenate(tr))] = -float("inf")
        top = scores.topk(max(KS), dim=1).indices
        target = (_as_long(np.r_[0, np.cumsum([len(t) for t in te])]), _as_long(np.concatenate(te)))
        for k in KS:
            sums[f"P@{k}"] += float(metrics.precision_at_k(top, target, k).sum())
            sums[f"nDCG@{k}"] += float(metrics.ndcg_at_k(top, target, k).sum())
    model.train()
    return {k: v / len(users) for k, v in sums.items()}


def train_one(kind: str, split: Split, eval_users: np.ndarray, args, log=print) -> dict:
    torch.manual_seed(args.seed)
    model = Model(kind, split.num_items, args.dim, args.hidden, args.num_samples, args.refresh_every,
                  args.num_codewords)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    rng = np.random.default_rng(args.seed)
    users = np.flatnonzero(np.diff(split.train_indptr) >= 2)
    step_times, losses, train_s = [], [], 0.0
    for epoch in range(args.epochs):
        order = rng.permutation(users)
        epoch_times = []
        t_epoch = time.perf_counter()
        for s in range(0, len(order), args.batch_users):
            batch = training_batch(split, order[s:s + args.batch_users], rng, args.label_frac, args.max_labels)
            t0 = time.perf_counter()
            loss = model.loss(*batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            epoch_times.append(time.perf_counter() - t0)
            losses.append(float(loss.detach()))
            if args.max_steps and len(epoch_times) >= args.max_steps:
                break
        train_s += time.perf_counter() - t_epoch
        step_times = epoch_times
        log(f"  {kind} epoch {epoch + 1}: loss {np.mean(losses[-len(epoch_times):]):.4f}, "
            f"{time.perf_counter() - t_epoch:.1f} s, median step {1e3 * np.median(epoch_times):.0f} ms")
    res = evaluate(model, split, eval_users)
    return {"head": kind, "M": "-" if kind == "full" else args.num_samples, "epochs": args.epochs, **res,
            "s/epoch": train_s / args.epochs, "ms/step (median)": 1e3 * float(np.median(step_times)),
            "final loss": float(np.mean(losses[-len(step_times):]))}


def machine() -> str:
    return torch.cuda.get_device_name(0).replace(" ", "-") if torch.cuda.is_available() else f"cpu{os.cpu_count()}"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except Exception:  # noqa: BLE001  (not a git checkout)
        return "unknown"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="ml10m")
    p.add_argument("--heads", nargs="+", default=list(HEADS), choices=HEADS)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--num-samples", type=int, default=256)
    p.add_argument("--num-codewords", type=int, default=32)
    p.add_argument("--refresh-every", type=int, default=50)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--batch-users", type=int, default=512)
    p.add_argument("--label-frac", type=float, default=0.2)
    p.add_argument("--max-labels", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-users", type=int, default=10000, help="random test users evaluated (0: all)")
    p.add_argument("--max-steps", type=int, default=0, help="stop each epoch after this many steps (smoke runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="output stem (default results/<data>_multilabel_<machine>)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    split = make_split(load_dataset(args.data), 0.2, 0)
    eval_users = np.flatnonzero(np.diff(split.test_indptr) > 0)
    if args.eval_users and args.eval_users < len(eval_users):
        eval_users = np.sort(np.random.default_rng(12345).choice(eval_users, args.eval_users, replace=False))
    load_before = os.getloadavg()
    print(f"{split.name}: {split.num_users} users, {split.num_items} items; {len(eval_users)} evaluated users; "
          f"load {load_before[0]:.2f}", flush=True)
    rows = []
    for kind in args.heads:
        rows.append(train_one(kind, split, eval_users, args))
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()}, flush=True)
    load_after = os.getloadavg()
    stem = Path(args.out) if args.out else RESULTS / f"{split.name}_multilabel_{machine()}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cmd = "python examples/multilabel/run.py" + ("" if argv is None and len(sys.argv) == 1 else " " + " ".join(
        sys.argv[1:] if argv is None else argv))
    keys = ["P@5", "P@10", "nDCG@5", "nDCG@10", "s/epoch", "ms/step (median)", "final loss"]
    lines = [f"# {split.name}: multi-label \"predict all held-out items\", {args.epochs} epochs, machine {machine()}",
             "", f"Command: `{cmd}`", "",
             f"{len(eval_users)} test users (random, seed 12345), all {split.num_items} items ranked, training items "
             f"masked. torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
             f"commit {commit()}, load average (1 min) {load_before[0]:.2f} before / {load_after[0]:.2f} after "
             "(a shared machine: timings are noisy; re-measure on a quiet one).", "",
             "| head | M | " + " | ".join(keys) + " |", "| --- | ---: | " + " | ".join("---:" for _ in keys) + " |"]
    for r in rows:
        lines.append(f"| {r['head']} | {r['M']} | " + " | ".join(
            f"{r[k]:.4f}" if k.startswith(("P@", "nDCG")) else f"{r[k]:.1f}" if k != "final loss" else f"{r[k]:.3f}"
            for k in keys) + " |")
    text = "\n".join(lines) + "\n"
    stem.with_suffix(".md").write_text(text)
    print(text)
    return rows


if __name__ == "__main__":
    main()
