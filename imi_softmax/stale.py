"""Sampled softmax over item vectors that come from an item encoder (two-tower models with item
features), with the MIDX index built over a *cache* of item embeddings that goes stale.

Three pieces, usable on their own:

- :class:`EmbeddingCorrector`: a small residual MLP trained online to map a cached item embedding to
  the item encoder's current output, on the items a training step re-encodes anyway.
- :class:`StaleEmbeddingIndex`: the cache [N, d], refreshed by re-encoding the catalogue every
  ``refresh_every`` (T) steps, and a :class:`~imi_softmax.MIDXSampler` built over it; with a corrector,
  the index is rebuilt every ``correct_every`` steps over ``corrector(cache)`` in between.
- :func:`fresh_sampled_softmax_loss`: draws negatives from whichever index is current, runs the item
  encoder on the unique target + drawn items of the step only (never the catalogue), remaps the ids to
  rows of that local [U, d] weight and calls :func:`imi_softmax.functional.sampled_softmax_loss` with
  the exact log Q of the index that drew them.

Exactness: the proposal is whatever index the sampler holds when ``sample`` runs; its log Q is exact for
that index (built over stale or corrected vectors), so the loss is the usual unbiased-in-the-limit
sampled softmax of the fresh logits, whatever the cache's staleness. Staleness only makes Q a worse
match of the softmax P (larger KL(P || Q), fewer effective samples), never a wrong correction.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Dict, NamedTuple, Optional

import torch
import torch.nn as nn
from torch import Tensor

from ._validation import FLOAT_DTYPES, check_class_ids, check_finite, check_flag, check_positive_int, check_tensor
from .functional import sampled_softmax_loss
from .samplers import MIDXSampler

__all__ = ["EmbeddingCorrector", "StaleEmbeddingIndex", "FreshLoss", "fresh_sampled_softmax_loss"]


def _check_embeddings(name: str, value, dim: int) -> Tensor:
    check_tensor(name, value, dims=(2,), dtypes=FLOAT_DTYPES)
    if value.shape[1] != dim:
        raise ValueError(f"{name} must be [N, {dim}] (embedding_dim = {dim}), got {tuple(value.shape)}: "
                         f"pass item embeddings of the dimension the corrector/index was made for")
    return value


class EmbeddingCorrector(nn.Module):
    """``corrected = cached + MLP(cached)``: maps a stale cached item embedding to an estimate of the
    item encoder's current output. The last layer starts at zero, so an untrained corrector is the
    identity (the plain stale cache).

    Trained online by :meth:`fit_step` on pairs (cached [U, d], fresh [U, d]) of the items a step
    re-encodes anyway (its targets and drawn negatives); its own Adam optimizer, whose state is part
    of ``state_dict()`` (as the module's extra state), so a resumed run continues bit-exactly.

    Args:
        embedding_dim: d, the item embedding size.
        hidden: hidden width of the MLP (default 2 * d).
        lr: Adam learning rate of :meth:`fit_step`.
        device, dtype: of the parameters (float32 by default).

    Shapes: ``forward(cached [*, d]) -> [*, d]``; ``fit_step(cached [U, d], fresh [U, d]) -> float``
    (the mean squared error before the step); ``error(cached, fresh) -> float`` (no update).
    """

    def __init__(self, embedding_dim: int, hidden: Optional[int] = None, *, lr: float = 1e-3,
                 device=None, dtype=None):
        super().__init__()
        self.embedding_dim = check_positive_int("embedding_dim", embedding_dim)
        self.hidden = check_positive_int("hidden", 2 * embedding_dim if hidden is None else hidden)
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
            raise ValueError(f"lr must be a positive number, got {lr!r}")
        self.lr = float(lr)
        kw = dict(device=device, dtype=dtype)
        self.mlp = nn.Sequential(nn.Linear(self.embedding_dim, self.hidden, **kw), nn.GELU(),
                                 nn.Linear(self.hidden, self.embedding_dim, **kw))
        self.reset()

    def reset(self) -> None:
        """Back to the identity map: the last layer zeroed and a fresh optimizer state (the hidden
        layer is kept). For a cache that was just refreshed, whose drift the old map does not describe."""
        with torch.no_grad():
            self.mlp[2].weight.zero_()
            self.mlp[2].bias.zero_()
        self._optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
        self.num_updates = 0

    def forward(self, cached: Tensor) -> Tensor:
        check_tensor("cached", cached, dtypes=FLOAT_DTYPES)
        if cached.dim() < 1 or cached.shape[-1] != self.embedding_dim:
            raise ValueError(f"cached must be [*, {self.embedding_dim}], got {tuple(cached.shape)}")
        x = cached.to(self.mlp[0].weight.dtype)
        return x + self.mlp(x)

    def _pair(self, cached: Tensor, fresh: Tensor):
        _check_embeddings("cached", cached, self.embedding_dim)
        _check_embeddings("fresh", fresh, self.embedding_dim)
        if cached.shape != fresh.shape:
            raise ValueError(f"cached {tuple(cached.shape)} and fresh {tuple(fresh.shape)} must be the same items "
                             f"(one row each): pass cache[ids] and the encoder's output for the same ids")
        if cached.device != fresh.device:
            raise ValueError(f"cached is on {cached.device} but fresh is on {fresh.device}; move them to one device")
        dt = self.mlp[0].weight.dtype
        return cached.detach().to(dt), fresh.detach().to(dt)

    def fit_step(self, cached: Tensor, fresh: Tensor) -> float:
        """One Adam step on the mean squared error ||forward(cached) - fresh||^2 / (U d); returns that
        error before the step (float). Gradients reach the corrector only (inputs are detached)."""
        cached, fresh = self._pair(cached, fresh)
        if cached.shape[0] == 0:
            return float("nan")
        check_finite("fresh", fresh)
        with torch.enable_grad():
            loss = (self(cached) - fresh).pow(2).mean()
            self._optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self._optimizer.step()
        self.num_updates += 1
        return float(loss.detach())

    @torch.no_grad()
    def error(self, cached: Tensor, fresh: Tensor) -> float:
        """Mean squared error of the corrected cache against fresh (no update)."""
        cached, fresh = self._pair(cached, fresh)
        return float((self(cached) - fresh).pow(2).mean())

    def get_extra_state(self) -> Dict[str, Any]:
        return {"optimizer": self._optimizer.state_dict(), "num_updates": self.num_updates}

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        # a copy: Optimizer.load_state_dict keeps the given moment tensors, which would otherwise be
        # shared with (and stepped by) the corrector the state came from
        self._optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        self.num_updates = int(state["num_updates"])

    def extra_repr(self) -> str:
        return f"embedding_dim={self.embedding_dim}, hidden={self.hidden}, lr={self.lr}"


class StaleEmbeddingIndex(nn.Module):
    """A cache of item embeddings refreshed every T steps and the MIDX index sampled from.

    Call :meth:`begin_step` once at the start of every training step with a callable that encodes the
    whole catalogue ([N, d], called only when the cache is refreshed). Schedule, counted in steps:

    - step 0 and every ``refresh_every`` (T) steps: cache = encode_all(); index built over the cache.
    - with a corrector, every ``correct_every`` steps in between: the index is rebuilt (full
      :meth:`MIDXSampler.build`, k-means warm-started from the previous codebooks) over
      ``corrector(cache)``. Without one, the index stays the one built at the last refresh.

    :meth:`observe` trains the corrector on the items the step encoded (cache[ids] -> fresh).
    :meth:`sample` / :meth:`log_prob` use the index current at the call: log Q is exact for it.

    Args:
        sampler: the MIDXSampler to (re)build (any Sampler with ``build``/``sample``/``log_prob``).
        refresh_every: T >= 1.
        corrector: an :class:`EmbeddingCorrector` or None (plain stale cache).
        correct_every: steps between rebuilds over the corrected cache (>= 1; used with a corrector).
        reset_on_refresh: reset the corrector to the identity at every refresh after the first (it
            learned the drift of the old cache, which the fresh cache does not have).

    state_dict holds the cache (buffer ``cache`` [N, d]), the step counters, the corrector and the
    sampler's state (extra state), so a resumed run samples from the same index.
    """

    def __init__(self, sampler: MIDXSampler, refresh_every: int, corrector: Optional[EmbeddingCorrector] = None,
                 correct_every: int = 10, reset_on_refresh: bool = False):
        super().__init__()
        reset_on_refresh = check_flag("reset_on_refresh", reset_on_refresh)
        self.reset_on_refresh = reset_on_refresh
        if not hasattr(sampler, "build") or not hasattr(sampler, "sample"):
            raise TypeError(f"sampler must be a Sampler with build/sample/log_prob (e.g. MIDXSampler()), "
                            f"got {type(sampler).__name__}")
        self.sampler = sampler
        self.refresh_every = check_positive_int("refresh_every", refresh_every)
        self.correct_every = check_positive_int("correct_every", correct_every)
        if corrector is not None and not isinstance(corrector, EmbeddingCorrector):
            raise TypeError(f"corrector must be an EmbeddingCorrector or None, got {type(corrector).__name__}")
        self.corrector = corrector
        self.register_buffer("cache", None)
        self.step = 0                 # steps begun
        self.last_refresh = -1        # step of the last cache refresh
        self.last_build = -1          # step of the last index build (refresh or corrected rebuild)
        self.num_refreshes = 0
        self.num_corrected_builds = 0

    @property
    def num_classes(self) -> Optional[int]:
        """N, the catalogue size (None before the first refresh)."""
        return None if self.cache is None else self.cache.shape[0]

    @property
    def cache_age(self) -> int:
        """Steps since the cache was refreshed (at the current step)."""
        return self.step - 1 - self.last_refresh

    def refresh(self, embeddings: Tensor) -> None:
        """Replace the cache by embeddings [N, d] and build the index over it."""
        check_tensor("embeddings", embeddings, dims=(2,), dtypes=FLOAT_DTYPES)
        if self.cache is not None and embeddings.shape != self.cache.shape:
            raise ValueError(f"embeddings must be {tuple(self.cache.shape)} like the cache, got "
                             f"{tuple(embeddings.shape)}: a different catalogue needs a new StaleEmbeddingIndex")
        if self.corrector is not None and embeddings.shape[1] != self.corrector.embedding_dim:
            raise ValueError(f"embeddings must be [N, {self.corrector.embedding_dim}] (the corrector's "
                             f"embedding_dim), got {tuple(embeddings.shape)}")
        if self.reset_on_refresh and self.corrector is not None and self.cache is not None:
            self.corrector.reset()
        self.cache = embeddings.detach().to(torch.float32).clone()
        self.sampler.build(self.cache)
        self.last_refresh = self.last_build = self.step - 1
        self.num_refreshes += 1

    @torch.no_grad()
    def rebuild_corrected(self) -> None:
        """Build the index over corrector(cache) now."""
        if self.cache is None or self.corrector is None:
            raise RuntimeError("rebuild_corrected needs a cache (call begin_step/refresh first) and a corrector")
        self.sampler.build(self.corrector(self.cache).float())
        self.last_build = self.step - 1
        self.num_corrected_builds += 1

    def begin_step(self, encode_all: Callable[[], Tensor]) -> str:
        """Advance one step; refresh the cache or rebuild the index when due. Returns what it did:
        "refresh", "corrected" or "none"."""
        self.step += 1
        now = self.step - 1
        if self.cache is None or now - self.last_refresh >= self.refresh_every:
            with torch.no_grad():
                emb = encode_all()
            self.refresh(emb)
            return "refresh"
        if self.corrector is not None and now - self.last_build >= self.correct_every:
            self.rebuild_corrected()
            return "corrected"
        return "none"

    def observe(self, ids: Tensor, fresh: Tensor) -> float:
        """Train the corrector on items ids [U] (int64) re-encoded this step, fresh [U, d]; returns
        its error before the update (NaN without a corrector)."""
        if self.cache is None:
            raise RuntimeError("observe needs a cache: call begin_step(encode_all) first")
        check_tensor("ids", ids, dims=(1,))
        if ids.dtype != torch.int64:
            raise TypeError(f"ids must hold int64 item ids, got {ids.dtype}")
        check_class_ids("ids", ids, self.cache.shape[0])
        _check_embeddings("fresh", fresh, self.cache.shape[1])
        if fresh.shape[0] != ids.shape[0]:
            raise ValueError(f"fresh must have one row per id: ids has {ids.shape[0]}, fresh {fresh.shape[0]}")
        if self.corrector is None:
            return float("nan")
        return self.corrector.fit_step(self.cache[ids.to(self.cache.device)], fresh.to(self.cache.device))

    def sample(self, query: Tensor, num_samples: int, generator: Optional[torch.Generator] = None):
        """(ids [B, M] int64, log_q [B, M] float32) from the current index."""
        return self.sampler.sample(query, num_samples, generator=generator)

    def log_prob(self, query: Tensor, ids: Tensor) -> Tensor:
        """Exact log Q(ids | query) of the current index; ids [B, ...]."""
        return self.sampler.log_prob(query, ids)

    def get_extra_state(self) -> Dict[str, Any]:
        return {"sampler": self.sampler.state_dict(), "step": self.step, "last_refresh": self.last_refresh,
                "last_build": self.last_build, "num_refreshes": self.num_refreshes,
                "num_corrected_builds": self.num_corrected_builds}

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
        for k in ("step", "last_refresh", "last_build", "num_refreshes", "num_corrected_builds"):
            setattr(self, k, int(state[k]))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "cache"
        if key in state_dict and self.cache is None:  # the cache is None before the first refresh
            self.cache = torch.empty_like(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        n = None if self.cache is None else tuple(self.cache.shape)
        return (f"refresh_every={self.refresh_every}, correct_every={self.correct_every}, "
                f"reset_on_refresh={self.reset_on_refresh}, cache={n}, "
                f"step={self.step}")


class FreshLoss(NamedTuple):
    """What :func:`fresh_sampled_softmax_loss` computed, for logging and for the exactness tests."""

    loss: Tensor            # scalar (reduction "mean")
    unique_ids: Tensor      # [U] int64 global item ids encoded this step (sorted)
    fresh: Tensor           # [U, d] encoder output for unique_ids (in the autograd graph)
    sample_ids: Tensor      # [B, M] int64 global ids drawn
    sample_log_q: Tensor    # [B, M] float32 log Q of the index that drew them
    target_log_q: Tensor    # [B] float32
    local_target: Tensor    # [B] int64 rows of fresh
    local_samples: Tensor   # [B, M] int64 rows of fresh


def fresh_sampled_softmax_loss(query: Tensor, target: Tensor, sampler, encode: Callable[[Tensor], Tensor],
                               num_samples: int, *, generator: Optional[torch.Generator] = None,
                               remove_accidental_hits: bool = True) -> FreshLoss:
    """Sampled softmax whose logits use fresh item embeddings of the step's items only.

    query [B, d], target [B] int64 item ids in [0, N). ``sampler`` is built over (possibly stale)
    item vectors of the N items (a MIDXSampler or a :class:`StaleEmbeddingIndex`); ``encode(ids [U])
    -> [U, d]`` runs the item encoder on the given global ids. Draws M = num_samples ids per row from
    the sampler's current index with their exact log Q and the targets' log Q from the same index,
    encodes the U unique target + drawn ids, and evaluates the fused loss on the local [U, d] weight
    with the ids remapped to its rows (a bijection on the U ids, so accidental hits are the same).
    """
    check_tensor("query", query, dims=(2,), dtypes=FLOAT_DTYPES)
    check_tensor("target", target, dims=(1,))
    if target.dtype != torch.int64:
        raise TypeError(f"target must hold int64 item ids, got {target.dtype}")
    if target.shape[0] != query.shape[0]:
        raise ValueError(f"target must be [{query.shape[0]}] (one item per query row), got {tuple(target.shape)}")
    num_samples = check_positive_int("num_samples", num_samples, minimum=0)
    n = sampler.num_classes
    if n is None:
        raise RuntimeError("sampler has no index yet: build it (or call StaleEmbeddingIndex.begin_step) first")
    check_class_ids("target", target, n)
    q = query.detach()
    ids, log_q = sampler.sample(q, num_samples, generator=generator)
    t_log_q = sampler.log_prob(q, target.unsqueeze(1)).squeeze(1)
    unique_ids, inverse = torch.unique(torch.cat([target, ids.reshape(-1)]), return_inverse=True)
    fresh = encode(unique_ids)
    if not isinstance(fresh, Tensor) or fresh.shape != (unique_ids.shape[0], query.shape[1]):
        got = tuple(fresh.shape) if isinstance(fresh, Tensor) else type(fresh).__name__
        raise ValueError(f"encode(ids [U]) must return [U, {query.shape[1]}] = [{unique_ids.shape[0]}, "
                         f"{query.shape[1]}], got {got}")
    b = target.shape[0]
    local_target = inverse[:b]
    local_samples = inverse[b:].reshape(ids.shape)
    loss = sampled_softmax_loss(query, fresh.to(query.dtype), None, local_target, local_samples,
                                log_q.to(query.dtype), t_log_q.to(query.dtype),
                                remove_accidental_hits=remove_accidental_hits)
    return FreshLoss(loss, unique_ids, fresh, ids, log_q, t_log_q, local_target, local_samples)
