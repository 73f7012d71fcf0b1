"""What does ``imi_softmax.diagnose`` cost? Wall time at N = 100k and 1M classes, d = 64, B = 256,
MIDX (K = 64, rq), M = 256, 8 draws; next to one training step of the same head (forward +
backward of the sampled loss) in the same run, so the ratio survives a loaded machine.

Writes bench/results/diagnose_cost_<machine>.json (machine, threads, load, commit, medians).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from memory import RESULTS, machine_info, machine_tag  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-classes", type=int, nargs="*", default=[100_000, 1_000_000])
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--num-samples", type=int, default=256)
    p.add_argument("--num-draws", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=RESULTS)
    a = p.parse_args(argv)
    import imi_softmax as imi

    if a.threads:
        torch.set_num_threads(a.threads)
    rows = []
    info = machine_info("cpu")
    for n in a.num_classes:
        torch.manual_seed(0)
        head = imi.IMISoftmax(a.dim, n, num_samples=a.num_samples, num_codewords=64)
        t0 = time.perf_counter()
        head.refresh_index()
        build_s = time.perf_counter() - t0
        x = torch.randn(a.batch, a.dim)
        t = torch.randint(0, n, (a.batch,))
        diag, step = [], []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            r = imi.diagnose(head, x, t, num_draws=a.num_draws)
            diag.append(time.perf_counter() - t0)
            xs = x.clone().requires_grad_(True)
            t0 = time.perf_counter()
            head(xs, t).backward()
            step.append(time.perf_counter() - t0)
            head.zero_grad(set_to_none=True)
        row = dict(N=n, d=a.dim, B=a.batch, M=a.num_samples, num_draws=a.num_draws, index_build_s=build_s,
                   diagnose_s_median=statistics.median(diag), diagnose_s_all=diag,
                   train_step_s_median=statistics.median(step),
                   ratio_diagnose_over_step=statistics.median(diag) / statistics.median(step),
                   load_avg_1m_after=os.getloadavg()[0], kl=r["kl"], grad_cosine=r["grad_cosine"])
        rows.append(row)
        print(f"N={n:>8}: diagnose {row['diagnose_s_median']:.2f} s (median of {a.repeats}), training step "
              f"{row['train_step_s_median'] * 1e3:.1f} ms, ratio {row['ratio_diagnose_over_step']:.0f}x, "
              f"load {row['load_avg_1m_after']:.2f}", flush=True)
    out = dict(machine=info, rows=rows)
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, f"diagnose_cost_{machine_tag('cpu')}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {path}; threads {info['torch_threads']}, load before {info.get('load_avg_1m')}")


if __name__ == "__main__":
    main()
