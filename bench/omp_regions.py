"""Which OpenMP parallel regions one training step opens (CPU, libgomp builds of torch).

Every region of two or more threads ends in a barrier that, on a machine where another process holds
a core, can wait for a descheduled thread; torch's own small ops should not open any inside a step
(imi_softmax/_serial_glue.py). This builds bench/omp_regions.c with ``cc``, runs one step of
``bench/memory.py``'s ``build_step`` under it in a subprocess (``LD_PRELOAD``) and prints each region
with its thread count and its first named callers (demangled where ``c++filt`` is on the PATH): a
region called from libtorch_cpu is a torch op's, one from imi_softmax's _C library our kernel's.

    .venv/bin/python bench/omp_regions.py --method imi_sparse --N 1000000
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

_CHILD = """
import os, sys
sys.path.insert(0, {here!r})
import torch
torch.set_num_threads({threads})
from memory import build_step
head, step = build_step({method!r}, {N}, {d}, {B}, {M}, "cpu", torch.float32, {K})
for _ in range(3):
    step()
open(os.environ["OMP_REGIONS_FLAG"], "w").close()
step()
os.remove(os.environ["OMP_REGIONS_FLAG"])
"""


def main(argv=None) -> None:
    from memory import add_step_shape_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_shape_args(p)
    p.add_argument("--method", default="imi_sparse", help="full, imi_dense or imi_sparse (bench/memory.py)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        shim = os.path.join(tmp, "omp_regions.so")
        subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", shim, os.path.join(HERE, "omp_regions.c"), "-ldl"],
                       check=True)
        env = dict(os.environ, LD_PRELOAD=shim, OMP_REGIONS_FLAG=os.path.join(tmp, "recording"))
        code = _CHILD.format(here=HERE, threads=a.threads, method=a.method, N=a.N, d=a.d, B=a.B, M=a.M, K=a.K)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1800)
        if out.returncode != 0:
            sys.exit(out.stderr)
    regions = [line.split(" | ") for line in out.stderr.splitlines() if line.startswith("OMP_REGION")]
    parallel = [r for r in regions if r[0] != "OMP_REGION threads=1"]
    print(f"one {a.method} step (N = {a.N:,}, {a.threads} threads): {len(regions)} OpenMP regions, "
          f"{len(parallel)} of them with more than one thread")
    for frames in regions:
        print(f"  {frames[0][len('OMP_REGION '):]}, called from")
        named = [f for f in frames[1:] if not f.endswith(":?")]
        for frame in named[:4]:
            print("      " + _symbol(frame)[:150])


def _symbol(frame: str) -> str:
    """'lib+0xoffset:symbol' -> 'lib: symbol', demangled ('?' for a function the library does not
    export: our kernels' own regions show as _C frames without names)."""
    where, _, sym = frame.rpartition(":")
    path = where.rpartition("+")[0]
    if sym != "?" and shutil.which("c++filt"):
        sym = subprocess.run(["c++filt", sym], capture_output=True, text=True).stdout.strip()
    return f"{os.path.basename(path)}: {sym}"

if __name__ == "__main__":
    sys.path.insert(0, HERE)
    main()
