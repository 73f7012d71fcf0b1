"""Approximate top-k from the MIDX index (``MIDXSampler.search``) against exact top-k and FAISS's IMI.

For each catalogue, in one run: exact top-k (``imi_softmax.chunked.chunked_topk``, the ground truth
and the speed reference), ``MIDXSampler.search`` over a budget sweep, and, when ``faiss`` imports,
FAISS's inverted multi-index (IndexIVFFlat over a MultiIndexQuantizer(d, 2, nbits), inner product,
nprobe swept). Each MIDX budget is timed in each ``--rerank`` order of the CPU op (method ``midx``:
per query; ``midx_cell``: cell-major, each visited cell's rows scored against all its queries at
once; queries_per_cell is the mean number of the batch's queries visiting a visited cell), reading
the live rows (``weight=``) and, with suffix ``_copy``, the cell-ordered copy of
``build(copy_vectors=True)``. Per setting: recall@10 and recall@100 against the exact top-100, queries/s (all
threads, the whole query batch in one call), and the classes scored per query (ours: the candidates
of the visited cells; FAISS: indexIVF_stats.ndis / queries).

Catalogues:
  synthetic  clustered Gaussian catalogue (``--num-classes``, default 1M and 20M): C centres in d
             dimensions, each class a centre plus noise, scaled by a log-normal norm; queries drawn
             the same way (a centre plus noise). No bias.
  ml10m      the ML-10M reference model of train_reference_model.py (N = its item count, with bias;
             FAISS gets the bias as an extra dimension: [w, b] . [h, 1]).

Writes bench/results/retrieval_<machine>.csv / .json (machine, threads, load before and after each
catalogue, commit) and retrieval_<machine>.png (recall@10 against queries/s).

    python bench/retrieval.py                          # ml10m, 1M, 20M
    python bench/retrieval.py --catalogues synthetic --num-classes 1000000
"""
from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from memory import RESULTS, machine_info, machine_tag  # noqa: E402


def peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def clustered_catalogue(n: int, d: int, centres: int, queries: int, seed: int, chunk: int = 1 << 20):
    """(weight [n, d] float32, queries [Q, d]): class = centre + 0.6 * noise, times exp(0.2 * N(0, 1))."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(centres, d, generator=g)
    w = torch.empty(n, d)
    for s in range(0, n, chunk):  # in chunks: no second [n, d] temporary
        e = min(s + chunk, n)
        w[s:e] = c[torch.randint(0, centres, (e - s,), generator=g)]
        w[s:e].add_(torch.randn(e - s, d, generator=g), alpha=0.6)
        w[s:e].mul_(torch.exp(0.2 * torch.randn(e - s, 1, generator=g)))
    q = c[torch.randint(0, centres, (queries,), generator=g)] + 0.6 * torch.randn(queries, d, generator=g)
    return w, q


def recall(approx: torch.Tensor, exact: torch.Tensor, k: int) -> float:
    """Mean over rows of |approx[:, :k] & exact[:, :k]| / k."""
    a, e = approx[:, :k], exact[:, :k]
    hits = (a.unsqueeze(2) == e.unsqueeze(1)).any(2).sum(1)
    return float(hits.double().mean() / k)


def timed(fn, repeats: int):
    """(median seconds, last result) over `repeats` calls after one warm-up call."""
    out = fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2], out


def load_avg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def run_catalogue(name, weight, bias, queries, a, rows, info):
    import imi_softmax
    from imi_softmax.chunked import chunked_topk

    n, d = weight.shape
    Q = queries.shape[0]
    kmax = 100
    base = {"catalogue": name, "num_classes": n, "dim": d, "queries": Q, "threads": torch.get_num_threads()}
    load0 = load_avg()
    print(f"[{name}] N = {n:,}, d = {d}, {Q} queries, load {load0:.2f}", flush=True)

    chunk = max(1024, (64 << 20) // (4 * Q))
    big = n >= 10_000_000
    repeats = a.repeats_20m if big else a.repeats
    sec, (exact_v, exact_i) = timed(lambda: chunked_topk(queries, weight, bias, kmax, chunk), repeats)
    rows.append({**base, "method": "exact", "setting": "", "recall@10": 1.0, "recall@100": 1.0,
                 "queries_per_s": Q / sec, "classes_scored": n, "build_s": 0.0, "load_1m": load_avg(),
                 "queries_per_cell": float("nan")})
    print(f"  exact: {Q / sec:,.0f} q/s", flush=True)

    K = a.codewords_20m if big and a.codewords_20m else a.codewords
    K = K if K else max(16, min(1024, 2 ** round(math.log2(math.sqrt(n / a.cell_size)))))
    t = time.perf_counter()
    s = imi_softmax.MIDXSampler(num_codewords=K, quantizer=a.quantizer, kmeans_iters=a.kmeans_iters)
    s.build(weight, bias, copy_vectors=a.copy_vectors)
    build = time.perf_counter() - t
    print(f"  MIDX index K = {K} ({a.quantizer}): built in {build:.1f} s", flush=True)
    fractions = [f for f in a.budget_fractions if n < 10_000_000 or f <= a.max_fraction_20m]
    budgets = sorted({b for b in (int(f * n) for f in fractions) if kmax <= b <= n})
    for budget in budgets:
        cells, counts = s.search_cells(queries, budget)
        visited = cells[cells >= 0]
        per_cell = visited.numel() / max(1, visited.unique().numel())
        for rerank, copy in [(r, c) for c in ([False, True] if a.copy_vectors else [False]) for r in a.rerank]:
            vectors = {} if copy else {"weight": weight, "bias": bias}
            sec, (ids, _) = timed(lambda: s.search(queries, kmax, budget, rerank=rerank, **vectors), repeats)
            method = ("midx" if rerank == "query" else "midx_" + rerank) + ("_copy" if copy else "")
            row = {**base, "method": method, "setting": f"K={K},budget={budget}",
                   "recall@10": recall(ids, exact_i, 10), "recall@100": recall(ids, exact_i, 100),
                   "queries_per_s": Q / sec, "classes_scored": float(counts.double().mean()), "build_s": build,
                   "load_1m": load_avg(), "queries_per_cell": per_cell}
            rows.append(row)
            print(f"  {method:<14} budget {budget:>9,}: r@10 {row['recall@10']:.3f} r@100 {row['recall@100']:.3f} "
                  f"{row['queries_per_s']:,.0f} q/s, {row['classes_scored']:,.0f} scored, "
                  f"{per_cell:.1f} queries/cell", flush=True)
    del s
    gc.collect()

    try:
        import faiss
    except ImportError:
        print("  faiss not importable: FAISS rows skipped", flush=True)
        return
    faiss.omp_set_num_threads(torch.get_num_threads())
    xb, xq = weight, queries
    if bias is not None:  # [w, b, 0] . [h, 1, 0]: the logit, in an even dimension for the two halves
        xb = torch.cat([weight, bias.unsqueeze(1), torch.zeros(n, 1)], 1)
        xq = torch.cat([queries, torch.ones(Q, 1), torch.zeros(Q, 1)], 1)
    elif d % 2:
        xb, xq = torch.cat([weight, torch.zeros(n, 1)], 1), torch.cat([queries, torch.zeros(Q, 1)], 1)
    fd = xb.shape[1]
    nbits = int(round(math.log2(K)))
    t = time.perf_counter()
    quantizer = faiss.MultiIndexQuantizer(fd, 2, nbits)
    index = faiss.IndexIVFFlat(quantizer, fd, 1 << (2 * nbits), faiss.METRIC_INNER_PRODUCT)
    index.quantizer_trains_alone = 1
    g = torch.Generator().manual_seed(0)
    train = xb[torch.randperm(n, generator=g)[:min(n, 256 * (1 << nbits))]].numpy()
    index.train(train)
    for s0 in range(0, n, 1 << 20):
        index.add(xb[s0:s0 + (1 << 20)].numpy())
    fbuild = time.perf_counter() - t
    del xb
    print(f"  FAISS IMI 2x{nbits} bits: built in {fbuild:.1f} s", flush=True)
    xq_np = xq.numpy()
    for nprobe in [p for p in a.nprobes if p <= index.nlist]:
        index.nprobe = nprobe
        faiss.cvar.indexIVF_stats.reset()
        sec, (_, fi) = timed(lambda: index.search(xq_np, kmax), repeats)
        ndis = faiss.cvar.indexIVF_stats.ndis / ((repeats + 1) * Q)
        fi = torch.from_numpy(fi)
        row = {**base, "method": "faiss_imi", "setting": f"nbits={nbits},nprobe={nprobe}",
               "recall@10": recall(fi, exact_i, 10), "recall@100": recall(fi, exact_i, 100),
               "queries_per_s": Q / sec, "classes_scored": ndis, "build_s": fbuild, "load_1m": load_avg(),
               "queries_per_cell": float("nan")}
        rows.append(row)
        print(f"  faiss nprobe {nprobe:>6}: r@10 {row['recall@10']:.3f} r@100 {row['recall@100']:.3f} "
              f"{row['queries_per_s']:,.0f} q/s, {row['classes_scored']:,.0f} scored", flush=True)
    del index, quantizer
    gc.collect()


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    cats = list(dict.fromkeys(r["catalogue"] for r in rows))
    fig, axes = plt.subplots(1, len(cats), figsize=(5 * len(cats), 4), squeeze=False)
    for ax, cat in zip(axes[0], cats):
        for method, style in (("midx", "o-"), ("midx_cell", "^-"), ("midx_copy", "o:"), ("midx_cell_copy", "^:"),
                              ("faiss_imi", "s--")):
            pts = [r for r in rows if r["catalogue"] == cat and r["method"] == method]
            if pts:
                ax.plot([r["queries_per_s"] for r in pts], [r["recall@10"] for r in pts], style, label=method)
        ex = [r for r in rows if r["catalogue"] == cat and r["method"] == "exact"]
        if ex:
            ax.axvline(ex[0]["queries_per_s"], color="gray", ls=":", label="exact top-k")
        ax.axhline(0.95, color="red", lw=0.5)
        ax.set_xscale("log")
        ax.set_xlabel("queries / s")
        ax.set_ylabel("recall@10")
        ax.set_title(cat)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--catalogues", nargs="*", default=["ml10m", "synthetic"], choices=["ml10m", "synthetic"])
    p.add_argument("--num-classes", type=int, nargs="*", default=[1_000_000, 20_000_000])
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--dim-20m", type=int, default=32, help="d at N >= 10M (keeps the run under ~6 GiB)")
    p.add_argument("--centres", type=int, default=4096)
    p.add_argument("--queries", type=int, default=256)
    p.add_argument("--codewords", type=int, default=0, help="K (0: about sqrt(N / cell_size), a power of 2)")
    p.add_argument("--cell-size", type=float, default=16.0)
    p.add_argument("--codewords-20m", type=int, default=256, help="K at N >= 10M (0: as --codewords)")
    p.add_argument("--queries-20m", type=int, default=128)
    p.add_argument("--repeats-20m", type=int, default=1)
    p.add_argument("--quantizer", default="rq", choices=["rq", "pq"])
    p.add_argument("--kmeans-iters", type=int, default=10)
    p.add_argument("--budget-fractions", type=float, nargs="*",
                   default=[0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2])
    p.add_argument("--max-fraction-20m", type=float, default=0.05, help="largest budget fraction at N >= 10M")
    p.add_argument("--nprobes", type=int, nargs="*", default=[4, 16, 64, 256, 1024, 4096, 16384])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rerank", nargs="*", default=["query", "cell"], choices=["query", "cell", "auto"],
                   help="MIDXSampler.search rerank orders to time")
    p.add_argument("--no-copy-vectors", dest="copy_vectors", action="store_false",
                   help="time only the live rows (no build(copy_vectors=True) copy: N*d less memory)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--model", default=os.path.join(RESULTS, "reference_model_ml10m.pt"))
    p.add_argument("--tag", default="")
    p.add_argument("--out", default=RESULTS)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    info = machine_info("cpu")
    rows = []
    os.makedirs(a.out, exist_ok=True)
    stem = os.path.join(a.out, f"retrieval_{machine_tag()}{a.tag}")

    def write():
        info["peak_rss_gib"] = peak_rss_bytes() / 2 ** 30
        info["load_avg_1m_end"] = load_avg()
        with open(stem + ".csv", "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
            wr.writeheader()
            wr.writerows(rows)
        with open(stem + ".json", "w") as f:
            json.dump({"machine": info, "args": vars(a), "rows": rows}, f, indent=1)
        plot(rows, stem + ".png")

    if "ml10m" in a.catalogues:
        if os.path.exists(a.model):
            ref = torch.load(a.model, weights_only=False)
            w, b, q = ref["weight"].float(), ref["bias"].float(), ref["queries"].float()[:a.queries]
            run_catalogue("ml10m", w.contiguous(), b.contiguous(), q.contiguous(), a, rows, info)
            write()
        else:
            print(f"{a.model} not found (bench/train_reference_model.py): ml10m skipped")
    if "synthetic" in a.catalogues:
        for n in a.num_classes:
            d = a.dim_20m if n >= 10_000_000 else a.dim
            w, q = clustered_catalogue(n, d, a.centres, a.queries_20m if n >= 10_000_000 else a.queries, seed=0)
            run_catalogue(f"synthetic_{n // 1_000_000}M" if n >= 1_000_000 else f"synthetic_{n}", w, None, q, a,
                          rows, info)
            write()  # after each catalogue: a later one that runs out of time keeps these
            del w
            gc.collect()
    print(f"wrote {stem}.csv / .json / .png; peak RSS {info['peak_rss_gib']:.2f} GiB")


if __name__ == "__main__":
    main()
