"""Sweep the training-step time and peak memory of every method over N, M and d.

Methods (``--methods``): imi_dense, imi_sparse (IMISoftmax with dense / sparse weight grad),
full (F.cross_entropy(F.linear)), adaptive (nn.AdaptiveLogSoftmaxWithLoss, 80/15/5% frequency
cutoffs), tf_sampled (TF-style shared-negative sampled softmax, log-uniform sampler), midx_torch
(per-query MIDX sampling with the pure-PyTorch port + a plain-PyTorch corrected sampled softmax),
and cce (Cut Cross-Entropy, CUDA only, when installed).

Grid. Around the default point (N = 1M, M = 256, d = 128, B = 512, K = 64) one axis varies at a time:
  N in {10k, 100k, 1M} (+ 10M on a GPU) at M = 256, d = 128;
  M in {64, 256, 1024} at N = 1M, d = 128;
  d in {64, 128, 256} at N = 1M, M = 256;
dtype fp32 (+ bf16 on a GPU). ``--full-grid`` runs the cartesian product instead. ``--N/--M/--d``
restrict an axis (e.g. ``--N 10000 100000``); ``--methods`` restricts the methods.
``--quick``: N in {10k, 50k}, M in {64, 256}, d = 64, B = 128, one timed repeat (a smoke test).

Each point: time per training step (forward + backward, sampling included, index build excluded;
median of ``--repeats`` after warm-up) in this process, and peak step memory in a fresh subprocess
(``memory.peak_step_memory``). Points whose estimated footprint exceeds ``--mem-budget-gb``
(default: 60% of MemAvailable) are skipped and recorded as such in the CSV. For methods that do not
depend on M (full, adaptive, cce) the measurement at one M is reused for the others (``note`` says so).

Writes ``bench/results/sweep_<machine>.csv`` and PNG plots ``sweep_<machine>_{time,memory}_vs_N.png``
(log-log, one line per method, M = 256, d = 128), plus ``..._vs_M.png`` / ``..._vs_d.png``.
"""
from __future__ import annotations

import argparse
import csv
import gc
import itertools
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from memory import DTYPES, RESULTS, build_step, machine_info, machine_tag, peak_step_memory, time_fn  # noqa: E402
from peers import HAVE_CCE  # noqa: E402

ALL_METHODS = ["imi_dense", "imi_sparse", "full", "adaptive", "tf_sampled", "midx_torch", "cce"]
M_INDEPENDENT = {"full", "adaptive", "cce"}
FIELDS = ["machine", "cpu_model", "threads", "gpu", "torch_version", "git_commit", "method", "N", "M", "d", "B", "K",
          "dtype", "device", "step_ms", "step_ms_min", "repeats", "peak_mb", "est_mb", "status", "note"]


def mem_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def estimate_bytes(method: str, N: int, d: int, B: int, M: int, elem: int) -> int:
    """Rough resident footprint of one step (weights + grads + transient buffers), to skip points
    that cannot fit. Deliberately generous."""
    params = N * (d + 1) * elem
    if method == "full":
        return 2 * params + 4 * B * N * max(elem, 4)             # logits, softmax/grad, in fp32 at least
    if method == "adaptive":
        return 3 * params + 3 * B * N * max(elem, 4) // 2        # head + tails computed for routed rows
    if method == "cce":
        return 2 * params + 16 * B * d * elem
    if method == "midx_torch":
        return 2 * params + 4 * B * (M + 1) * d * 4 + 2 * B * 64 * 64 * 4 + 16 * N
    return 2 * params + 3 * B * (M + 1) * d * 4 + 24 * N          # imi_*, tf_sampled: gathered rows + index


def grid(a, on_gpu: bool):
    if a.quick:
        Ns, Ms, ds, dts = [10_000, 50_000], [64, 256], [64], ["fp32"]
        center = dict(N=50_000, M=256, d=64)
    else:
        Ns = [10_000, 100_000, 1_000_000] + ([10_000_000] if on_gpu else [])
        Ms, ds = [64, 256, 1024], [64, 128, 256]
        dts = ["fp32"] + (["bf16"] if on_gpu else [])
        center = dict(N=1_000_000, M=256, d=128)
    Ns, Ms, ds = a.N or Ns, a.M or Ms, a.d or ds
    dts = a.dtype or dts
    if a.N and center["N"] not in Ns:
        center["N"] = max(Ns)
    if a.M and center["M"] not in Ms:
        center["M"] = Ms[len(Ms) // 2]
    if a.d and center["d"] not in ds:
        center["d"] = ds[len(ds) // 2]
    if a.full_grid:
        pts = list(itertools.product(Ns, Ms, ds))
    else:
        pts = [(n, center["M"], center["d"]) for n in Ns]
        pts += [(center["N"], m, center["d"]) for m in Ms]
        pts += [(center["N"], center["M"], dd) for dd in ds]
    seen, out = set(), []
    for p in pts:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return [(n, m, dd, dt) for (n, m, dd) in out for dt in dts], center


def plot(rows, tag, center, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    for axis, fixed in (("N", ("M", "d")), ("M", ("N", "d")), ("d", ("N", "M"))):
        for metric, ylabel, fname in (("step_ms", "time per training step [ms]", "time"),
                                      ("peak_mb", "peak step memory [MiB]", "memory")):
            sel = [r for r in ok if all(r[f] == center[f] for f in fixed) and r[metric] not in ("", None)]
            if not sel or len({r[axis] for r in sel}) < 2:
                continue
            fig, ax = plt.subplots(figsize=(6.5, 4.5))
            for dt in sorted({r["dtype"] for r in sel}):
                for method in ALL_METHODS:
                    pts = sorted((r[axis], float(r[metric])) for r in sel if r["method"] == method and r["dtype"] == dt)
                    if pts:
                        label = method if dt == "fp32" else f"{method} ({dt})"
                        style = "-" if method.startswith("imi") else "--"
                        ax.plot([p[0] for p in pts], [max(p[1], 1e-3) for p in pts], style, marker="o", label=label)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(axis)
            ax.set_ylabel(ylabel)
            fixed_txt = ", ".join(f"{f}={center[f]}" for f in fixed)
            ax.set_title(f"{ylabel.split(' [')[0]} vs {axis} ({fixed_txt}, B={rows[0]['B']})\n{tag}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            path = os.path.join(out, f"sweep_{tag}_{fname}_vs_{axis}.png")
            fig.savefig(path, dpi=120)
            plt.close(fig)
            print(f"wrote {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny smoke-test sweep")
    p.add_argument("--full-grid", action="store_true", help="cartesian product instead of one axis at a time")
    p.add_argument("--methods", nargs="*", default=None, help=f"subset of {ALL_METHODS}")
    p.add_argument("--N", type=int, nargs="*", default=None)
    p.add_argument("--M", type=int, nargs="*", default=None)
    p.add_argument("--d", type=int, nargs="*", default=None)
    p.add_argument("--dtype", nargs="*", default=None, choices=["fp32", "bf16", "fp16"])
    p.add_argument("--B", type=int, default=None, help="batch rows (default 512; 128 with --quick)")
    p.add_argument("--K", type=int, default=64)
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 3; 1 with --quick)")
    p.add_argument("--max-seconds", type=float, default=60.0, help="stop repeating a point after this long")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--mem-budget-gb", type=float, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (1 on a shared machine)")
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--tag", default=None, help="machine tag in the file names (default: CPU/GPU model)")
    a = p.parse_args(argv)

    device = a.device
    if a.threads:
        torch.set_num_threads(a.threads)
        os.environ["OMP_NUM_THREADS"] = str(a.threads)  # inherited by the memory subprocesses
    on_gpu = device.startswith("cuda")
    if on_gpu and not torch.cuda.is_available():
        sys.exit("--device cuda but no CUDA device")
    B = a.B or (128 if a.quick else 512)
    repeats = a.repeats or (1 if a.quick else 3)
    methods = a.methods or [m for m in ALL_METHODS if m != "cce" or (on_gpu and HAVE_CCE)]
    budget = int((a.mem_budget_gb * 2**30) if a.mem_budget_gb else 0.6 * (
        torch.cuda.get_device_properties(0).total_memory if on_gpu else mem_available_bytes()))
    points, center = grid(a, on_gpu)
    info = machine_info(device)
    tag = a.tag or machine_tag(device)
    os.makedirs(a.out, exist_ok=True)
    csv_path = os.path.join(a.out, f"sweep_{tag}.csv")
    print(f"{info['cpu_model']} ({info['cpu_cores']} cores) {info['gpu']} torch {info['torch_version']} "
          f"commit {info['git_commit']}; {len(points)} points x {len(methods)} methods, B={B}, "
          f"memory budget {budget / 2**30:.1f} GiB")

    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    jobs = [(pt, m) for pt in points for m in methods]
    bar = tqdm(jobs, desc="sweep", dynamic_ncols=True) if tqdm else jobs
    rows, reuse = [], {}
    base = dict(machine=tag, cpu_model=info["cpu_model"], threads=info["torch_threads"], gpu=info["gpu"], torch_version=info["torch_version"],
                git_commit=info["git_commit"], B=B, K=a.K, device=device)
    with open(csv_path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=FIELDS)
        wr.writeheader()
        for (N, M, d, dt), method in bar:
            if tqdm:
                bar.set_postfix_str(f"{method} N={N} M={M} d={d} {dt}")
            elem = torch.tensor([], dtype=DTYPES[dt]).element_size()
            est = estimate_bytes(method, N, d, B, M, elem)
            row = dict(base, method=method, N=N, M=M, d=d, dtype=dt, step_ms="", step_ms_min="", repeats="",
                       peak_mb="", est_mb=round(est / 2**20, 1), status="ok", note="")
            key = (method, N, d, dt)
            if method == "cce" and not on_gpu:
                row.update(status="skipped", note="Cut Cross-Entropy needs CUDA")
            elif method == "cce" and not HAVE_CCE:
                row.update(status="skipped", note="cut_cross_entropy not installed")
            elif est > budget:
                row.update(status="skipped", note=f"estimated {est / 2**30:.1f} GiB > budget {budget / 2**30:.1f} GiB")
            elif method in M_INDEPENDENT and key in reuse:
                prev = reuse[key]
                row.update({k: prev[k] for k in ("step_ms", "step_ms_min", "repeats", "peak_mb")},
                           note=f"independent of M: reused the M={prev['M']} measurement")
            else:
                try:
                    head, step = build_step(method, N, d, B, M, device, DTYPES[dt], a.K)
                    slow = method in M_INDEPENDENT or method == "midx_torch"
                    t = time_fn(step, device, warmup=1 if (slow or a.quick) else 2, repeats=repeats,
                                max_seconds=a.max_seconds)
                    row.update(step_ms=round(t["median_ms"], 3), step_ms_min=round(t["min_ms"], 3), repeats=t["n"])
                    del head, step
                    gc.collect()
                    if on_gpu:
                        torch.cuda.empty_cache()
                    if not a.no_memory:
                        r = peak_step_memory(method, N, d, B, M, device, dt, a.K, details=True)
                        row.update(peak_mb=round(r["peak_bytes"] / 2**20, 2))
                        row["note"] = r["mode"]
                    if method in M_INDEPENDENT:
                        reuse[key] = dict(row)
                except Exception as e:  # record and go on (e.g. out of memory)
                    row.update(status="error", note=f"{type(e).__name__}: {str(e)[:200]}")
            rows.append(row)
            wr.writerow(row)
            f.flush()
            if not tqdm:
                print(row, flush=True)
    print(f"wrote {csv_path}")
    plot(rows, tag, center, a.out)
    # the crossover: smallest N where the IMI step beats the full softmax
    for m in ("imi_dense", "imi_sparse"):
        pairs = []
        for r in rows:
            if r["method"] == m and r["status"] == "ok" and r["M"] == center["M"] and r["d"] == center["d"]:
                full = [x for x in rows if x["method"] == "full" and x["status"] == "ok" and x["N"] == r["N"]
                        and x["d"] == r["d"] and x["dtype"] == r["dtype"] and x["step_ms"] != ""]
                if full and r["step_ms"] != "":
                    pairs.append((r["N"], r["dtype"], float(full[0]["step_ms"]) / float(r["step_ms"])))
        for n, dt, sp in sorted(pairs):
            print(f"  {m:<11} N={n:>9,} {dt}: full / imi step time = {sp:7.2f}x")


if __name__ == "__main__":
    main()
