"""The fused row optimizers beside a busy process: ``imi_softmax.optim.SparseAdam`` and
``RowWiseAdagrad`` steps on a weight [N, d] (N = 1M, d = 64) with 100,000 touched rows, in rounds:
quiet, then beside one freshly started spinning process (bench/busy.py), the two optimizers' steps
taken in turns. Prints the medians and each optimizer's median slowdown (busy over quiet, same round).
To compare two builds, run it with each one's interpreter and source tree (``--repo``), alternately.

    .venv/bin/python bench/busy_optim.py --rounds 7
"""
import argparse
import os
import statistics
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--repeats", type=int, default=15, help="steps of each optimizer per round and load (their median)")
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--repo", default=os.path.dirname(HERE), help="source tree whose imi_softmax is timed")
    a = p.parse_args(argv)
    sys.path.insert(0, os.path.abspath(a.repo))
    sys.path.insert(1, HERE)
    import imi_softmax
    from imi_softmax.optim import RowWiseAdagrad, SparseAdam
    from busy import busy_processes
    from memory import time_interleaved

    torch.manual_seed(0)
    N, d, U = 1_000_000, 64, a.rows
    rows = torch.randperm(N)[:U].sort().values
    steps = {}
    for name, cls in (("SparseAdam", SparseAdam), ("RowWiseAdagrad", RowWiseAdagrad)):
        w = torch.nn.Parameter(torch.randn(N, d) * 0.1)
        w.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), torch.randn(U, d), (N, d),
                                         check_invariants=False).coalesce()
        steps[name] = cls([w], lr=1e-3).step
    print(f"imi_softmax from {os.path.dirname(imi_softmax.__file__)}, {torch.get_num_threads()} threads, "
          f"N = {N}, d = {d}, {U} rows", flush=True)
    quiet, busy = ({n: [] for n in steps} for _ in range(2))
    for _ in range(a.rounds):
        tq = time_interleaved(steps, "cpu", warmup=1, repeats=a.repeats)
        with busy_processes(1):
            tb = time_interleaved(steps, "cpu", warmup=1, repeats=a.repeats)
        for n in steps:
            quiet[n].append(tq[n]["median_ms"])
            busy[n].append(tb[n]["median_ms"])
    for n in steps:
        slow = [b / q for q, b in zip(quiet[n], busy[n])]
        print(f"{n}: quiet {statistics.median(quiet[n]):.2f} ms, busy {statistics.median(busy[n]):.2f} ms, "
              f"median slowdown {statistics.median(slow):.2f}x (rounds {min(slow):.2f}-{max(slow):.2f})", flush=True)


if __name__ == "__main__":
    main()
