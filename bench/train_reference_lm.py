"""Train the Penn Treebank LSTM LM of examples/language_model with the FULL softmax and save its head.

The saved file has the layout of ``train_reference_model.py``'s, so ``kl_refine.py --model`` (and the
other scripts that read weight / bias / queries) take it as another trained head: weight [V, d] and
bias [V] of the output layer, queries [S, d] (LSTM outputs at S random positions of the validation
split, eval mode: no dropout) and query_targets [S] (the next token at each of them), plus metadata
(steps, validation perplexity, seed).

    python bench/train_reference_lm.py [--steps 600] [--queries 2048] [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

from memory import RESULTS  # noqa: E402


@torch.no_grad()
def head_queries(model, data: torch.Tensor, bptt: int, count: int, seed: int):
    """LSTM outputs h [count, d] at random positions of data [T, B] and the token that follows each."""
    model.eval()
    feats, nexts, state = [], [], None
    for i in range(0, data.shape[0] - 1, bptt):
        x = data[i:i + bptt]
        y = data[i + 1:i + 1 + x.shape[0]]
        x = x[: y.shape[0]]
        h, state = model.features(x, state)
        feats.append(h.reshape(-1, h.shape[-1]))
        nexts.append(y.reshape(-1))
    h, y = torch.cat(feats), torch.cat(nexts)
    pick = torch.randperm(h.shape[0], generator=torch.Generator().manual_seed(seed))[:count]
    return h[pick].contiguous(), y[pick].contiguous()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--queries", type=int, default=2048)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(RESULTS, "reference_lm_ptb.pt"))
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    from examples.language_model.lm import LMConfig, batchify, load_ptb, train_lm

    corpus = load_ptb()
    cfg = LMConfig(head="full", steps=a.steps, seed=a.seed, threads=a.threads, progress=not a.no_progress)
    res = train_lm(cfg, corpus, keep_model=True)
    model = res["model"]
    queries, targets = head_queries(model, batchify(corpus.ids["valid"], cfg.eval_batch_size), cfg.bptt,
                                    a.queries, a.seed)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    torch.save({"weight": model.out.weight.detach().clone(), "bias": model.out.bias.detach().clone(),
                "queries": queries, "query_targets": targets, "item_counts": corpus.counts.clone(),
                "meta": {"source": "ptb lstm lm, full softmax", "steps": a.steps, "seed": a.seed,
                         "val_ppl": res["val_ppl"], "vocab": corpus.vocab_size, "hidden": cfg.hidden}}, a.out)
    print(f"val ppl {res['val_ppl']:.2f} after {a.steps} steps; saved {a.out} "
          f"(weight {tuple(model.out.weight.shape)}, {queries.shape[0]} queries)")


if __name__ == "__main__":
    main()
