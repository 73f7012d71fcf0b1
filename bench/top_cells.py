"""Cost of the hard-negative proposal (TopCellsSampler) per step, against the MIDX proposal alone.

On the ML-10M reference model (``train_reference_model.py``: item weight W [N, d], bias b, its user
queries), for K in {16, 64} and budget in {256, 1024} (256 is the recommender's midx-hard setting):
  top      TopCellsSampler alone: sample(query, M) then log_prob(query, [draws | targets])
  mix      the midx-hard step's proposal: MixtureSampler([(midx, 0.9), (top, 0.1)])
           .sample_with_targets(query, M, targets)
  midx     the MIDX sampler alone (sample_with_targets), the step it is compared with
Every call gets a fresh query tensor (no selection cache across calls, as in training). Median and
quartiles over ``--reps`` calls after ``--warmup``; ratios top/midx and mix/midx are of medians of
the same run. ``--label`` names the code measured (e.g. ``before`` on the sort-based commit, ``after``).

Writes (appends) bench/results/top_cells_<machine>.csv and prints a table. The machine, thread count,
commit (with -dirty) and the 1-minute load before and after each setting are in every row.

    python bench/top_cells.py --label after [--threads 1] [--batch 256] [--reps 30]
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from memory import RESULTS, machine_info, machine_tag  # noqa: E402

KS = (16, 64)
BUDGETS = (256, 1024)


def timed(fn, queries, warmup, reps):
    for i in range(warmup):
        fn(queries[i % len(queries)].clone())
    out = []
    for i in range(reps):
        q = queries[i % len(queries)].clone()  # a new tensor: the sampler's one-query cache never hits
        t0 = time.perf_counter()
        fn(q)
        out.append(time.perf_counter() - t0)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.path.join(RESULTS, "reference_model_ml10m.pt"))
    p.add_argument("--label", required=True, help="name of the code measured (before / after)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    import imi_softmax as imi
    from tqdm import tqdm

    if a.threads:
        torch.set_num_threads(a.threads)
    if not os.path.exists(a.model):
        sys.exit(f"{a.model} not found: run bench/train_reference_model.py first")
    ref = torch.load(a.model, weights_only=False)
    W, b = ref["weight"].float(), ref["bias"].float()
    q_all, t_all = ref["queries"].float(), ref["query_targets"].long()
    g = torch.Generator().manual_seed(a.seed)
    batches = []
    for _ in range(4):
        rows = torch.randint(0, q_all.shape[0], (a.batch,), generator=g)
        batches.append((q_all[rows], t_all[rows].reshape(-1, 1)))
    queries = [q for q, _ in batches]
    info = machine_info("cpu")
    rows = []
    settings = [(k, budget) for k in KS for budget in BUDGETS]
    for k, budget in tqdm(settings, desc="K, budget"):
        midx = imi.MIDXSampler(k, "rq").build(W, b)
        top = imi.TopCellsSampler(midx, budget=budget)
        mix = imi.MixtureSampler([(midx, 0.9), (top, 0.1)])
        gen = torch.Generator().manual_seed(a.seed)
        tgt = batches[0][1]

        def run_top(q):
            ids, _ = top.sample(q, a.num_samples, generator=gen)
            top.log_prob(q, torch.cat([ids, tgt], 1))

        cases = {"top": run_top,
                 "mix": lambda q: mix.sample_with_targets(q, a.num_samples, tgt, generator=gen),
                 "midx": lambda q: midx.sample_with_targets(q, a.num_samples, tgt, generator=gen)}
        load0 = os.getloadavg()[0]
        med = {}
        for name, fn in cases.items():
            ts = timed(fn, queries, a.warmup, a.reps)
            qs = statistics.quantiles(ts, n=4)
            med[name] = statistics.median(ts)
            rows.append(dict(label=a.label, case=name, K=k, budget=budget, batch=a.batch, M=a.num_samples,
                             median_ms=med[name] * 1e3, q1_ms=qs[0] * 1e3, q3_ms=qs[2] * 1e3, reps=a.reps))
        load1 = os.getloadavg()[0]
        for r in rows[-len(cases):]:
            r.update(ratio_to_midx=med[r["case"]] / med["midx"], N=W.shape[0], d=W.shape[1],
                     threads=torch.get_num_threads(), cores=os.cpu_count(), cpu=info["cpu_model"],
                     commit=info["git_commit"], load_1m_before=f"{load0:.2f}", load_1m_after=f"{load1:.2f}")
    out = a.out or os.path.join(RESULTS, f"top_cells_{machine_tag('cpu')}.csv")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    new_file = not os.path.exists(out)
    with open(out, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new_file:
            w.writeheader()
        w.writerows(rows)
    print(f"\n{a.label}: ML-10M reference model N = {W.shape[0]}, d = {W.shape[1]}, B = {a.batch}, M = {a.num_samples}; "
          f"{info['cpu_model']}, {torch.get_num_threads()} threads, commit {info['git_commit']}\n")
    print("| K | budget | case | median ms | q1 - q3 ms | / midx | load |")
    print("|---:|---:|---|---:|---|---:|---|")
    for r in rows:
        print(f"| {r['K']} | {r['budget']} | {r['case']} | {r['median_ms']:.2f} | {r['q1_ms']:.2f} - {r['q3_ms']:.2f} | "
              f"{r['ratio_to_midx']:.2f} | {r['load_1m_before']} -> {r['load_1m_after']} |")
    print(f"\nappended to {out}")


if __name__ == "__main__":
    main()
