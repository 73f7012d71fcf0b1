"""One optimizer step on the head's gradient: the row-sparse optimizers of imi_softmax.optim against
torch's, in one run.

Default configuration: N = 1,000,000 classes, d = 64, the rows touched by a B = 512, M = 256 step
(targets drawn from a Zipf law, negatives uniform: up to B * (1 + M) = 131,584 rows). The gradient
is the head's own: ``sparse_weight_grad`` (the op behind ``IMISoftmax(sparse_grad=True)``) of random
coefficients, giving a coalesced sparse COO weight gradient [N, d] and bias gradient [N].

Contenders (each on its own copy of a weight [N, d] and a bias [N], float32 unless noted):

* ``imi SparseAdam``       lazy Adam, fused row-sparse op (this package)
* ``imi RowWiseAdagrad``   FBGEMM's row-wise Adagrad, fused row-sparse op (this package)
* ``imi RowWiseAdagrad bf16``  the same with bfloat16 weights (the memory-lean mode), info only
* ``torch SparseAdam``     torch.optim.SparseAdam on the same sparse gradient
* ``torch Adam fused``     torch.optim.Adam(fused=True) on the dense gradient with the same values
                           (foreach when fused is unavailable; the JSON says which)

Only ``optimizer.step()`` is timed (the gradients exist already, as after backward). Steps run in
turns (a, b, c, ...) so that a shared machine's slow phases hit every contender alike; medians and
same-run ratios are reported, with the load average before and after. Writes
``bench/results/optim_step_<machine>.csv``, ``.json`` and ``.png``.

    python bench/optim_step.py --threads 2
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from memory import RESULTS, machine_info, machine_tag, time_interleaved  # noqa: E402
from peers import zipf_counts  # noqa: E402


def head_gradient(N: int, d: int, B: int, M: int, seed: int = 0):
    """(rows [U], weight-grad rows [U, d], bias-grad rows [U]) of one sampled-softmax step, from the
    head's sparse weight-gradient op."""
    from imi_softmax import ops

    g = torch.Generator().manual_seed(seed)
    targets = torch.multinomial(zipf_counts(N).float(), B, replacement=True, generator=g)
    negatives = torch.randint(0, N, (B, M), generator=g)
    ids = torch.cat([targets.unsqueeze(1), negatives], 1)
    coef = torch.randn(B, 1 + M, generator=g) * 1e-3
    x = torch.randn(B, d, generator=g)
    return ops.sparse_weight_grad(coef, ids, x, N)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--N", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--B", type=int, default=512)
    p.add_argument("--M", type=int, default=256)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--repeats", type=int, default=15, help="timed turns (after 2 warm-up turns)")
    p.add_argument("--no-bf16", action="store_true", help="skip the bf16 RowWiseAdagrad row")
    p.add_argument("--out", default=RESULTS)
    a = p.parse_args(argv)
    from imi_softmax.optim import RowWiseAdagrad, SparseAdam

    torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    info = machine_info("cpu")
    info.update(N=a.N, d=a.d, B=a.B, M=a.M, threads=a.threads, repeats=a.repeats)
    print(f"machine: {info['cpu_model']}, {info['cpu_cores']} cores, torch {info['torch_version']}, commit "
          f"{info['git_commit']}, {a.threads} threads, load avg {info.get('load_avg_1m')}", flush=True)

    rows, gw, gb = head_gradient(a.N, a.d, a.B, a.M)
    U = rows.numel()
    info["touched_rows"] = U
    print(f"touched rows U = {U} of N = {a.N} (B * (1 + M) = {a.B * (1 + a.M)})", flush=True)
    sparse_w = torch.sparse_coo_tensor(rows.unsqueeze(0), gw, (a.N, a.d), is_coalesced=True, check_invariants=False)
    sparse_b = torch.sparse_coo_tensor(rows.unsqueeze(0), gb, (a.N,), is_coalesced=True, check_invariants=False)
    dense_w = torch.zeros(a.N, a.d)
    dense_w.index_copy_(0, rows, gw)
    dense_b = torch.zeros(a.N)
    dense_b.index_copy_(0, rows, gb)

    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(a.N, a.d, generator=g) * 0.05
    b0 = torch.zeros(a.N)

    def params(dtype=torch.float32):
        return [torch.nn.Parameter(w0.to(dtype)), torch.nn.Parameter(b0.to(dtype))]

    def with_grads(opt, grads):
        for prm, grad in zip(opt.param_groups[0]["params"], grads):
            prm.grad = grad
        return opt

    contenders = {}
    contenders["imi SparseAdam"] = with_grads(SparseAdam(params(), lr=1e-3), (sparse_w, sparse_b))
    contenders["imi RowWiseAdagrad"] = with_grads(RowWiseAdagrad(params(), lr=1e-2), (sparse_w, sparse_b))
    if not a.no_bf16:
        contenders["imi RowWiseAdagrad bf16"] = with_grads(
            RowWiseAdagrad(params(torch.bfloat16), lr=1e-2),
            (sparse_w.to(torch.bfloat16), sparse_b.to(torch.bfloat16)))
    contenders["torch SparseAdam"] = with_grads(torch.optim.SparseAdam(params(), lr=1e-3), (sparse_w, sparse_b))
    adam_kind = "fused"
    try:
        dense_opt = with_grads(torch.optim.Adam(params(), lr=1e-3, fused=True), (dense_w, dense_b))
        dense_opt.step()  # fused may be refused only at the first step
    except (RuntimeError, ValueError) as exc:
        print(f"torch.optim.Adam(fused=True) unavailable ({exc}); using foreach=True", flush=True)
        adam_kind = "foreach"
        dense_opt = with_grads(torch.optim.Adam(params(), lr=1e-3, foreach=True), (dense_w, dense_b))
    contenders[f"torch Adam {adam_kind}"] = dense_opt
    info["torch_adam_kind"] = adam_kind

    # the first step of each allocates its state (excluded: warm-up)
    times = time_interleaved({name: opt.step for name, opt in contenders.items()}, "cpu", warmup=2,
                             repeats=a.repeats)
    info["load_avg_1m_end"] = os.getloadavg()[0]
    torch_sparse = times["torch SparseAdam"]["median_ms"]
    torch_dense = times[f"torch Adam {adam_kind}"]["median_ms"]
    state_bytes = {name: sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
                             if torch.is_tensor(v)) for name, opt in contenders.items()}
    out_rows = []
    for name, t in times.items():
        out_rows.append(dict(optimizer=name, median_ms=round(t["median_ms"], 3), min_ms=round(t["min_ms"], 3),
                             n=t["n"], speedup_vs_torch_sparse_adam=round(torch_sparse / t["median_ms"], 3),
                             speedup_vs_torch_adam=round(torch_dense / t["median_ms"], 3),
                             state_mib=round(state_bytes[name] / 2 ** 20, 1)))
        r = out_rows[-1]
        print(f"  {name:<26} {r['median_ms']:9.2f} ms (min {r['min_ms']:.2f}, n {r['n']})  "
              f"x{r['speedup_vs_torch_sparse_adam']:.2f} vs torch SparseAdam  "
              f"x{r['speedup_vs_torch_adam']:.2f} vs torch Adam {adam_kind}  state {r['state_mib']} MiB", flush=True)
    print(f"load avg: {info.get('load_avg_1m')} at start, {info['load_avg_1m_end']} at end", flush=True)

    base = os.path.join(a.out, f"optim_step_{machine_tag('cpu')}")
    with open(base + ".csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(out_rows[0]))
        wr.writeheader()
        wr.writerows(out_rows)
    with open(base + ".json", "w") as f:
        json.dump({"machine": info, "rows": out_rows}, f, indent=2)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.2))
        names = [r["optimizer"] for r in out_rows]
        ax.barh(names, [r["median_ms"] for r in out_rows],
                color=["tab:blue" if n.startswith("imi") else "tab:gray" for n in names])
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("median step time (ms, log scale)")
        ax.set_title(f"optimizer step, N={a.N:,}, d={a.d}, U={U:,} rows, {a.threads} threads\n"
                     f"{info['cpu_model'][:50]}, torch {info['torch_version']}, commit {info['git_commit']}, "
                     f"load avg {info.get('load_avg_1m', float('nan')):.2f} / {info['load_avg_1m_end']:.2f}",
                     fontsize=8)
        for i, r in enumerate(out_rows):
            ax.text(r["median_ms"], i, f" {r['median_ms']:.1f}", va="center", fontsize=8)
        fig.tight_layout()
        fig.savefig(base + ".png", dpi=120)
    except ImportError:
        print("matplotlib missing: no plot", flush=True)
    print(f"wrote {base}.csv/.json/.png", flush=True)


if __name__ == "__main__":
    main()
