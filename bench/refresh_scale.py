"""Index refresh and chunked eval at catalogue scale (default N = 20,000,000 classes, d = 64, fp32).

Measures, in one process on CPU:
  * the full index build (k-means + assignment of every class + cells): the cold first build and
    a warm-started rebuild (``refresh_index(full=True)``), target <= 30 s;
  * the incremental refresh of ``--changed-frac`` (1 %) of the rows: those rows are moved (as a
    row-sparse optimizer would move them) and marked touched, then ``refresh_index()``; target <= 1 s;
  * the eval-mode exact cross-entropy ``head(x, target)`` for B = ``--batch`` rows (no grad) and
    ``head.topk(x, k)``, both over class chunks (no [B, N] tensor);
  * the peak RSS (VmHWM) after each phase, next to the weights' own size.

Writes ``bench/results/refresh_scale_<machine>.csv`` and ``.json`` (machine, threads, commit, load
average before and after). Use ``--num-classes 1000000`` for a quick run. Timings on a shared machine
are contended: look at the load average recorded next to them.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from memory import RESULTS, machine_info, machine_tag, status_bytes  # noqa: E402

from imi_softmax import IMISoftmax  # noqa: E402


def vm_hwm_gib() -> float:
    """Peak resident set size of this process so far (Linux VmHWM), GiB."""
    peak = status_bytes("VmHWM")
    return float("nan") if peak is None else peak / 2**30


def timed(fn, repeats: int):
    times = []
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-classes", type=int, default=20_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--num-codewords", type=int, default=64)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--changed-frac", type=float, default=0.01)
    p.add_argument("--repeats", type=int, default=3, help="runs of the incremental refresh")
    p.add_argument("--slow-repeats", type=int, default=1,
                   help="runs of the warm full build, the eval loss and topk (minutes each at 20M)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-chunk-size", type=int, default=None)
    p.add_argument("--tag", default="", help="suffix of the result file names")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n, d = args.num_classes, args.dim
    load_before = os.getloadavg()[0]
    rows = []

    def record(metric, values, unit, **extra):
        med = statistics.median(values) if isinstance(values, list) else values
        row = {"metric": metric, "median": med, "unit": unit,
               "values": " ".join(f"{v:.4g}" for v in values) if isinstance(values, list) else "",
               "peak_rss_gib": round(vm_hwm_gib(), 3), "load_avg_1m": os.getloadavg()[0], **extra}
        rows.append(row)
        print(f"{metric:<34} {med:10.4g} {unit:<4} (runs: {row['values'] or '-'}; peak RSS "
              f"{row['peak_rss_gib']:.2f} GiB; load {row['load_avg_1m']:.2f})", flush=True)

    t0 = time.perf_counter()
    head = IMISoftmax(d, n, num_codewords=args.num_codewords, refresh_every=0, eval_chunk_size=args.eval_chunk_size)
    weights_gib = (head.weight.numel() + head.bias.numel()) * 4 / 2**30
    record("init_parameters_s", time.perf_counter() - t0, "s", weights_gib=round(weights_gib, 3))

    record("full_build_cold_s", timed(lambda: head.refresh_index(full=True), 1)[0], "s")
    record("full_build_warm_s", timed(lambda: head.refresh_index(full=True), args.slow_repeats)[0], "s")

    g = torch.Generator().manual_seed(1)
    count = max(1, int(round(args.changed_frac * n)))

    def incremental():
        changed = torch.randint(0, n, (count,), generator=g)
        with torch.no_grad():  # what a row-sparse optimizer step does to the rows it touched
            head.weight[changed] += 0.05 * torch.randn(count, d, generator=g)
            head.bias[changed] += 0.05 * torch.randn(count, generator=g)
        head.mark_changed(changed)  # what the training forwards record for their targets and samples
        t = time.perf_counter()
        head.refresh_index()
        return time.perf_counter() - t

    inc = [incremental() for _ in range(args.repeats)]
    assert head._refreshes_since_full == args.repeats, "the refreshes were not incremental"
    record("incremental_refresh_s", inc, "s", changed_rows=count)

    head.eval()
    x = torch.randn(args.batch, d, generator=g)
    target = torch.randint(0, n, (args.batch,), generator=g)
    with torch.no_grad():
        record("eval_exact_ce_s", timed(lambda: head(x, target), args.slow_repeats)[0], "s", batch=args.batch)
        record("topk_s", timed(lambda: head.topk(x, args.k), args.slow_repeats)[0], "s", batch=args.batch, k=args.k)
    record("peak_rss_gib", vm_hwm_gib(), "GiB", weights_gib=round(weights_gib, 3))

    info = machine_info("cpu")
    info.update(load_avg_1m_before=load_before, load_avg_1m_end=os.getloadavg()[0], threads=args.threads)
    os.makedirs(RESULTS, exist_ok=True)
    stem = os.path.join(RESULTS, f"refresh_scale_{machine_tag('cpu')}{args.tag}")
    result = {"machine": info, "args": vars(args), "rows": rows}
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=2)
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("metric", "median", "unit"), k))
    with open(stem + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    print("wrote", stem + ".json", "and .csv")
    return result


if __name__ == "__main__":
    main()
