"""Would one thread do better than two beside a busy process? Times the N = 1M ``sparse_grad=True``
training step (d = 128, B = 512, M = 256, K = 64) in interleaved rounds: quiet on 2 threads, quiet on
1, then beside one freshly started spinning process (bench/busy.py) on 2 and on 1. Prints each
round's medians and the medians over the rounds.

    IMI_CPU_SIMD=avx2 .venv/bin/python bench/busy_threads.py --rounds 6
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from busy import busy_processes  # noqa: E402
from memory import build_step  # noqa: E402


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--repeats", type=int, default=15, help="steps per setting and round (their median is timed)")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    _, step = build_step("imi_sparse", 1_000_000, 128, 512, 256, "cpu", torch.float32, 64)
    for _ in range(3):
        step()
    res = {"quiet, 2 threads": [], "quiet, 1 thread": [], "busy, 2 threads": [], "busy, 1 thread": []}
    for r in range(a.rounds):
        for load, threads in (("quiet", 2), ("quiet", 1)):
            torch.set_num_threads(threads)
            res[f"{load}, {threads} thread{'s' if threads > 1 else ''}"].append(median_ms(step, a.repeats))
        with busy_processes(1):
            for threads in (2, 1):
                torch.set_num_threads(threads)
                res[f"busy, {threads} thread{'s' if threads > 1 else ''}"].append(median_ms(step, a.repeats))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} ms" for k, v in res.items()), flush=True)
    print("medians: " + ", ".join(f"{k} {statistics.median(v):.1f} ms" for k, v in res.items()))


if __name__ == "__main__":
    main()
