"""In-batch-negative training with random vs clustered batches (issue 13, part 4).

    python examples/recommender/inbatch.py                      # ml10m, 10 epochs, 4 runs
    python examples/recommender/inbatch.py --data ml100k --epochs 20 --batch-users 64

Model: the recommender's user tower (model.UserEncoder, leave-one-out pooling) and an item table V
[N, d]. A step takes a batch of B users, one training item per user as its target, and trains the
plain in-batch softmax: row r scores the B targets of the batch, logits[r, j] = q_r . v_{t_j}
(minus log p(t_j), the item's training frequency, with ``logq``: the popularity correction of
Yi et al. 2019, which is only an approximation of the in-batch inclusion law, and a worse one for
clustered batches); a column whose item equals the row's own target (j != r) is masked
(accidental hit). Loss: cross-entropy with the diagonal as label.

Batches: ``imi_softmax.data.ClusteredBatchSampler`` over the users' current queries (the user
tower over each user's whole training history, recomputed every epoch), with ``random_fraction``
1.0 (plain shuffled batches: "random"), 0.0 ("clustered") or in between ("mixed"): the same code
path for every arm. Evaluation: NDCG@10 / Recall@20 over ALL items (training items masked) after
every epoch on a fixed subset of test users, and on all test users after the last.

Writes results/inbatch_<data>_<machine>.{csv,md,png}.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "examples.recommender"

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from imi_softmax.data import ClusteredBatchSampler

from .data import load_dataset, make_split
from .model import UserEncoder
from .report import write_csv
from .train import _slices, eval_user_set, evaluate_scorer

RESULTS = Path(__file__).resolve().parent / "results"
ARMS = {"random": 1.0, "mixed": 0.5, "clustered": 0.0}


class InBatchModel(nn.Module):
    def __init__(self, num_items: int, dim: int, hidden: int):
        super().__init__()
        self.encoder = UserEncoder(num_items, dim, hidden)
        self.items = nn.Parameter(torch.randn(num_items, dim) * 0.1)

    def loss(self, batch, log_freq=None) -> torch.Tensor:
        q = self.encoder(batch["hist"], batch["offsets"], batch["counts"], batch["owner"], batch["target"])
        t = batch["target"]
        logits = q @ self.items[t].T                                  # [B, B]
        if log_freq is not None:
            logits = logits - log_freq[t].unsqueeze(0)
        hit = (t.unsqueeze(1) == t.unsqueeze(0)) & ~torch.eye(t.shape[0], dtype=torch.bool)
        logits = logits.masked_fill(hit, float("-inf"))
        return F.cross_entropy(logits, torch.arange(t.shape[0]))

    @torch.no_grad()
    def scores(self, users, hist, offsets, counts) -> torch.Tensor:
        return self.encoder(hist, offsets, counts) @ self.items.T


def user_batch(split, users: np.ndarray, rng: np.random.Generator):
    hist, offsets, counts = _slices(split.train_indptr, split.train_indices, users)
    pos = np.floor(rng.random(len(users)) * counts).astype(np.int64)
    as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))  # noqa: E731
    return {"hist": as_t(hist), "offsets": as_t(offsets), "counts": as_t(counts),
            "owner": torch.arange(len(users)), "target": as_t(hist[offsets + pos])}


def run_arm(split, arm: str, fraction: float, logq: bool, a, eval_users, all_users, log=print):
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    model = InBatchModel(split.num_items, a.dim, a.hidden)
    opt = torch.optim.Adam(model.parameters(), lr=a.lr)
    trainable = np.flatnonzero(np.diff(split.train_indptr) >= 2)
    hist, offsets, counts = (torch.from_numpy(v) for v in _slices(split.train_indptr, split.train_indices, trainable))
    freq = torch.as_tensor(split.item_counts, dtype=torch.float32).clamp_min(1)
    log_freq = (freq / freq.sum()).log() if logq else None

    @torch.no_grad()
    def user_queries():  # the current user tower over each trainable user's whole history
        was = model.training
        model.eval()
        try:
            return model.encoder(hist, offsets, counts)
        finally:
            model.train(was)

    sampler = ClusteredBatchSampler(user_queries, a.batch_users, num_clusters=a.num_clusters,
                                    random_fraction=fraction, refresh_every=1, drop_last=True, seed=a.seed)
    rows, cum = [], 0.0
    for epoch in range(1, a.epochs + 1):
        t0 = time.perf_counter()
        sampler.set_epoch(epoch - 1)  # re-clusters from the current towers at the epoch's start
        losses = []
        for idx in sampler:
            batch = user_batch(split, trainable[idx], rng)
            loss = model.loss(batch, log_freq)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss))
        cum += time.perf_counter() - t0
        last = epoch == a.epochs
        users = all_users if last else eval_users
        model.eval()
        m = evaluate_scorer(model.scores, split, users)
        model.train()
        row = {"arm": arm, "random_fraction": fraction, "logq": int(logq), "epoch": epoch,
               "loss": float(np.mean(losses)), "cum_train_time_s": cum, "eval_users": m["eval_users"],
               "ndcg@10": m["ndcg@10"], "recall@20": m["recall@20"], "ndcg@50": m["ndcg@50"]}
        rows.append(row)
        if log:
            log(f"{arm:9s} logq={int(logq)} epoch {epoch}: loss {row['loss']:.3f} ndcg@10 {row['ndcg@10']:.4f} "
                f"recall@20 {row['recall@20']:.4f} ({m['eval_users']} users) train {cum:.0f}s")
    return rows


def write(rows, stem: Path, a, info: str):
    stem.parent.mkdir(parents=True, exist_ok=True)
    keys = list(rows[0])
    write_csv(stem.with_suffix(".csv"), rows, keys)
    finals = {}
    for r in rows:
        finals[(r["arm"], r["logq"])] = r
    lines = [f"# In-batch negatives, random vs clustered batches: {rows[0].get('data', a.data)}", "",
             f"Command: `python examples/recommender/inbatch.py {' '.join(sys.argv[1:])}`; {info}", "",
             f"B = {a.batch_users} users per batch (B - 1 in-batch negatives), {a.epochs} epochs, "
             f"{a.num_clusters or 'N/B'} clusters re-fitted every epoch. NDCG@10 / Recall@20 over all items on all "
             "test users after the last epoch; NDCG@10 per epoch (subset) in the CSV and the plot.", "",
             "| batches | random fraction | logQ | NDCG@10 | Recall@20 | NDCG@50 | train s |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for (arm, logq), r in finals.items():
        lines.append(f"| {arm} | {r['random_fraction']} | {'yes' if logq else 'no'} | {r['ndcg@10']:.4f} | "
                     f"{r['recall@20']:.4f} | {r['ndcg@50']:.4f} | {r['cum_train_time_s']:.0f} |")
    text = "\n".join(lines) + "\n"
    stem.with_suffix(".md").write_text(text)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        for (arm, logq) in finals:
            pts = [r for r in rows if r["arm"] == arm and r["logq"] == logq]
            ax.plot([r["epoch"] for r in pts], [r["ndcg@10"] for r in pts], marker="o",
                    label=f"{arm}{' + logQ' if logq else ''}", linestyle="-" if logq else "--")
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"NDCG@10 ({a.eval_users} eval users; last epoch: all)")
        ax.set_title(f"in-batch softmax, B = {a.batch_users}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(stem.with_suffix(".png"), dpi=110)
        plt.close(fig)
    except ImportError:  # pragma: no cover
        pass
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="ml10m")
    p.add_argument("--arms", nargs="+", default=["random", "mixed", "clustered"], choices=list(ARMS))
    p.add_argument("--logq", nargs="+", type=int, default=[1], choices=[0, 1])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-users", type=int, default=512)
    p.add_argument("--num-clusters", type=int, default=None, help="default: users / batch (one batch each)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-users", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    split = make_split(load_dataset(a.data), 0.2, 0)
    eval_users = eval_user_set(split, a.eval_users or None, a.seed)
    all_users = eval_user_set(split, None, a.seed)
    load0 = os.getloadavg()[0]
    rows = []
    for logq in a.logq:
        for arm in a.arms:
            rows += [dict(data=split.name, **r) for r in run_arm(split, arm, ARMS[arm], bool(logq), a, eval_users, all_users)]
    info = (f"{torch.get_num_threads()} threads, load {load0:.2f} -> {os.getloadavg()[0]:.2f}, "
            f"{os.cpu_count()} cores")
    stem = Path(a.out) if a.out else RESULTS / f"inbatch_{split.name}_cpu{os.cpu_count()}"
    print(write(rows, stem, a, info))
    print(f"wrote {stem}.csv/.md/.png")


if __name__ == "__main__":
    main()
