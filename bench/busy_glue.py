"""Does serial glue (imi_softmax/_serial_glue.py) pay beside a busy process? Each pair times one
piece of work with the glue and without it: the N = 1M ``sparse_grad=True`` training step (d = 128,
B = 512, M = 256, K = 64), which glues its small torch ops, against the same step with the glue
switched off; and ``MIDXSampler.sample`` called on its own (as a user would; it does not glue
itself), with the head's bias and without, against the same call inside ``serial_glue()`` (the
scores' product on the calling thread, the draws on every thread: one OpenMP region, not two).

In rounds: quiet, then beside one freshly started spinning process (bench/busy.py). A pair's two
calls are taken in turns, and which of them goes first alternates from round to round: position
matters here (a sampler's first call after other work ran up to 2x slower than the call right after
it, quiet or busy, and the first block of calls after a busy process starts up to 6x slower than
the next). Prints each round's medians, the medians over the rounds and each variant's median
slowdown (busy over quiet, same round) and its median ratio to its pair's other variant.

    IMI_CPU_SIMD=avx2 .venv/bin/python bench/busy_glue.py --rounds 10
"""
import argparse
import contextlib
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import imi_softmax  # noqa: E402
from imi_softmax import _serial_glue  # noqa: E402
from busy import busy_processes  # noqa: E402
from memory import build_step, time_interleaved  # noqa: E402


@contextlib.contextmanager
def glue_off():
    """serial_glue() is a no-op inside (as without the compiled library's switch)."""
    switch = _serial_glue._resolve_switch()
    _serial_glue._switch = None
    try:
        yield
    finally:
        _serial_glue._switch = switch


def within(ctx_factory, fn):
    def run():
        with ctx_factory():
            fn()
    return run


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--repeats", type=int, default=15, help="calls of each variant per round and load (their median)")
    p.add_argument("--parts", default="step,sample", help="comma-separated: step, sample")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    N, d, B, M, K = 1_000_000, 128, 512, 256, 64
    head, step = build_step("imi_sparse", N, d, B, M, "cpu", torch.float32, K)
    x = torch.randn(B, d)
    with torch.no_grad():  # the proposal without bias too: plain alias tables, not the within-cell ones
        no_bias = imi_softmax.MIDXSampler(K, "rq").build(head.weight)
    parts = a.parts.split(",")
    pairs = {}
    if "step" in parts:
        pairs["step"] = {"step": step, "step without glue": within(glue_off, step)}
    if "sample" in parts:
        for name, sampler in (("sample", head.sampler), ("sample (no bias)", no_bias)):
            call = (lambda s: lambda: s.sample(x, M))(sampler)
            pairs[name] = {name: call, name + " in serial_glue()": within(_serial_glue.serial_glue, call)}
    names = [n for pair in pairs.values() for n in pair]
    res = {(load, n): [] for load in ("quiet", "busy") for n in names}
    for r in range(a.rounds):
        for load, ctx in (("quiet", contextlib.nullcontext()), ("busy", busy_processes(1))):
            with ctx:
                for pair in pairs.values():
                    order = dict(list(pair.items())[::1 if r % 2 == 0 else -1])
                    for n, t in time_interleaved(order, "cpu", warmup=1, repeats=a.repeats).items():
                        res[(load, n)].append(t["median_ms"])
        print(f"round {r + 1}: " + ", ".join(f"{load}: {n} {v[-1]:.2f}" for (load, n), v in res.items()) + " (ms)",
              flush=True)
    print("medians: " + ", ".join(f"{load}: {n} {statistics.median(v):.2f}" for (load, n), v in res.items()) + " (ms)")
    for pair in pairs.values():
        first, second = pair
        for n in pair:
            slow = [b / q for q, b in zip(res[("quiet", n)], res[("busy", n)])]
            print(f"{n}: median slowdown beside 1 busy process {statistics.median(slow):.2f}x "
                  f"(rounds {min(slow):.2f}-{max(slow):.2f})")
        for load in ("quiet", "busy"):
            ratio = [s / f for f, s in zip(res[(load, first)], res[(load, second)])]
            print(f"  {load}: {second} / {first} = {statistics.median(ratio):.2f} "
                  f"(rounds {min(ratio):.2f}-{max(ratio):.2f})")


if __name__ == "__main__":
    main()
