"""Training loop and full-catalogue evaluation for the two-tower recommender.

    python examples/recommender/train.py --data ml100k --head midx-rq --num-samples 256 --epochs 5

An epoch visits every training user once (random order, ``batch_users`` per step). Each visited user
contributes ``targets_per_user`` training rows: a target item drawn (with replacement) from the
user's training items and, as the query, the encoder over the user's *other* training items
(leave-one-out pooling, see model.UserEncoder). Users with fewer than 2 training items are skipped
in training (they have no "other" items) but are evaluated.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make "examples.recommender" importable
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "examples.recommender"

from .data import Split, load_dataset, make_split
from .metrics import metrics_from_hits, random_recall_at_k
from .model import ALL_HEADS, Recommender

METRIC_KEYS = ("recall@20", "recall@50", "ndcg@10", "ndcg@50")


@dataclass
class Config:
    data: str = "ml100k"              # ml10m | ml100k | movielens-small | path to .npz/.csv/.parquet
    data_path: Optional[str] = None
    head: str = "full"                # full | uniform | unigram | midx-pq | midx-rq | model.MIXTURE_HEADS
    num_samples: int = 256            # M
    dim: int = 64
    hidden: int = 128
    epochs: int = 5
    batch_users: int = 256
    targets_per_user: int = 4
    lr: float = 1e-3
    seed: int = 0
    split_seed: int = 0
    test_frac: float = 0.2
    refresh_every: int = 50           # IMISoftmax index rebuild interval (training steps)
    num_codewords: int = 64           # K (K*K cells)
    full_refresh_every: int = 10      # one refresh in this many rebuilds the codebooks (k-means)
    kl_refine_steps: int = 0          # Adam steps of the KL codebook refinement after each full rebuild
    kl_refine_queries: int = 4096     # recent query rows the refinement fits
    sparse: bool = False              # sparse embedding / head gradients + SparseAdam
    eval_every: int = 1               # evaluate after every n-th epoch (and always after the last)
    eval_users: Optional[int] = None  # evaluate on a fixed random subset of this many test users
    eval_chunk: int = 1024
    max_steps: Optional[int] = None   # stop after this many steps in total (smoke tests, timing)
    do_eval: bool = True              # False: timing only, no evaluation
    threads: Optional[int] = None
    progress: bool = True

    def replace(self, **kw) -> "Config":
        return dataclasses.replace(self, **kw)


@dataclass
class Result:
    config: Config
    history: List[Dict[str, float]] = field(default_factory=list)
    losses: List[float] = field(default_factory=list)  # every step's training loss
    model: Optional[Recommender] = None

    @property
    def final(self) -> Dict[str, float]:
        return self.history[-1] if self.history else {}


def _slices(indptr: np.ndarray, indices: np.ndarray, rows: np.ndarray):
    """Flat concatenation of CSR rows (EmbeddingBag input), the bag offsets and lengths."""
    starts, ends = indptr[rows], indptr[rows + 1]
    counts = ends - starts
    offsets = np.r_[0, np.cumsum(counts)[:-1]]
    flat_pos = np.repeat(starts - offsets, counts) + np.arange(counts.sum())
    return indices[flat_pos], offsets, counts


def make_batch(split: Split, users: np.ndarray, targets_per_user: int, rng: np.random.Generator) -> Dict[str, torch.Tensor]:
    hist, offsets, counts = _slices(split.train_indptr, split.train_indices, users)
    t = targets_per_user
    pos = np.floor(rng.random((len(users), t)) * counts[:, None]).astype(np.int64)
    target = hist[(offsets[:, None] + pos).reshape(-1)]
    owner = np.repeat(np.arange(len(users)), t)
    as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))
    return {"hist": as_t(hist), "offsets": as_t(offsets), "counts": as_t(counts),
            "owner": as_t(owner), "target": as_t(target)}


def eval_user_set(split: Split, eval_users: Optional[int], seed: int) -> np.ndarray:
    users = np.flatnonzero(np.diff(split.test_indptr) > 0)
    if eval_users is not None and eval_users < len(users):
        users = np.sort(np.random.default_rng(seed + 12345).choice(users, eval_users, replace=False))
    return users


@torch.no_grad()
def evaluate_scorer(score_fn, split: Split, users: np.ndarray, chunk: int = 1024, max_k: int = 50) -> Dict[str, float]:
    """Rank ALL items for each user in ``users`` with ``score_fn(users, hist, offsets, counts) -> [B, N]``,
    mask the user's training items, and average Recall@20/50, NDCG@10/50 over the users."""
    sums = {k: 0.0 for k in METRIC_KEYS}
    rand = 0.0
    n_users = 0
    for s in range(0, len(users), chunk):
        u = users[s:s + chunk]
        hist, offsets, counts = _slices(split.train_indptr, split.train_indices, u)
        scores = score_fn(u, torch.from_numpy(hist), torch.from_numpy(offsets), torch.from_numpy(counts)).float()
        rows = torch.from_numpy(np.repeat(np.arange(len(u)), counts))
        scores[rows, torch.from_numpy(hist)] = float("-inf")
        top = scores.topk(max_k, dim=-1).indices
        del scores
        test, t_off, t_cnt = _slices(split.test_indptr, split.test_indices, u)
        heldout = torch.zeros(len(u), split.num_items, dtype=torch.bool)
        heldout[torch.from_numpy(np.repeat(np.arange(len(u)), t_cnt)), torch.from_numpy(test)] = True
        hits = heldout.gather(1, top)
        n_rel = torch.from_numpy(t_cnt)
        for k, v in metrics_from_hits(hits, n_rel).items():
            sums[k] += float(v.sum())
        rand += float(random_recall_at_k(20, n_rel, split.num_items - torch.from_numpy(counts)).sum())
        n_users += len(u)
    out = {k: v / max(n_users, 1) for k, v in sums.items()}
    out["random_recall@20"] = rand / max(n_users, 1)
    out["eval_users"] = n_users
    return out


@torch.no_grad()
def evaluate(model: Recommender, split: Split, users: np.ndarray, chunk: int = 1024, max_k: int = 50) -> Dict[str, float]:
    """Metrics of ``model`` over all items for ``users`` (eval mode; training items masked)."""
    was_training = model.training
    model.eval()
    try:
        return evaluate_scorer(lambda u, hist, offsets, counts: model.head(model.user_queries(hist, offsets, counts)),
                               split, users, chunk, max_k)
    finally:
        model.train(was_training)


@torch.no_grad()
def heldout_loss(model: Recommender, split: Split, users: np.ndarray, chunk: int = 1024) -> float:
    """Exact mean cross-entropy over ALL items of the held-out interactions (query = the user's whole
    training history; the head in eval mode, so IMISoftmax computes the exact softmax): comparable
    between heads, unlike the sampled training losses."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for s in range(0, len(users), chunk):
            u = users[s:s + chunk]
            hist, offsets, counts = _slices(split.train_indptr, split.train_indices, u)
            q = model.user_queries(torch.from_numpy(hist), torch.from_numpy(offsets), torch.from_numpy(counts))
            test, _, t_cnt = _slices(split.test_indptr, split.test_indices, u)
            rows = torch.from_numpy(np.repeat(np.arange(len(u)), t_cnt))
            loss = model.head.loss(q[rows], torch.from_numpy(test))
            total += float(loss) * len(test)
            count += len(test)
    finally:
        model.train(was_training)
    return total / max(count, 1)


def build(config: Config, split: Split) -> Recommender:
    extra = {}
    if config.head != "full":
        extra["full_refresh_every"] = config.full_refresh_every
    if config.kl_refine_steps:
        extra.update(kl_refine_steps=config.kl_refine_steps, kl_refine_queries=config.kl_refine_queries)
    return Recommender(split.num_items, config.head, config.dim, config.hidden, config.num_samples,
                       item_counts=split.item_counts, refresh_every=config.refresh_every,
                       num_codewords=config.num_codewords, sparse=config.sparse, **extra)


def make_optimizers(model: Recommender, config: Config):
    if not config.sparse:
        try:  # the fused CPU/GPU Adam is several times faster on big embedding tables
            return [torch.optim.Adam(model.parameters(), lr=config.lr, fused=True)]
        except (RuntimeError, TypeError):  # pragma: no cover - older torch
            return [torch.optim.Adam(model.parameters(), lr=config.lr)]
    sparse_params = [model.encoder.item_emb.weight]
    if config.head != "full":
        sparse_params += [p for p in model.head.parameters()]
    ids = {id(p) for p in sparse_params}
    dense = [p for p in model.parameters() if id(p) not in ids]
    return [torch.optim.SparseAdam(sparse_params, lr=config.lr), torch.optim.Adam(dense, lr=config.lr)]


def train(config: Config, split: Optional[Split] = None, keep_model: bool = False, log=print) -> Result:
    """Train one model; returns per-epoch metrics (evaluated on all items) and timings.

    Same config (seed) and same machine -> identical losses and metrics.
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    if split is None:
        split = make_split(load_dataset(config.data, config.data_path), config.test_frac, config.split_seed)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = build(config, split)
    model.train()
    opts = make_optimizers(model, config)
    trainable = np.flatnonzero(np.diff(split.train_indptr) >= 2)
    steps_per_epoch = math.ceil(len(trainable) / config.batch_users)
    eval_users = eval_user_set(split, config.eval_users, config.seed)
    result = Result(config)
    cum_time, step = 0.0, 0
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    for epoch in range(1, config.epochs + 1):
        order = rng.permutation(trainable)
        it = range(steps_per_epoch)
        bar = tqdm(it, desc=f"{config.head} M={config.num_samples} ep{epoch}", leave=False,
                   disable=not config.progress, file=sys.stderr) if tqdm else it
        ep_loss, ep_steps, t0 = 0.0, 0, time.perf_counter()
        step_times = []
        for b in bar:
            ts = time.perf_counter()
            batch = make_batch(split, order[b * config.batch_users:(b + 1) * config.batch_users],
                               config.targets_per_user, rng)
            loss = model.training_loss(batch)
            for o in opts:
                o.zero_grad(set_to_none=True)
            loss.backward()
            for o in opts:
                o.step()
            lv = float(loss.detach())
            step_times.append(time.perf_counter() - ts)
            result.losses.append(lv)
            ep_loss += lv
            ep_steps += 1
            step += 1
            if tqdm and config.progress and step % 10 == 0:
                bar.set_postfix(loss=f"{lv:.3f}")
            if config.max_steps is not None and step >= config.max_steps:
                break
        ep_time = time.perf_counter() - t0
        cum_time += ep_time
        last = epoch == config.epochs or (config.max_steps is not None and step >= config.max_steps)
        row = {"epoch": epoch, "steps": step, "loss": ep_loss / max(ep_steps, 1), "epoch_time_s": ep_time,
               "step_time_s": ep_time / max(ep_steps, 1), "cum_train_time_s": cum_time,
               # the median is robust to the stalls other processes cause on a shared machine
               "step_time_median_s": float(np.median(step_times)) if step_times else float("nan")}
        if config.do_eval and (last or epoch % config.eval_every == 0):
            t1 = time.perf_counter()
            row.update(evaluate(model, split, eval_users, config.eval_chunk))
            row["eval_time_s"] = time.perf_counter() - t1
        result.history.append(row)
        if log:
            log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        if last:
            break
    if keep_model:
        result.model = model
    return result


def main(argv=None) -> Result:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        name = "--" + f.name.replace("_", "-")
        if f.type in ("bool",) or isinstance(f.default, bool):
            p.add_argument(name, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            typ = {"int": int, "float": float, "str": str}.get(str(f.type).replace("Optional[", "").rstrip("]"), str)
            p.add_argument(name, type=typ, default=f.default, choices=ALL_HEADS if f.name == "head" else None)
    args = p.parse_args(argv)
    res = train(Config(**vars(args)))
    print(json.dumps(res.final, indent=1))
    return res


if __name__ == "__main__":
    main()
