"""Two-tower example whose item vectors come from an item encoder over item features, trained with a
MIDX index over a stale cache of item embeddings, with or without imi_softmax.stale.EmbeddingCorrector.

    python examples/two_tower/run.py            # the T x corrector sweep on ML-10M (README, "Stale item embeddings")
"""
