"""Train a small retrieval model on MovieLens-10M with the FULL softmax and save its item embeddings.

The saved model is the "trained embeddings" case of ``proposal_quality.py``.

Model (a Mult-DAE-style two-tower retrieval model, Liang et al. 2018):
  user query  h_u = mean of the input item embeddings E[j] over the user's training history
                    (input dropout 0.5 during training), E: [num_items, d]
  item side   logits = h_u W^T + b, W: [num_items, d], b: [num_items] (nn.Linear layout)
  loss        multinomial log-likelihood of the user's training items under the FULL softmax over
              all items: -sum_{i in hist(u)} log softmax(logits)_i, averaged over users.
Data: a random 80/20 per-user holdout (fixed seed); recall@20 on held-out items (training items
masked) is printed for a sample of users as a sanity check of the model.

Saves ``bench/results/reference_model_ml10m.pt`` with: weight [N, d], bias [N], item_counts [N]
(training interactions per item), queries [S, d] (h_u of S users, eval mode), query_targets [S] (one
held-out item per sampled user), user_ids [S], and metadata (epochs, losses, recall@20, seed).

    python bench/train_reference_model.py [--data ../shared/data/ml10m.npz] [--epochs 10] [--d 64]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)


def load_split(path: str, holdout: float, seed: int):
    z = np.load(path)
    users, items = z["user"].astype(np.int64), z["item"].astype(np.int64)
    num_users, num_items = (int(v) for v in z["shape"])
    rng = np.random.default_rng(seed)
    # random per-user holdout: each interaction goes to test with prob `holdout`, but every user
    # keeps at least one training item
    is_test = rng.random(users.shape[0]) < holdout
    order = np.lexsort((rng.random(users.shape[0]), users))
    first = np.ones(users.shape[0], dtype=bool)
    first[1:] = users[order][1:] != users[order][:-1]
    is_test[order[first]] = False
    train = sp.csr_matrix((np.ones((~is_test).sum(), np.float32), (users[~is_test], items[~is_test])),
                          shape=(num_users, num_items))
    test = sp.csr_matrix((np.ones(is_test.sum(), np.float32), (users[is_test], items[is_test])),
                         shape=(num_users, num_items))
    train.data[:] = 1.0
    test.data[:] = 1.0
    return train, test, num_users, num_items


class RetrievalModel(nn.Module):
    def __init__(self, num_items: int, d: int, dropout: float = 0.5):
        super().__init__()
        self.item_in = nn.Parameter(torch.randn(num_items, d) * 0.05)    # E: history encoder
        self.out = nn.Linear(d, num_items)                                # W, b: the softmax head
        self.dropout = dropout

    def query(self, hist: torch.Tensor) -> torch.Tensor:
        """hist: [B, N] 0/1 training history -> h_u [B, d] (mean of E over the history)."""
        if self.training and self.dropout > 0:
            hist = hist * (torch.rand_like(hist) >= self.dropout)
        cnt = hist.sum(1, keepdim=True).clamp_min(1.0)
        return (hist @ self.item_in) / cnt

    def forward(self, hist: torch.Tensor) -> torch.Tensor:
        logits = self.out(self.query(hist))
        return -(hist * F.log_softmax(logits, dim=-1)).sum(1).mean()      # full softmax, multi-target


def dense_rows(m: sp.csr_matrix, rows: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(m[rows].toarray())


@torch.no_grad()
def recall_at_k(model, train, test, users, k=20, batch=1024):
    model.eval()
    hits, total = 0.0, 0
    for s in range(0, len(users), batch):
        u = users[s:s + batch]
        hist = dense_rows(train, u)
        logits = model.out(model.query(hist))
        logits[hist > 0] = -float("inf")
        top = logits.topk(k, dim=1).indices.numpy()
        t = test[u]
        for r in range(len(u)):
            pos = t.indices[t.indptr[r]:t.indptr[r + 1]]
            if len(pos) == 0:
                continue
            hits += np.isin(top[r], pos).sum() / min(k, len(pos))
            total += 1
    model.train()
    return hits / max(total, 1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "ml10m.npz"))
    p.add_argument("--out", default=os.path.join(HERE, "results", "reference_model_ml10m.pt"))
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--holdout", type=float, default=0.2)
    p.add_argument("--num-queries", type=int, default=2048, help="user query vectors saved")
    p.add_argument("--max-minutes", type=float, default=6.0, help="stop training after this long")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    torch.manual_seed(a.seed)
    t_start = time.time()
    train, test, num_users, num_items = load_split(a.data, a.holdout, a.seed)
    print(f"{os.path.basename(a.data)}: {num_users} users, {num_items} items, "
          f"{train.nnz} train / {test.nnz} test interactions")
    rng = np.random.default_rng(a.seed)
    eval_users = rng.choice(num_users, size=min(5000, num_users), replace=False)
    eval_users = eval_users[np.diff(test.indptr)[eval_users] > 0]
    model = RetrievalModel(num_items, a.d)
    opt = torch.optim.Adam(model.parameters(), lr=a.lr)
    losses, recalls = [], []
    epochs_done = 0
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    for epoch in range(a.epochs):
        perm = rng.permutation(num_users)
        batches = range(0, num_users, a.batch)
        it = tqdm(batches, desc=f"epoch {epoch + 1}/{a.epochs}", leave=False) if tqdm else batches
        tot, nb = 0.0, 0
        for s in it:
            hist = dense_rows(train, perm[s:s + a.batch])
            loss = model(hist)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += loss.item()
            nb += 1
        epochs_done += 1
        losses.append(tot / nb)
        recalls.append(recall_at_k(model, train, test, eval_users))
        print(f"epoch {epoch + 1}: train loss/user {losses[-1]:.2f}  recall@20 {recalls[-1]:.4f}  "
              f"({time.time() - t_start:.0f}s)", flush=True)
        if (time.time() - t_start) / 60 > a.max_minutes:
            print(f"stopping after {epochs_done} epochs (--max-minutes {a.max_minutes})")
            break

    # query sample: users with at least one held-out item; target = one random held-out item
    model.eval()
    cand = np.flatnonzero(np.diff(test.indptr) > 0)
    users = np.sort(rng.choice(cand, size=min(a.num_queries, len(cand)), replace=False))
    with torch.no_grad():
        queries = model.query(dense_rows(train, users))
    targets = np.array([rng.choice(test.indices[test.indptr[u]:test.indptr[u + 1]]) for u in users])
    item_counts = torch.from_numpy(np.asarray(train.sum(0)).ravel().astype(np.int64))
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    torch.save({
        "weight": model.out.weight.detach().clone(),
        "bias": model.out.bias.detach().clone(),
        "item_counts": item_counts,
        "queries": queries.clone(),
        "query_targets": torch.from_numpy(targets).long(),
        "user_ids": torch.from_numpy(users).long(),
        "meta": {"data": os.path.basename(a.data), "d": a.d, "epochs": epochs_done, "train_loss": losses,
                 "recall_at_20": recalls, "seed": a.seed, "holdout": a.holdout, "batch": a.batch, "lr": a.lr,
                 "model": "mean-of-history user tower, full-softmax multinomial likelihood (Mult-DAE style)",
                 "train_seconds": time.time() - t_start, "torch": torch.__version__},
    }, a.out)
    print(f"wrote {a.out}: weight {tuple(model.out.weight.shape)}, {len(users)} queries, "
          f"final recall@20 {recalls[-1]:.4f}")


if __name__ == "__main__":
    main()
