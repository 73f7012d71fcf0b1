"""A whole training step at catalogue scale (issue 11, section 1), CPU.

One step = forward (sampling included) + backward (sparse row gradients) + the row-sparse optimizer
step (``imi_softmax.optim.SparseAdam`` or ``RowWiseAdagrad``). The index refresh is timed on its
own and amortized at the head's default interval (``refresh_every`` = 1000 steps) two ways: a full
rebuild every interval (an upper bound: every refresh a full one) and the default schedule
(incremental refreshes of the touched rows, a full one every ``full_refresh_every``).

Targets at N = 20,000,000, d = 64, B = 512, M = 256 on 2 threads: step <= 0.5 s median, peak RSS <=
weights + optimizer state + 1 GiB, full index build <= 30 s, incremental refresh of 1% of the rows
<= 1 s. ``--compare-full`` adds the same step at a smaller N against the full softmax with dense
fused Adam, measured in the same run (ratio of medians). ``--profile`` writes a torch.profiler
table of a few steps (what in the step, if anything, is still O(N)).

Writes ``bench/results/scale_step_<machine>_N<N>_<dtype>_<optimizer>.json`` (+ ``.csv`` rows, and
``_profile.txt`` with ``--profile``).

    python bench/scale_step.py --num-classes 20000000 --threads 2 --profile
    python bench/scale_step.py --num-classes 1000000 --compare-full
    python bench/scale_step.py --num-classes 100000000 --dtype bf16 --optimizer adagrad   # stretch
"""
from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from memory import RESULTS, machine_info, machine_tag, reset_peak_rss, status_bytes  # noqa: E402

GIB = 2 ** 30
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def phase_peak(fn):
    """(seconds, RSS before, peak RSS during fn) for one call of fn (peak None if not measurable)."""
    gc.collect()
    ok = reset_peak_rss()
    before = status_bytes("VmRSS")
    t = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - t
    peak = status_bytes("VmHWM") if ok else None
    return elapsed, before, peak


def median_time(fn, steps: int, warmup: int = 2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def random_rows(N: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """n distinct row ids in [0, N), a uniformly random subset in random order, without an [N]
    permutation (a slice of randperm(N) kept its 160 MB storage alive through the refreshes at 20M,
    in the peak RSS they report)."""
    picked = torch.empty(0, dtype=torch.int64)
    while picked.numel() < n:
        more = torch.randint(0, N, (n - picked.numel() + n // 8 + 16,), generator=gen)
        picked = torch.unique(torch.cat([picked, more]))
    return picked[torch.randperm(picked.numel(), generator=gen)[:n]]


def make_batch(N: int, d: int, B: int, dtype, gen: torch.Generator):
    x = torch.randn(B, d, generator=gen).to(dtype).requires_grad_()
    # Zipf-like targets (popular items recur), as a recommender's batches do.
    ranks = torch.randint(0, 2 ** 31 - 1, (B,), generator=gen).double() / 2 ** 31
    y = (N ** ranks - 1).long().clamp_(0, N - 1)
    return x, y


def state_bytes(opt) -> int:
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
    return total


def imi_step_run(a, N: int, tag: str, profile: bool):
    import imi_softmax
    from imi_softmax.optim import RowWiseAdagrad, SparseAdam

    dtype = DTYPES[a.dtype]
    gen = torch.Generator().manual_seed(0)
    t = time.perf_counter()
    head = imi_softmax.IMISoftmax(a.dim, N, num_samples=a.samples, num_codewords=a.codewords,
                                  sparse_grad=True, dtype=dtype)
    init_s = time.perf_counter() - t
    weights = sum(p.numel() * p.element_size() for p in head.parameters())
    t = time.perf_counter()
    head.refresh_index(full=True)
    build_s = time.perf_counter() - t
    opt = (SparseAdam(head.parameters(), lr=1e-3) if a.optimizer == "adam"
           else RowWiseAdagrad(head.parameters(), lr=0.05))
    head.train()

    def step():
        x, y = make_batch(N, a.dim, a.batch, dtype, gen)
        loss = head(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    # The timed steps never hit the refresh schedule: it is timed below, on its own.
    refresh_every = head.refresh_every
    head.refresh_every = 0
    step_s, times = median_time(step, a.steps)
    state = state_bytes(opt)
    peak_after_steps = peak_rss_bytes()  # includes the first full build
    index_bytes = sum(v.numel() * v.element_size() for v in head.sampler._index._asdict().values()
                      if torch.is_tensor(v)) if getattr(head.sampler, "_index", None) is not None else 0

    prof_txt = None
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                step()
        prof_txt = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)

    if a.skip_refresh_timings:  # a second index snapshot would not fit beside a 100M-class head
        peak = peak_rss_bytes()
        out = dict(N=N, d=a.dim, B=a.batch, M=a.samples, K=a.codewords, dtype=a.dtype, optimizer=a.optimizer,
                   init_s=init_s, full_build_s=build_s, step_median_s=step_s, step_times_s=times,
                   weights_bytes=weights, optimizer_state_bytes=state, index_bytes=index_bytes,
                   peak_rss_bytes=peak, peak_minus_weights_and_state_bytes=peak - weights - state)
        del head, opt
        gc.collect()
        return out, prof_txt
    # A warm full rebuild, then incremental refreshes of 1% of the rows each (touched since the
    # last refresh), each with the peak RSS of its own phase (VmHWM reset before it).
    # --keep-old-index: a reference to the current index is held across every refresh, as nothing
    # released it before the in-place update: update takes the copy op, a rebuild keeps the old
    # arrays until the swap (the memory behaviour before update_cells_, for a same-run comparison).
    held = []

    def refresh(full: bool):
        if a.keep_old_index:
            held.append(head.sampler.index)
        head.refresh_index(full=full)
        held.clear()

    rebuild_s, before_rebuild, peak_rebuild = phase_peak(lambda: refresh(True))
    incr_times, incr_peaks, incr_abs, incr_before, in_place = [], [], [], [], []
    for _ in range(a.refreshes):
        rows = random_rows(N, N // 100, gen)
        with torch.no_grad():
            head.weight[rows] += 0.01 * torch.randn(len(rows), a.dim, generator=gen).to(dtype)
        head.mark_changed(rows)
        s_, before_, peak_ = phase_peak(lambda: refresh(False))
        incr_times.append(s_)
        incr_peaks.append(None if peak_ is None else peak_ - before_)
        incr_abs.append(peak_)
        incr_before.append(before_)
        in_place.append(getattr(head.sampler, "last_update_in_place", None))
    incr_s = statistics.median(incr_times)
    refresh_phase_peaks = [p for p in [peak_rebuild] + incr_abs if p is not None]
    full_every = max(head.full_refresh_every, 1)
    amortized_upper = rebuild_s / refresh_every
    amortized_default = ((full_every - 1) * incr_s + rebuild_s) / full_every / refresh_every
    peak = peak_rss_bytes()
    out = dict(N=N, d=a.dim, B=a.batch, M=a.samples, K=a.codewords, dtype=a.dtype, optimizer=a.optimizer,
               init_s=init_s, full_build_s=build_s, warm_full_rebuild_s=rebuild_s,
               incremental_refresh_1pct_s=incr_s, incremental_refresh_1pct_times_s=incr_times,
               incremental_refresh_1pct_max_s=max(incr_times), incremental_in_place=in_place,
               keep_old_index=a.keep_old_index,
               rebuild_peak_over_start_bytes=None if peak_rebuild is None else peak_rebuild - before_rebuild,
               incremental_peak_over_start_bytes=incr_peaks,
               rebuild_rss_before_bytes=before_rebuild, incremental_rss_before_bytes=incr_before,
               refresh_peak_rss_bytes=max(refresh_phase_peaks) if refresh_phase_peaks else None,
               refresh_peak_minus_weights_and_state_bytes=(max(refresh_phase_peaks) - weights - state
                                                           if refresh_phase_peaks else None),
               step_median_s=step_s, step_times_s=times,
               refresh_every=refresh_every, full_refresh_every=head.full_refresh_every,
               refresh_amortized_full_every_time_s=amortized_upper,
               refresh_amortized_default_s=amortized_default,
               step_with_refresh_upper_s=step_s + amortized_upper,
               weights_bytes=weights, optimizer_state_bytes=state, index_bytes=index_bytes,
               peak_rss_after_build_and_steps_bytes=peak_after_steps, peak_rss_bytes=peak,
               peak_minus_weights_and_state_bytes=peak - weights - state)
    del head, opt
    gc.collect()
    return out, prof_txt


def full_softmax_run(a, N: int):
    """nn.Linear-shaped weights, F.cross_entropy over all N, dense fused Adam (foreach if the build
    has no fused CPU Adam)."""
    dtype = DTYPES[a.dtype]
    gen = torch.Generator().manual_seed(1)
    w = torch.nn.Parameter(torch.randn(N, a.dim, generator=gen).to(dtype) * a.dim ** -0.5)
    b = torch.nn.Parameter(torch.zeros(N, dtype=dtype))
    try:
        opt = torch.optim.Adam([w, b], lr=1e-3, fused=True)
        kind = "fused"
    except (RuntimeError, TypeError):
        opt = torch.optim.Adam([w, b], lr=1e-3, foreach=True)
        kind = "foreach"

    def step():
        x, y = make_batch(N, a.dim, a.batch, dtype, gen)
        loss = F.cross_entropy(F.linear(x, w, b), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    s, times = median_time(step, a.full_steps, warmup=1)
    del w, b, opt
    gc.collect()
    return dict(N=N, full_step_median_s=s, full_step_times_s=times, adam=kind)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-classes", type=int, default=20_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--codewords", type=int, default=64)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--optimizer", choices=["adam", "adagrad"], default="adam")
    p.add_argument("--steps", type=int, default=15, help="timed steps (after 2 warm-up steps)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compare-full", action="store_true",
                   help="also time the full softmax + dense Adam step at --num-classes (keep it <= a few M)")
    p.add_argument("--full-steps", type=int, default=3)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--skip-refresh-timings", action="store_true",
                   help="time only the first build and the steps (no second index snapshot in memory)")
    p.add_argument("--refreshes", type=int, default=3, help="incremental refreshes of 1%% of the rows to time")
    p.add_argument("--keep-old-index", action="store_true",
                   help="hold a reference to the index across each refresh (the copy path: the memory "
                        "behaviour before the in-place update), for a same-run comparison")
    p.add_argument("--out", default=RESULTS)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    info = machine_info("cpu")
    print(f"machine: {info['cpu_model']}, {info['cpu_cores']} cores, torch {info['torch_version']}, "
          f"commit {info['git_commit']}, {a.threads} threads, load avg {info.get('load_avg_1m')}", flush=True)
    tag = f"{machine_tag('cpu')}_N{a.num_classes}_{a.dtype}_{a.optimizer}" + ("_keep_old_index" if a.keep_old_index else "")
    res, prof = imi_step_run(a, a.num_classes, tag, a.profile)
    gib = lambda v: v / GIB  # noqa: E731
    if a.skip_refresh_timings:
        print(f"IMISoftmax N={a.num_classes:,} d={a.dim} B={a.batch} M={a.samples} {a.dtype} {a.optimizer}: "
              f"init {res['init_s']:.1f} s, full index build {res['full_build_s']:.1f} s, step median "
              f"{res['step_median_s'] * 1e3:.1f} ms, peak RSS {res['peak_rss_bytes'] / GIB:.2f} GiB = weights "
              f"{res['weights_bytes'] / GIB:.2f} + state {res['optimizer_state_bytes'] / GIB:.2f} + index "
              f"{res['index_bytes'] / GIB:.2f} + {(res['peak_minus_weights_and_state_bytes'] - res['index_bytes']) / GIB:.2f} GiB",
              flush=True)
    else:
        print(f"IMISoftmax N={a.num_classes:,} d={a.dim} B={a.batch} M={a.samples} {a.dtype} {a.optimizer}:\n"
              f"  full index build {res['full_build_s']:.2f} s (warm rebuild {res['warm_full_rebuild_s']:.2f} s), "
              f"incremental refresh of 1% rows {res['incremental_refresh_1pct_s']:.3f} s median, "
              f"{res['incremental_refresh_1pct_max_s']:.3f} s max of {len(res['incremental_refresh_1pct_times_s'])} "
              f"(in place: {res['incremental_in_place']})\n"
              f"  step median {res['step_median_s'] * 1e3:.1f} ms (+ refresh amortized: default schedule "
              f"{res['refresh_amortized_default_s'] * 1e3:.1f} ms, full every time {res['refresh_amortized_full_every_time_s'] * 1e3:.1f} ms)\n"
              f"  peak RSS {gib(res['peak_rss_bytes']):.2f} GiB = weights {gib(res['weights_bytes']):.2f} + optimizer "
              f"state {gib(res['optimizer_state_bytes']):.2f} + {gib(res['peak_minus_weights_and_state_bytes']):.2f} GiB "
              f"(index {gib(res['index_bytes']):.2f} GiB; peak before the refresh timings "
              f"{gib(res['peak_rss_after_build_and_steps_bytes']):.2f} GiB)",
              flush=True)
        if res["refresh_peak_rss_bytes"] is not None:
            over = [f"{gib(v):.2f}" for v in res["incremental_peak_over_start_bytes"] if v is not None]
            print(f"  through the refreshes: peak RSS {gib(res['refresh_peak_rss_bytes']):.2f} GiB = weights + state + "
                  f"{gib(res['refresh_peak_minus_weights_and_state_bytes']):.2f} GiB (rebuild +"
                  f"{gib(res['rebuild_peak_over_start_bytes']):.2f} GiB over its start, incremental + {', '.join(over)} GiB)",
                  flush=True)
    if a.compare_full:
        full = full_softmax_run(a, a.num_classes)
        res.update(full)
        res["full_over_imi_step_ratio"] = full["full_step_median_s"] / res["step_median_s"]
        print(f"  full softmax + dense {full['adam']} Adam step median {full['full_step_median_s'] * 1e3:.0f} ms: "
              f"IMISoftmax + SparseAdam is {res['full_over_imi_step_ratio']:.1f}x faster (same run)", flush=True)
    info["load_avg_1m_end"] = os.getloadavg()[0]
    info.update(res)
    base = os.path.join(a.out, f"scale_step_{tag}")
    with open(base + ".json", "w") as f:
        json.dump(info, f, indent=1)
    with open(base + ".csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["metric", "value"])
        for k, v in res.items():
            if not isinstance(v, list):
                w.writerow([k, v])
    if prof:
        with open(base + "_profile.txt", "w") as f:
            f.write(prof)
        print(prof)
    print(f"wrote {base}.json", flush=True)


if __name__ == "__main__":
    main()
