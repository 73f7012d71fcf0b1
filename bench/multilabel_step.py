"""One pass over the negatives for all L positives of a row: forward + backward time of the fused
multi-label op (ops.multilabel_softmax_forward/backward, via IF.multilabel_sampled_softmax_loss)
against L, next to the per-positive alternative in the same run: the single-label fused op over
B*L rows, each positive with its row's M negatives (the negatives' weight rows gathered L times).
Both get the same negatives and log Q, so the ratio is the cost of the repeated gathers. A third
column times the fused op pair without the training forward (reduction "none" summed by hand: the
forward-only op, then the backward op reading the weight rows again), so fused / two-pass is what
the training forward (ops.multilabel_softmax_train) saves in the whole loss + backward; the ops are
also timed alone on the same inputs (training forward against forward + backward op). Medians of --repeats timed calls after one
warm-up; the ratios survive a loaded machine better than any one number.

    .venv/bin/python bench/multilabel_step.py                 # N = 100k, d = 64, B = 256, M = 256
    .venv/bin/python bench/multilabel_step.py --sparse-grad   # sparse weight gradient (no [N, d] zeroing)

Writes bench/results/multilabel_step_<machine>.json (machine, threads, load, commit, medians).
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


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-classes", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--num-samples", type=int, default=256)
    p.add_argument("--labels", type=int, nargs="*", default=[1, 4, 16, 64])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--sparse-grad", action="store_true", help="sparse weight gradients (as sparse_grad=True)")
    p.add_argument("--out", default=RESULTS)
    a = p.parse_args(argv)
    import imi_softmax.functional as IF
    from imi_softmax import ops

    if a.threads:
        torch.set_num_threads(a.threads)
    info = machine_info("cpu")
    g = torch.Generator().manual_seed(0)
    n, d, B, m = a.num_classes, a.dim, a.batch, a.num_samples
    w = (torch.randn(n, d, generator=g) * 0.1).requires_grad_()
    bias = torch.zeros(n, requires_grad=True)
    x = torch.randn(B, d, generator=g).requires_grad_()
    ids = torch.randint(0, n, (B, m), generator=g)
    log_q = torch.full((B, m), -float(torch.log(torch.tensor(float(n)))))
    rows = []
    for L in a.labels:
        target = torch.randint(0, n, (B, L), generator=g)
        tlq = torch.full((B, L), float(log_q[0, 0]))

        sg = a.sparse_grad

        def fused():
            IF.multilabel_sampled_softmax_loss(x, w, bias, target, ids, log_q, tlq, reduction="sum",
                                               sparse_grad=sg).backward()

        def fused_two_pass():
            IF.multilabel_sampled_softmax_loss(x, w, bias, target, ids, log_q, tlq, reduction="none",
                                               sparse_grad=sg).sum().backward()

        def per_positive():
            xs = x.repeat_interleave(L, 0)
            IF.sampled_softmax_loss(xs, w, bias, target.reshape(-1), ids.repeat_interleave(L, 0),
                                    log_q.repeat_interleave(L, 0), tlq.reshape(-1), reduction="sum",
                                    sparse_grad=sg).backward()

        # the ops alone on the same inputs: the training forward against the forward + backward pair
        all_ids = torch.cat([target, ids], 1)
        all_lq = torch.cat([tlq, log_q], 1)
        pw = torch.ones(B, L)
        xd, wd, bd = x.detach(), w.detach(), bias.detach()

        def op_train():
            ops.multilabel_softmax_train(xd, wd, bd, all_ids, all_lq, pw, L, True, sg)

        def op_two_pass():
            _, lse = ops.multilabel_softmax_forward(xd, wd, bd, all_ids, all_lq, L, True, sg)
            ops.multilabel_softmax_backward(pw, xd, wd, bd, all_ids, all_lq, lse, L, True)

        load = os.getloadavg()[0]
        t_op_train = timed(op_train, 4 * a.repeats)
        t_op_two = timed(op_two_pass, 4 * a.repeats)
        t_fused = timed(fused, a.repeats)
        t_two = timed(fused_two_pass, a.repeats)
        t_per = timed(per_positive, a.repeats)
        rows.append({"L": L, "fused_s": t_fused, "fused_two_pass_s": t_two, "per_positive_s": t_per,
                     "ratio": t_per / t_fused, "two_pass_ratio": t_two / t_fused,
                     "op_train_s": t_op_train, "op_forward_backward_s": t_op_two,
                     "op_ratio": t_op_two / t_op_train, "load_avg_1m_before": load})
        print(f"L={L:3d}: fused {1e3 * t_fused:8.1f} ms, fused without the training forward "
              f"{1e3 * t_two:8.1f} ms ({t_two / t_fused:4.2f}x), per-positive rows {1e3 * t_per:8.1f} ms "
              f"({t_per / t_fused:5.2f}x); ops alone: training forward {1e3 * t_op_train:6.2f} ms, forward + "
              f"backward {1e3 * t_op_two:6.2f} ms ({t_op_two / t_op_train:4.2f}x) (load {load:.2f})", flush=True)
    out = {"machine": info, "config": {"N": n, "d": d, "B": B, "M": m, "repeats": a.repeats,
                                        "what": f"forward + backward ({'sparse' if a.sparse_grad else 'dense'} "
                                                f"weight grad), fp32, median"},
           "rows": rows, "load_avg_1m_after": os.getloadavg()[0]}
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, f"multilabel_step_{machine_tag('cpu')}{'_sparse' if a.sparse_grad else ''}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print("wrote", path)


if __name__ == "__main__":
    main()
