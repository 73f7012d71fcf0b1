"""Where the incremental refresh's time goes, quiet and beside busy processes.

Builds the benchmark's dense-gradient head (bench/memory.py ``build_step``), and per sample runs
``--steps`` training steps (each marks its targets and samples as touched) and then one
``refresh_index()``, timing the whole refresh and its two parts: the re-assignment of the changed
rows (``MIDXSampler._assign_changed``) and the cell update (``MIDXSampler._update_in_place``).
Blocks of ``--samples`` refreshes alternate quiet and beside ``--busy`` spinning processes
(bench/busy.py). Prints medians per block and writes a CSV of every sample.

    IMI_CPU_SIMD=avx2 .venv/bin/python bench/refresh_busy.py --threads 2 --busy 1
"""
import argparse
import contextlib
import csv
import functools
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from busy import busy_processes  # noqa: E402
from memory import RESULTS, add_step_shape_args, build_step, machine_info, machine_tag  # noqa: E402


def _timed(parts, name, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            parts[name] = parts.get(name, 0.0) + time.perf_counter() - t0
    return wrapper


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_shape_args(p)
    p.add_argument("--steps", type=int, default=10, help="training steps before each refresh")
    p.add_argument("--samples", type=int, default=5, help="refreshes per block")
    p.add_argument("--blocks", type=int, default=2, help="pairs of blocks (quiet, busy)")
    p.add_argument("--busy", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=RESULTS)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from imi_softmax.samplers import midx

    parts = {}
    midx.MIDXSampler._assign_changed = _timed(parts, "assign_ms", midx.MIDXSampler._assign_changed)
    midx.MIDXSampler._update_in_place = _timed(parts, "update_ms", midx.MIDXSampler._update_in_place)
    head, step = build_step("imi_dense", a.N, a.d, a.B, a.M, "cpu", torch.float32, a.K)
    head.full_refresh_every = 10 ** 9  # every refresh timed here is an incremental one

    def sample():
        for _ in range(a.steps):
            step()
        changed = int(head._touched.sum())
        parts.clear()
        t0 = time.perf_counter()
        head.refresh_index()
        total = time.perf_counter() - t0
        return dict(changed_rows=changed, total_ms=total * 1e3, **{k: v * 1e3 for k, v in parts.items()})

    sample()  # warm-up
    info = machine_info("cpu")
    simd = os.environ.get("IMI_CPU_SIMD", "auto") or "auto"
    print(f"machine: {info['cpu_model']}, {info['cpu_cores']} cores, torch {info['torch_version']}, commit "
          f"{info['git_commit']}, {torch.get_num_threads()} threads, IMI_CPU_SIMD={simd}; N = {a.N}, d = {a.d}, "
          f"refresh after {a.steps} steps", flush=True)
    rows = []
    for block in range(a.blocks):
        for mode in ("quiet", "busy"):
            ctx = busy_processes(a.busy) if mode == "busy" else contextlib.nullcontext()
            with ctx:
                got = [sample() for _ in range(a.samples)]
            for i, r in enumerate(got):
                rows.append(dict(block=block, mode=mode, sample=i, **r))
            med = {k: statistics.median(r[k] for r in got) for k in ("changed_rows", "total_ms", "assign_ms",
                                                                     "update_ms")}
            print(f"block {block} {mode:5s}: refresh {med['total_ms']:.1f} ms (re-assign {med['assign_ms']:.1f}, "
                  f"cell update {med['update_ms']:.1f}; {med['changed_rows']:.0f} rows changed)", flush=True)
    for mode in ("quiet", "busy"):
        print(f"{mode}: median refresh {statistics.median(r['total_ms'] for r in rows if r['mode'] == mode):.1f} ms")
    quiet = statistics.median(r["total_ms"] for r in rows if r["mode"] == "quiet")
    busy = statistics.median(r["total_ms"] for r in rows if r["mode"] == "busy")
    print(f"slowdown beside {a.busy} busy process(es): {busy / quiet:.2f}x")
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, f"refresh_busy_{machine_tag('cpu')}" + ("" if simd == "auto" else f"_simd-{simd}")
                        + ".csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["git_commit", "threads", "N", "d", "steps"] + list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow(dict(git_commit=info["git_commit"], threads=torch.get_num_threads(), N=a.N, d=a.d,
                            steps=a.steps, **r))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
