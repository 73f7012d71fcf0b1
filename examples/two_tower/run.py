"""Stale item embeddings with and without the corrector: T x {stale cache, corrector} on ML-10M.

    python examples/two_tower/run.py                # T in {50, 500, 5000} x {off, on}, 600 steps each, one process
    # or one process per configuration, then one table:
    for T in 50 500 5000; do for c in off on; do
      python examples/two_tower/run.py --refresh-every $T --corrector $c --threads 1 --tag _T${T}_$c & done; done; wait
    python examples/two_tower/run.py --merge _T50_off _T50_on _T500_off _T500_on _T5000_off _T5000_on
    python examples/two_tower/run.py --refresh-every 50 500 --max-steps 300 --eval-users 5000   # quicker
    python examples/two_tower/run.py --reference    # adds T = 1 (fresh index every step: slow)

Writes results/stale_<data>.csv (one row per run), stale_<data>_probes.csv (KL(P || Q) per probed
step), stale_<data>.md (the table) and stale_<data>.png (KL against step; NDCG@10 and mean KL against
T). With --reference, T = 1 re-encodes the catalogue and rebuilds the index every step.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "examples.two_tower"

import torch

from ..recommender.data import load_dataset, make_split
from .train import StaleConfig, train_stale

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = ["label", "refresh_every", "corrector", "reset_on_refresh", "steps", "ndcg@10", "recall@20", "kl_mean", "kl_final",
           "refreshes", "corrected_builds", "encoded_items_mean", "num_items", "step_s_median", "refresh_s_median",
           "corrected_build_s_median", "train_s", "final_loss", "load_before", "load_after"]


def run_info() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:  # pragma: no cover
        commit = "?"
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "commit": commit,
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def plot(rows, probes, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = {}
    for r in rows:
        t = r["refresh_every"]
        c = colors.setdefault(t, f"C{len(colors)}")
        pts = [p for p in probes if p["label"] == r["label"]]
        ax[0].plot([p["step"] for p in pts], [p["kl"] for p in pts], color=c,
                   ls=(":" if r.get("reset_on_refresh") is True else "-") if r["corrector"] else "--", label=r["label"])
    ax[0].set(xlabel="step", ylabel="KL(P || Q) on probe users", yscale="log", title="proposal quality during training")
    ax[0].legend(fontsize=7)
    for on, reset, ls in ((False, False, "--"), (True, False, "-"), (True, True, ":")):
        sel = sorted((r for r in rows if r["corrector"] == on and (r.get("reset_on_refresh") is True) == reset
                      and r["refresh_every"] > 1), key=lambda r: r["refresh_every"])
        if not sel:
            continue
        name = ("corrector, reset at refresh" if reset else "corrector") if on else "stale cache"
        ax[1].plot([r["refresh_every"] for r in sel], [r["ndcg@10"] for r in sel], "o" + ls, label=name)
        ax[2].plot([r["refresh_every"] for r in sel], [r["kl_mean"] for r in sel], "o" + ls, label=name)
    ref = [r for r in rows if r["refresh_every"] == 1]
    for r in ref:
        ax[1].axhline(r["ndcg@10"], color="gray", lw=0.8, label="T=1 (fresh index)")
        ax[2].axhline(r["kl_mean"], color="gray", lw=0.8, label="T=1 (fresh index)")
    ax[1].set(xscale="log", xlabel="T (steps between cache refreshes)", ylabel="NDCG@10 (all items)")
    ax[2].set(xscale="log", xlabel="T (steps between cache refreshes)", ylabel="mean KL(P || Q) over training")
    ax[1].legend(fontsize=8)
    ax[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="ml10m")
    p.add_argument("--refresh-every", type=int, nargs="+", default=[50, 500, 5000])
    p.add_argument("--reference", action="store_true", help="add the T=1 run (index rebuilt over fresh vectors every step)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--correct-every", type=int, default=25)
    p.add_argument("--eval-users", type=int, default=5000, help="0 = every test user")
    p.add_argument("--max-steps", type=int, default=600)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="", help="suffix of the result file names")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--corrector", choices=["both", "on", "off"], default="both")
    p.add_argument("--reset-on-refresh", action="store_true", help="reset the corrector at every cache refresh")
    p.add_argument("--merge", nargs="+", metavar="TAG", help="only merge the result files of these --tag runs")
    p.add_argument("--header", default="", help="with --merge: the first lines of the table file")
    a = p.parse_args(argv)
    if a.merge:
        merge(a.data, [t if t != "-" else "" for t in a.merge], a.header.split("\\n"))
        return
    if a.threads:
        torch.set_num_threads(a.threads)
    split = make_split(load_dataset(a.data), 0.2, 0)
    base = StaleConfig(epochs=a.epochs, num_samples=a.num_samples, correct_every=a.correct_every,
                       reset_on_refresh=a.reset_on_refresh, eval_users=a.eval_users or None, max_steps=a.max_steps, seed=a.seed, progress=not a.no_progress)
    runs = [base.replace(refresh_every=1)] if a.reference else []
    runs += [base.replace(refresh_every=t, corrector=c) for t in a.refresh_every
             for c in {"both": (False, True), "on": (True,), "off": (False,)}[a.corrector]]
    info = run_info()
    print(f"{split.name}: {split.num_users} users, {split.num_items} items; {info}", flush=True)
    rows, probes = [], []
    stem = f"stale_{split.name}{a.tag}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    for cfg in runs:
        load0 = os.getloadavg()[0]
        res = train_stale(cfg, split)
        row = {k: res.get(k) for k in COLUMNS}
        row.update({"refresh_every": cfg.refresh_every, "corrector": cfg.corrector, "reset_on_refresh": cfg.reset_on_refresh, "ndcg@10": res["metrics"]["ndcg@10"],
                    "recall@20": res["metrics"]["recall@20"], "load_before": load0, "load_after": os.getloadavg()[0]})
        rows.append(row)
        probes += [{"label": cfg.label, **pr} for pr in res["probes"]]
        write_csvs(rows, probes, stem)  # rewritten after every run
    (RESULTS / f"{stem}.json").write_text(json.dumps({"info": info, "args": vars(a), "config": asdict(base)},
                                                     indent=1, default=str))
    header = [f"# Stale item embeddings: {split.name}, {rows[0]['steps']} steps of {base.batch_users} users x "
              f"{base.targets_per_user} targets, M={a.num_samples}, K={base.num_codewords}, corrector rebuild every "
              f"{a.correct_every} steps; NDCG@10 over {a.eval_users or 'all'} test users", "",
              f"Command: `python examples/two_tower/run.py {' '.join(argv if argv is not None else sys.argv[1:])}`  ",
              f"Machine: {info['cores']} cores, {info['torch_threads']} torch threads, torch {info['torch']}, "
              f"commit {info['commit']}, {info['time']}; shared machine (load avg per row): timings are noisy."]
    write_report(rows, probes, stem, header)


def write_csvs(rows, probes, stem: str) -> None:
    """results/<stem>.csv (one row a run, COLUMNS) and results/<stem>_probes.csv (one row a probe)."""
    with open(RESULTS / f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    with open(RESULTS / f"{stem}_probes.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["label", "step", "cache_age", "kl", "ess_limit", "cache_mse", "corrected_mse"])
        w.writeheader()
        w.writerows(probes)


def write_report(rows, probes, stem: str, header) -> None:
    lines = list(header) + ["",
             "| T | corrector | NDCG@10 | Recall@20 | mean KL(P‖Q) | final KL | refreshes | corrected builds | "
             "items encoded / step | ms/step (median) | refresh ms | corrected build ms | load |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    rows = sorted(rows, key=lambda r: (r["refresh_every"], r["corrector"], r.get("reset_on_refresh") is True))
    for r in rows:
        ms = lambda v: "-" if v != v else f"{v * 1e3:.0f}"  # noqa: E731  (NaN -> "-")
        kind = ("yes, reset at refresh" if r.get("reset_on_refresh") is True else "yes") if r["corrector"] else "no"
        lines.append(f"| {r['refresh_every']} | {kind} | {r['ndcg@10']:.4f} | "
                     f"{r['recall@20']:.4f} | {r['kl_mean']:.3f} | {r['kl_final']:.3f} | {r['refreshes']} | "
                     f"{r['corrected_builds']} | {r['encoded_items_mean']:.0f} / {r['num_items']} | "
                     f"{r['step_s_median'] * 1e3:.0f} | {ms(r['refresh_s_median'])} | {ms(r['corrected_build_s_median'])} | "
                     f"{r['load_before']:.1f}-{r['load_after']:.1f} |")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    plot(rows, probes, RESULTS / f"{stem}.png")
    print("\n".join(lines))


def _typed(row: dict) -> dict:
    out = {}
    for k, v in row.items():
        if k in ("label",):
            out[k] = v
        elif k in ("corrector", "reset_on_refresh"):
            out[k] = v == "True"
        elif v == "":
            out[k] = float("nan")
        else:
            f = float(v)
            out[k] = int(f) if k in ("refresh_every", "steps", "refreshes", "corrected_builds", "num_items", "step",
                                     "cache_age") else f
    return out


def merge(data: str, tags, header) -> None:
    """One table and plot from the result files of several runs (e.g. one process per configuration)."""
    rows, probes = [], []
    for t in tags:
        with open(RESULTS / f"stale_{data}{t}.csv") as f:
            rows += [_typed(r) for r in csv.DictReader(f)]
        with open(RESULTS / f"stale_{data}{t}_probes.csv") as f:
            probes += [_typed(r) for r in csv.DictReader(f)]
    stem = f"stale_{data}"
    write_csvs(rows, probes, stem)
    write_report(rows, probes, stem, header)

if __name__ == "__main__":
    main()
