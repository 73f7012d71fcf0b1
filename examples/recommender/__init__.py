"""Two-tower recommender example for imi_softmax: data loaders, model, metrics, training loop.

    from examples.recommender import Config, train
    res = train(Config(data="ml100k", head="midx-rq", num_samples=256, epochs=5))
"""
from .data import (Interactions, Split, load_dataset, load_interactions, load_movielens_small, load_npz,
                   make_split, split_holdout)
from .metrics import ndcg_at_k, recall_at_k
from .model import HEADS, OutputHead, Recommender, UserEncoder
from .train import Config, Result, evaluate, train

__all__ = ["Interactions", "Split", "load_dataset", "load_interactions", "load_movielens_small", "load_npz",
           "make_split", "split_holdout", "ndcg_at_k", "recall_at_k", "HEADS", "OutputHead", "Recommender",
           "UserEncoder", "Config", "Result", "evaluate", "train"]
