"""Large-catalogue leg of the demo: the speed of one training step over a big catalogue, full softmax
vs IMISoftmax, with the same model, data, optimizer and batches.

    python examples/demo_large.py [--num-items 1000000] [--dim 64] [--batch 256] [--imi-steps 30]

Model: a user embedding table (the query tower) and an output layer over N items: nn.Linear +
F.cross_entropy (full softmax) or IMISoftmax (MIDX-rq, M negatives, K x K cells). A training step
is zero_grad + forward + backward + Adam step (fused: one pass over each parameter; torch's default
per-op Adam takes ~10x longer on the 1M x d weight, for both heads) on every parameter. Both heads keep
the default dense weight gradient, so the drop-in replacement is timed as a user would first run it
(the README's benchmark also times sparse_grad=True). The index is built once before the timed steps
(its time is printed; it is rebuilt every `refresh_every` = 1000 steps by default).

This leg measures speed only (a few dozen steps teach a 1M-item model little); the quality comparison
is the MovieLens leg of examples/demo.py. Targets are synthetic with a realistic skew: N items in
clusters of 10,000, every user draws from one cluster with a Zipf law.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable, List

import torch
import torch.nn.functional as F
from torch import nn

from imi_softmax import IMISoftmax


@dataclass
class LargeResult:
    num_items: int
    dim: int
    batch: int
    num_samples: int
    num_codewords: int
    threads: int
    machine: str
    full_ms: List[float]          # per-step times of the full softmax (ms), first step included
    imi_ms: List[float]           # same for IMISoftmax
    index_build_s: float

    @property
    def full_median_ms(self) -> float:
        return statistics.median(self.full_ms)

    @property
    def imi_median_ms(self) -> float:
        return statistics.median(self.imi_ms)

    @property
    def speedup(self) -> float:
        return self.full_median_ms / self.imi_median_ms

    def setup_line(self) -> str:
        return (f"N = {self.num_items:,} items, d = {self.dim}, batch B = {self.batch}, IMISoftmax M = "
                f"{self.num_samples}, K = {self.num_codewords} (midx-rq), fp32, dense weight grad + fused Adam, "
                f"{self.threads} torch threads, {self.machine}")


def machine() -> str:
    """CPU model, core count and the 1-minute load (a shared machine makes every time slower)."""
    name = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    except OSError:
        pass
    load = f", load {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return f"{name}, {os.cpu_count()} cores{load}"


class PlantedBatches:
    """Batches of (user ids [B], item ids [B]): user u likes cluster u % C of `cluster` items and
    draws rank r in it with probability ~ (r + 1) ** -zipf (clusters are contiguous id ranges)."""

    def __init__(self, num_items: int, num_users: int, cluster: int = 10_000, zipf: float = 1.1):
        self.num_users = num_users
        self.cluster = min(cluster, num_items)
        self.num_clusters = num_items // self.cluster
        ranks = torch.arange(1, self.cluster + 1, dtype=torch.float64)
        self.rank_prob = ranks.pow(-zipf)

    def __call__(self, batch: int, generator: torch.Generator):
        users = torch.randint(self.num_users, (batch,), generator=generator)
        rank = torch.multinomial(self.rank_prob, batch, replacement=True, generator=generator)
        return users, (users % self.num_clusters) * self.cluster + rank


class Model(nn.Module):
    def __init__(self, num_users: int, dim: int, head: nn.Module):
        super().__init__()
        self.users = nn.Embedding(num_users, dim)
        self.head = head

    def loss(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        h = self.users(users)
        if isinstance(self.head, IMISoftmax):
            return self.head(h, items)      # sampled loss in train mode
        return F.cross_entropy(self.head(h), items)


def time_steps(model: Model, batches: list, lr: float) -> List[float]:
    """Trains on `batches` with (fused) Adam; -> wall time of each step in ms."""
    opt = torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    out = []
    for users, items in batches:
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        model.loss(users, items).backward()
        opt.step()
        out.append(1000 * (time.perf_counter() - t))
    return out


def run_large(num_items: int = 1_000_000, dim: int = 64, batch: int = 256, num_samples: int = 256,
              num_codewords: int = 64, imi_steps: int = 30, full_steps: int = 4, num_users: int = 2_000,
              lr: float = 0.01, seed: int = 0, skip_full: bool = False,
              log: Callable[[str], None] = print) -> LargeResult:
    """Times `full_steps` full-softmax steps and `imi_steps` IMISoftmax steps (same model init, same
    batches); -> LargeResult with per-step times in ms (report the medians: the first step of each
    pays for first-touch allocations)."""
    g = torch.Generator().manual_seed(seed)
    data = PlantedBatches(num_items, num_users)
    train_batches = [data(batch, g) for _ in range(max(imi_steps, full_steps))]
    torch.manual_seed(seed)
    imi = Model(num_users, dim, IMISoftmax(dim, num_items, num_samples=num_samples,
                                           num_codewords=num_codewords))
    full_ms: List[float] = []
    if not skip_full:
        full = Model(num_users, dim, nn.Linear(dim, num_items))
        full.load_state_dict(IMISoftmax.linear_state_dict(imi.state_dict()))  # drop the head's index state
        log(f"  timing {full_steps} full-softmax steps at N = {num_items:,} ...")
        full_ms = time_steps(full, train_batches[:full_steps], lr)
        del full
    log(f"  building the index and timing {imi_steps} IMISoftmax steps ...")
    imi.train()
    t = time.perf_counter()
    imi.head.refresh_index()
    index_build_s = time.perf_counter() - t
    imi_ms = time_steps(imi, train_batches[:imi_steps], lr)
    return LargeResult(num_items, dim, batch, num_samples, num_codewords, torch.get_num_threads(), machine(),
                       full_ms, imi_ms, index_build_s)


def report(r: LargeResult) -> str:
    lines = [f"Large catalogue (synthetic): {r.setup_line()}"]
    full, imi = "full softmax (nn.Linear + F.cross_entropy):", f"IMISoftmax midx-rq M={r.num_samples}:"
    w = len(full) + 1
    if r.full_ms:
        lines.append(f"  {full:<{w}}{r.full_median_ms:8,.0f} ms/step (median of {len(r.full_ms)} steps)")
    lines.append(f"  {imi:<{w}}{r.imi_median_ms:8,.0f} ms/step (median of {len(r.imi_ms)} steps; index build "
                 f"{r.index_build_s:.1f} s, repeated every 1000 steps by default)")
    if r.full_ms:
        lines.append(f"  speedup per training step: {r.speedup:.1f}x")
    return "\n".join(lines)


def main(argv=None) -> LargeResult:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-items", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--num-samples", type=int, default=256)
    p.add_argument("--num-codewords", type=int, default=64)
    p.add_argument("--imi-steps", type=int, default=30)
    p.add_argument("--full-steps", type=int, default=4)
    p.add_argument("--skip-full", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    r = run_large(args.num_items, args.dim, args.batch, args.num_samples, args.num_codewords, args.imi_steps,
                  args.full_steps, skip_full=args.skip_full)
    print(report(r))
    return r


if __name__ == "__main__":
    main()
