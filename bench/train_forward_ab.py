"""Same-run A/B of the sampled loss's two training paths (CPU, fp32; not a test).

* ``forward+backward``: ``sampled_softmax_forward``, then the backward op that gathers the B * (1 + M)
  weight rows a second time for the query gradient (the path before ``sampled_softmax_train``);
* ``train``: ``sampled_softmax_train``, which computes the coefficients and the query gradient in
  the forward while the rows are in cache; its backward only scales them.

Times the whole ``sparse_grad=True`` step (forward with sampling + backward; ``bench/memory.py``'s
``build_step``) with each path, in turns, and the ops alone on the same inputs. Writes
``bench/results/train_forward_ab_<machine>[_simd-<level>].json`` with machine, threads, commit and
load. Usage: ``IMI_CPU_SIMD=avx2 .venv/bin/python bench/train_forward_ab.py --threads 2``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from memory import RESULTS, add_step_shape_args, build_step, machine_info, machine_tag, time_interleaved  # noqa: E402


class _ForwardThenBackward:
    """torch.ops.imi_softmax with sampled_softmax_train routed to the forward-only op, whose autograd
    runs the gathering backward op (what the functional called before the training forward)."""

    def __init__(self, ops):
        self._ops = ops

    def __getattr__(self, name):
        return getattr(self._ops, name)

    def sampled_softmax_train(self, *args):
        return (self._ops.sampled_softmax_forward(*args)[0],)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_shape_args(p)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=RESULTS)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    import imi_softmax.functional as IF

    ops = IF.ops
    info = machine_info("cpu")
    simd = os.environ.get("IMI_CPU_SIMD", "auto") or "auto"
    info.update(N=a.N, d=a.d, B=a.B, M=a.M, K=a.K, simd=simd, load_before=os.getloadavg())
    head, step = build_step("imi_sparse", a.N, a.d, a.B, a.M, "cpu", torch.float32, a.K)
    old = _ForwardThenBackward(ops)

    def with_ops(o):
        def run():
            IF.ops = o
            try:
                step()
            finally:
                IF.ops = ops
        return run

    steps = time_interleaved({"forward+backward": with_ops(old), "train": with_ops(ops)}, "cpu",
                             repeats=a.repeats)
    # the ops alone, on the inputs of one step
    g = torch.Generator().manual_seed(0)
    w, b = head.weight.detach(), head.bias.detach()
    x = torch.randn(a.B, a.d, generator=g)
    ids = torch.randint(0, a.N, (a.B, a.M + 1), generator=g)
    lq = -torch.rand(a.B, a.M + 1, generator=g) * 5 - 10
    one = torch.ones(a.B)
    _, lse = ops.sampled_softmax_forward(x, w, b, ids, lq, True, -1, True)
    _, _, coef, _ = ops.sampled_softmax_train(x, w, b, ids, lq, True, -1, True)
    op_times = time_interleaved({
        "sampled_softmax_forward": lambda: ops.sampled_softmax_forward(x, w, b, ids, lq, True, -1, True),
        "sampled_softmax_backward": lambda: ops.sampled_softmax_backward(one, x, w, b, ids, lq, lse, True, -1),
        "sampled_softmax_train": lambda: ops.sampled_softmax_train(x, w, b, ids, lq, True, -1, True),
        "sparse_weight_grad": lambda: ops.sparse_weight_grad(coef, ids, x, a.N),
    }, "cpu", repeats=a.repeats)
    info["load_after"] = os.getloadavg()
    ratio = steps["forward+backward"]["median_ms"] / steps["train"]["median_ms"]
    out = dict(info, steps=steps, ops=op_times, step_ratio_old_over_new=ratio)
    for name, t in list(steps.items()) + list(op_times.items()):
        print(f"{name:>26}: median {t['median_ms']:8.2f} ms  min {t['min_ms']:8.2f} ms  (n={t['n']})")
    print(f"sparse step, forward+backward / train (medians, same run): {ratio:.3f}; "
          f"load {info['load_before']} -> {info['load_after']}")
    os.makedirs(a.out, exist_ok=True)
    tag = machine_tag("cpu") + ("" if simd == "auto" else f"_simd-{simd}")
    path = os.path.join(a.out, f"train_forward_ab_{tag}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1, default=str)
    print("wrote", path)


if __name__ == "__main__":
    main()
