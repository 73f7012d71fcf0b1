"""Training loop of the stale-cache two-tower example (one configuration: T, corrector on/off).

Per step: ``StaleEmbeddingIndex.begin_step`` refreshes the cache (encodes the catalogue) when T steps
have passed, or, with a corrector, rebuilds the MIDX index over corrector(cache) every
``correct_every`` steps; negatives are drawn from that index with their exact log Q; the item encoder
runs on the unique target + drawn items only (imi_softmax.stale.fresh_sampled_softmax_loss); the
corrector then takes one step on (cache[those items] -> their fresh vectors).

Every ``probe_every`` steps, before training on the step, the proposal is measured against the exact
softmax of the CURRENT model on fixed probe users: KL(P || Q) (imi_softmax.diagnose.proposal_divergence,
P over all items with fresh item vectors, Q the index the step samples from).
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Dict, List, Optional

import numpy as np
import torch

from imi_softmax import MIDXSampler
from imi_softmax.diagnose import proposal_divergence
from imi_softmax.stale import EmbeddingCorrector, StaleEmbeddingIndex, fresh_sampled_softmax_loss

from ..recommender.data import Split
from ..recommender.train import _slices, eval_user_set, evaluate_scorer, make_batch
from .features import item_features
from .model import TwoTower


@dataclass
class StaleConfig:
    refresh_every: int = 500          # T: steps between cache refreshes
    corrector: bool = False
    reset_on_refresh: bool = False    # corrector back to the identity at each refresh
    correct_every: int = 25           # steps between index rebuilds over corrector(cache)
    corrector_lr: float = 1e-3
    corrector_hidden: int = 128
    num_samples: int = 32             # M
    num_codewords: int = 32           # K (K*K cells)
    kmeans_iters: int = 5
    dim: int = 64
    feature_dim: int = 64
    epochs: int = 1
    batch_users: int = 32
    targets_per_user: int = 2
    lr: float = 1e-3
    seed: int = 0
    probe_users: int = 256
    probe_every: int = 50
    eval_users: Optional[int] = None  # None: every test user
    max_steps: Optional[int] = None
    progress: bool = True

    def replace(self, **kw) -> "StaleConfig":
        return replace(self, **kw)

    @property
    def label(self) -> str:
        kind = ("corrector+reset" if self.reset_on_refresh else "corrector") if self.corrector else "stale"
        return f"T={self.refresh_every} {kind}"


def _probe_batch(split: Split, users: np.ndarray):
    hist, offsets, counts = _slices(split.train_indptr, split.train_indices, users)
    return torch.from_numpy(hist), torch.from_numpy(offsets), torch.from_numpy(counts)


@torch.no_grad()
def probe(model: TwoTower, index: StaleEmbeddingIndex, batch) -> Dict[str, float]:
    """KL(P || Q) and the ESS bound on the probe users, and how far the (corrected) cache is from the
    current item vectors (mean squared error over all items)."""
    q = model.user(*batch)
    w = model.item.encode_all()
    d = proposal_divergence(index.sampler, w, None, q)
    out = {"kl": float(d["kl"].mean()), "ess_limit": float(d["ess_fraction_limit"].mean()),
           "cache_mse": float((index.cache - w).pow(2).mean())}
    if index.corrector is not None:
        out["corrected_mse"] = float((index.corrector(index.cache) - w).pow(2).mean())
    return out


def train_stale(cfg: StaleConfig, split: Split, log=print) -> Dict[str, object]:
    """Train one configuration; returns probes (per probed step), per-step timings and final metrics."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    feats = torch.from_numpy(item_features(split.train_indptr, split.train_indices, split.num_items,
                                           cfg.feature_dim, seed=cfg.seed + 1))
    model = TwoTower(feats, cfg.dim)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    corrector = EmbeddingCorrector(cfg.dim, cfg.corrector_hidden, lr=cfg.corrector_lr) if cfg.corrector else None
    index = StaleEmbeddingIndex(MIDXSampler(cfg.num_codewords, "rq", kmeans_iters=cfg.kmeans_iters, seed=cfg.seed),
                                cfg.refresh_every, corrector, cfg.correct_every,
                                cfg.reset_on_refresh)
    gen = torch.Generator().manual_seed(cfg.seed)
    trainable = np.flatnonzero(np.diff(split.train_indptr) >= 2)
    probe_users = np.sort(np.random.default_rng(cfg.seed + 7).choice(trainable, cfg.probe_users, replace=False))
    pbatch = _probe_batch(split, probe_users)
    steps_per_epoch = math.ceil(len(trainable) / cfg.batch_users)
    total = steps_per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    bar = tqdm(total=total, desc=cfg.label, leave=False, disable=not cfg.progress, file=sys.stderr) if tqdm else None
    probes: List[Dict[str, float]] = []
    step_s, index_s, encoded, losses, corr_err = [], [], [], [], []
    step = 0
    model.train()
    t_start = time.perf_counter()
    for epoch in range(cfg.epochs):
        order = rng.permutation(trainable)
        for b in range(steps_per_epoch):
            if step >= total:
                break
            t0 = time.perf_counter()
            action = index.begin_step(model.item.encode_all)
            t1 = time.perf_counter()
            index_s.append((action, t1 - t0))
            if step % cfg.probe_every == 0:
                probes.append({"step": step, "cache_age": index.cache_age, **probe(model, index, pbatch)})
            t2 = time.perf_counter()
            batch = make_batch(split, order[b * cfg.batch_users:(b + 1) * cfg.batch_users], cfg.targets_per_user, rng)
            q = model.user(batch["hist"], batch["offsets"], batch["counts"], batch["owner"], batch["target"])
            out = fresh_sampled_softmax_loss(q, batch["target"], index, model.item, cfg.num_samples, generator=gen)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            corr_err.append(index.observe(out.unique_ids, out.fresh.detach()))
            step_s.append(time.perf_counter() - t2 + (t1 - t0))
            encoded.append(int(out.unique_ids.numel()))
            losses.append(float(out.loss.detach()))
            step += 1
            if bar is not None:
                bar.update(1)
                if step % 20 == 0:
                    bar.set_postfix(loss=f"{losses[-1]:.3f}", kl=f"{probes[-1]['kl']:.2f}")
    if bar is not None:
        bar.close()
    train_s = time.perf_counter() - t_start
    model.eval()
    t3 = time.perf_counter()
    with torch.no_grad():
        w = model.item.encode_all()
        metrics = evaluate_scorer(lambda u, h, o, c: model.user(h, o, c) @ w.T, split,
                                  eval_user_set(split, cfg.eval_users, cfg.seed))
    eval_s = time.perf_counter() - t3
    by_action = {a: [t for x, t in index_s if x == a] for a in ("refresh", "corrected", "none")}
    result = {
        "config": asdict(cfg), "label": cfg.label, "steps": step, "probes": probes, "metrics": metrics,
        "final_loss": float(np.mean(losses[-50:])), "train_s": train_s, "eval_s": eval_s,
        "step_s_median": float(np.median(step_s)), "encoded_items_mean": float(np.mean(encoded)),
        "num_items": split.num_items, "refreshes": index.num_refreshes,
        "corrected_builds": index.num_corrected_builds,
        "refresh_s_median": float(np.median(by_action["refresh"])) if by_action["refresh"] else float("nan"),
        "corrected_build_s_median": float(np.median(by_action["corrected"])) if by_action["corrected"] else float("nan"),
        "kl_mean": float(np.mean([p["kl"] for p in probes])),
        "kl_final": probes[-1]["kl"] if probes else float("nan"),
        "corrector_fit_mse_last50": float(np.nanmean(corr_err[-50:])) if cfg.corrector else float("nan"),
    }
    if log:
        log(f"{cfg.label}: steps={step} ndcg@10={metrics['ndcg@10']:.4f} kl_mean={result['kl_mean']:.3f} "
            f"kl_final={result['kl_final']:.3f} step={result['step_s_median'] * 1e3:.1f}ms "
            f"encoded={result['encoded_items_mean']:.0f}/{split.num_items} train={train_s:.0f}s eval={eval_s:.0f}s")
    return result
