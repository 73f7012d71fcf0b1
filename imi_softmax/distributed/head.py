"""ShardedIMISoftmax: IMISoftmax with its classes split across the ranks of a process group."""
import math
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._ddp import head_params_managed_by_active_ddp
from .._validation import (FLOAT_DTYPES, check_class_ids, check_finite, check_flag, check_head_input, check_ignore_index,
                           check_positive_int, check_tensor)
from ..samplers import Sampler
from ..samplers.base import no_autocast
from ..samplers.factory import SAMPLERS, make_sampler  # noqa: F401  (SAMPLERS: public name)
from .checkpoint import gather_full_state_dict, scatter_full_state_dict
from .collectives import Collectives, CommStats
from .eval import default_chunk, exact_row_losses, sharded_topk
from .._ops import acc_dtype
from .loss import GatheredBatch, ShardedSampledSoftmax, StepDraws, gather_batch, signal_failure
from .sharding import resolve_group, shard_bounds, split_samples

GRAD_REDUCTIONS = ("mean", "sum")
REDUCTIONS = ("mean", "sum", "none")
_EXTRA_STATE_KEY = "_extra_state"
_EXTRA_STATE_MARK = "imi_softmax_sharded_head"
_INIT_CHUNK = 1 << 16  # classes per initialisation chunk (one generator seed each)


class ShardedIMISoftmax(nn.Module):
    r"""IMISoftmax whose classes are split across the ranks of a torch.distributed process group.

    Rank p of the group owns the contiguous classes ``[shard_bounds[p], shard_bounds[p + 1])``:
    its rows of W [num_local_classes, in_features] and b, and its own proposal (a MIDX index over
    those rows, or another sampler). Weights never move. By default every rank owns
    ``num_classes / P`` classes (num_classes must be divisible by P); ``shard_sizes=`` gives an
    uneven split. Construction is collective: every rank of the group builds its head together (the
    ranks' arguments are compared, and a mismatch raises on every rank).

    Training step (``head(x, target)`` in training mode), every rank of the group together:
    queries x [B_r, d] and targets [B_r] are all-gathered (the local batch sizes may differ), each
    rank draws its share M_p of ``num_samples`` negatives per gathered row from its shard's
    proposal (exact shard log Q), computes its partial logsumexp per row (the target's logit only on
    its owner), the per-row logsumexp is combined across ranks (all-reduce of the max, then of the
    sum of exponentials), and in backward the gradient w.r.t. the gathered queries is
    reduce-scattered back to each query's rank. The estimator is stratified importance sampling
    over the shards, each sample corrected by ``-log(M_p * Q_p(j))`` (see
    :mod:`imi_softmax.distributed.loss`). Communication per step and rank: about
    ``2 * R * d + 5 * R + P`` numbers with R = P * B_r the global batch, whatever num_classes is.

    Returns the mean over this rank's rows (targets != ignore_index) of the row losses. W and b
    gradients are local and, with ``grad_reduction="mean"`` (default), equal the gradient of the
    mean over ranks of the ranks' losses: what DistributedDataParallel's averaging gives a
    replicated head, so a body under DDP and this head use the same learning rate. The x gradient is
    that of this rank's loss, as DDP expects. Every rank must call ``backward`` (the backward has
    collectives).

    ``head(x)`` returns this rank's logits [*, num_local_classes] (no communication). In eval mode
    ``head(x, target)`` is the exact cross-entropy over all num_classes (each rank over its classes
    in chunks, combined; no gradient), and :meth:`topk` merges every shard's top-k.

    Checkpoints: ``state_dict()`` is this rank's shard (``weight``, ``bias`` and an ``_extra_state``
    naming the class range); loading another rank's (or another split's) shard raises a ValueError.
    :meth:`full_state_dict` gathers an nn.Linear-compatible checkpoint on one rank and
    :meth:`load_full_state_dict` scatters one back (any world size, any split).

    Initialisation: row i of W and b is drawn from nn.Linear's distribution with a generator seeded
    from (``init_seed``, i // 65536), so the full matrix is the same for every world size and split.

    Args: as :class:`imi_softmax.IMISoftmax` (``num_samples`` is the total per row over all shards;
    ``class_counts`` the full [num_classes] counts), plus ``process_group`` (None: the default group),
    ``shard_sizes``, ``grad_reduction`` ("mean" | "sum" over ranks), ``eval_chunk_size`` (classes
    per chunk in eval and topk; None: about 4M logits per chunk) and ``init_seed``.
    Do not wrap this head in DistributedDataParallel (its parameters differ per rank; DDP would
    overwrite them with rank 0's): wrap the body only.
    """

    def __init__(self, in_features: int, num_classes: int, bias: bool = True, *, process_group=None,
                 shard_sizes: Optional[Sequence[int]] = None, num_samples: int = 256, num_codewords: int = 64,
                 quantizer: str = "rq", sampler: Union[str, Sampler] = "midx", refresh_every: int = 1000,
                 remove_accidental_hits: bool = True, sparse_grad: bool = False,
                 class_counts: Optional[Tensor] = None, kmeans_iters: int = 10, ignore_index: int = -100,
                 grad_reduction: str = "mean", eval_chunk_size: Optional[int] = None, init_seed: int = 0,
                 device=None, dtype=None):
        super().__init__()
        self.in_features = check_positive_int("in_features", in_features)
        self.num_classes = check_positive_int("num_classes", num_classes)
        num_samples = check_positive_int("num_samples", num_samples, minimum=0)
        self.refresh_every = check_positive_int("refresh_every", refresh_every, minimum=0)
        num_codewords = check_positive_int("num_codewords", num_codewords)
        if grad_reduction not in GRAD_REDUCTIONS:
            raise ValueError(f"grad_reduction must be one of {GRAD_REDUCTIONS}, got {grad_reduction!r}")
        if eval_chunk_size is not None:
            eval_chunk_size = check_positive_int("eval_chunk_size", eval_chunk_size)
        check_ignore_index(ignore_index)
        self.init_seed = check_positive_int("init_seed", init_seed, minimum=0)
        self.grad_reduction = grad_reduction
        self.eval_chunk_size = eval_chunk_size
        self.remove_accidental_hits = check_flag("remove_accidental_hits", remove_accidental_hits)
        self.sparse_grad = check_flag("sparse_grad", sparse_grad)
        bias = check_flag("bias", bias)
        self.ignore_index = ignore_index
        self.process_group, self.world_size, self.rank = resolve_group(process_group)
        self.shard_bounds = shard_bounds(num_classes, self.world_size, shard_sizes)
        self.num_samples = num_samples  # sets samples_per_shard
        self.class_start = self.shard_bounds[self.rank]
        self.class_stop = self.shard_bounds[self.rank + 1]
        self.num_local_classes = self.class_stop - self.class_start
        self._comm = Collectives(self.process_group, self.world_size, self.rank)
        self._check_same_config(bias, sampler, quantizer, num_codewords)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty((self.num_local_classes, in_features), **factory))
        self.bias = nn.Parameter(torch.empty(self.num_local_classes, **factory)) if bias else None
        if self.weight.dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be a floating dtype, got {self.weight.dtype}")
        self.sampler = self._make_sampler(sampler, num_codewords, quantizer, class_counts, kmeans_iters)
        self.reset_parameters()

    # -- construction ------------------------------------------------------------------------
    def _check_same_config(self, bias, sampler, quantizer, num_codewords) -> None:
        """One small all_gather_object at construction: ranks built with different arguments would
        otherwise hang or silently mix shapes at the first step."""
        sampler_name = sampler if isinstance(sampler, str) else type(sampler).__name__
        mine = {"in_features": self.in_features, "num_classes": self.num_classes, "bias": bool(bias),
                "num_samples": self.num_samples, "shard_bounds": self.shard_bounds, "sampler": sampler_name,
                "quantizer": quantizer, "num_codewords": num_codewords,
                "remove_accidental_hits": self.remove_accidental_hits, "ignore_index": self.ignore_index,
                "grad_reduction": self.grad_reduction, "sparse_grad": self.sparse_grad}
        configs = self._comm.all_gather_objects(mine)
        for p, other in enumerate(configs):
            diff = {k: (mine[k], other.get(k)) for k in mine if other.get(k) != mine[k]}
            if diff:
                details = ", ".join(f"{k}: this rank {a!r}, rank {p} {b!r}" for k, (a, b) in diff.items())
                raise ValueError(f"ShardedIMISoftmax was built with different arguments on the ranks of the "
                                 f"process group ({details}): build it with the same arguments on every rank")

    def _make_sampler(self, sampler, num_codewords, quantizer, class_counts, kmeans_iters) -> Sampler:
        if isinstance(sampler, Sampler):
            n = getattr(sampler, "num_classes", None)
            if n is not None and n != self.num_local_classes:
                raise ValueError(f"the sampler instance covers {n} classes; on this rank it must cover the "
                                 f"shard's {self.num_local_classes} classes [{self.class_start}, {self.class_stop})")
            return sampler
        return make_sampler(sampler, in_features=self.in_features, num_classes=self.num_classes,
                            num_codewords=num_codewords, quantizer=quantizer, class_counts=class_counts,
                            kmeans_iters=kmeans_iters, class_range=(self.class_start, self.class_stop))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """nn.Linear's initialisation, row i from a generator seeded by (init_seed, i // 65536): the
        same full matrix whatever the world size and split."""
        check_tensor("weight", self.weight)
        bound = 1 / math.sqrt(self.in_features)  # nn.Linear: kaiming_uniform(a=sqrt(5)) and its bias bound
        first = self.class_start // _INIT_CHUNK
        for c in range(first, (self.class_stop - 1) // _INIT_CHUNK + 1):
            g = torch.Generator().manual_seed(self.init_seed * 1_000_003 + c)
            lo, hi = c * _INIT_CHUNK, min((c + 1) * _INIT_CHUNK, self.num_classes)
            w = torch.rand((hi - lo, self.in_features), generator=g, dtype=torch.float32)
            b = torch.rand(hi - lo, generator=g, dtype=torch.float32)
            a, z = max(lo, self.class_start), min(hi, self.class_stop)
            dst = slice(a - self.class_start, z - self.class_start)
            self.weight[dst].copy_((w[a - lo:z - lo] * 2 - 1) * bound)
            if self.bias is not None:
                self.bias[dst].copy_((b[a - lo:z - lo] * 2 - 1) * bound)
        self.mark_index_stale()
        self._training_calls = 0

    # -- index ------------------------------------------------------------------------------
    def mark_index_stale(self) -> None:
        """The next draw rebuilds this shard's index (after the weights were replaced)."""
        self._index_stale = True

    @torch.no_grad()
    def refresh_index(self) -> None:
        """Rebuild this rank's proposal from its shard (no communication)."""
        check_tensor("weight", self.weight)
        self.sampler = self.sampler.to(self.weight.device)
        with no_autocast(self.weight.device):
            self.sampler.build(self.weight, self.bias)
        self._index_stale = False

    def _ensure_index(self) -> None:
        sampler_device = getattr(self.sampler, "device", None)
        if self._index_stale or (sampler_device is not None and sampler_device != self.weight.device):
            self.refresh_index()

    def _maybe_refresh(self) -> None:
        if self.refresh_every > 0 and self._training_calls > 0 and self._training_calls % self.refresh_every == 0:
            self._index_stale = True
        self._ensure_index()
        self._training_calls += 1

    # -- communication accounting ---------------------------------------------------------------
    @property
    def comm_stats(self) -> CommStats:
        """What this rank's collectives moved since the last :meth:`reset_comm_stats`."""
        return self._comm.stats

    def reset_comm_stats(self) -> None:
        self._comm.stats.reset()

    @property
    def num_samples(self) -> int:
        """M: negatives per row over all shards (set it on every rank alike)."""
        return self._num_samples

    @num_samples.setter
    def num_samples(self, value: int) -> None:
        value = check_positive_int("num_samples", value, minimum=0)
        self.samples_per_shard = split_samples(value, self.shard_bounds)
        self._num_samples = value

    @property
    def local_num_samples(self) -> int:
        """M_p: negatives this rank draws per gathered row."""
        return self.samples_per_shard[self.rank]

    # -- inputs -------------------------------------------------------------------------------
    def _check_input(self, x: Tensor, target: Optional[Tensor]) -> None:
        check_head_input(self, x, target)

    def _check_ddp(self) -> None:
        managed = head_params_managed_by_active_ddp(self)
        if managed:
            raise RuntimeError(
                "ShardedIMISoftmax inside DistributedDataParallel: each rank holds different classes, and DDP "
                "broadcasts rank 0's parameters at wrap time and averages gradients across ranks, which mixes "
                f"the shards. Wrap only the body in DDP, or list the head's parameters {managed} in "
                "DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names) before wrapping")

    def _checked(self, check) -> None:
        """Runs the input checks; a rank whose input fails still joins the step's first collective
        with a refusal, so the other ranks raise too instead of waiting for it forever."""
        try:
            check()
        except Exception:
            self._comm.all_gather(torch.tensor([-1], dtype=torch.int64, device=self.weight.device), "batch_sizes")
            raise

    def _gather(self, x: Tensor, target: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor], GatheredBatch]:
        flat_x = x.reshape(-1, self.in_features)
        flat_t = None if target is None else target.reshape(-1)
        return flat_x, flat_t, gather_batch(self._comm, flat_x, flat_t, self.ignore_index)

    # -- forward ----------------------------------------------------------------------------
    def forward(self, x: Tensor, target: Optional[Tensor] = None) -> Tensor:
        if target is None:
            self._check_input(x, None)
            return F.linear(x, self.weight, self.bias)
        if not self.training:
            return self.exact_loss(x, target)
        return self.loss(x, target)

    def draw(self, queries: Tensor, targets: Tensor, generator: Optional[torch.Generator] = None) -> StepDraws:
        """This shard's negatives for gathered rows: queries [R, d], targets [R] global class ids (-1 or
        another shard's ids: their target_log_q is a placeholder). Builds the index if it is stale."""
        check_tensor("queries", queries, dims=(2,), dtypes=FLOAT_DTYPES)
        check_tensor("targets", targets, dims=(1,))
        self._ensure_index()
        t_local = targets - self.class_start
        mine = (t_local >= 0) & (t_local < self.num_local_classes)
        safe = torch.where(mine, t_local, torch.zeros_like(t_local))
        ids, log_q, target_log_q = self.sampler.sample_with_targets(
            queries.detach(), self.local_num_samples, safe.unsqueeze(1), generator=generator)
        return StepDraws(ids, log_q, target_log_q.squeeze(1))

    def _check_draws(self, draws: StepDraws, rows: int) -> None:
        if not isinstance(draws, StepDraws):
            raise TypeError(f"draws must be a StepDraws (from head.draw), got {type(draws).__name__}")
        m = self.local_num_samples
        for name, t, shape in (("draws.ids", draws.ids, (rows, m)), ("draws.log_q", draws.log_q, (rows, m)),
                               ("draws.target_log_q", draws.target_log_q, (rows,))):
            check_tensor(name, t)
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} must be {shape} (the gathered rows x this rank's {m} samples), "
                                 f"got {tuple(t.shape)}")
        check_class_ids("draws.ids", draws.ids, self.num_local_classes)
        check_finite("draws.log_q", draws.log_q)

    def loss(self, x: Tensor, target: Tensor, *, reduction: str = "mean", generator: Optional[torch.Generator] = None,
             draws: Optional[StepDraws] = None) -> Tensor:
        """The sampled-softmax loss of this rank's rows (a collective: every rank calls it together).

        x [*, in_features], target [*] global class ids. ``reduction``: "mean" over this rank's
        non-ignored rows, "sum", or "none" (row losses [*]). ``generator`` drives this rank's draws;
        ``draws`` replaces them (a :class:`StepDraws` for the gathered rows, e.g. from :meth:`draw`)."""
        def check():
            self._check_input(x, target)
            if reduction not in REDUCTIONS:
                raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
            check_finite("x", x)
            self._check_ddp()

        self._checked(check)
        x = x.to(self.weight.dtype)
        with no_autocast(x.device):
            flat_x, flat_t, batch = self._gather(x, target)
            try:
                if draws is None:
                    self._maybe_refresh()
                    draws = self.draw(batch.x, batch.target, generator)
                else:
                    self._check_draws(draws, batch.x.shape[0])
                    self._training_calls += 1
            except Exception:
                # the other ranks are on their way to the first all-reduce: meet them there with the
                # failure signal, so that they raise instead of waiting for this rank forever
                signal_failure(self._comm, batch, acc_dtype(self.weight.dtype))
                raise
            scale = 1.0 / self.world_size if self.grad_reduction == "mean" else 1.0
            rows = ShardedSampledSoftmax.apply(flat_x, self.weight, self.bias, self._comm, batch, draws,
                                               self.class_start, self.local_num_samples,
                                               self.remove_accidental_hits, scale, self.sparse_grad)
        return _reduce(rows, flat_t, self.ignore_index, reduction, target.shape)

    @torch.no_grad()
    def exact_loss(self, x: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        """Exact cross-entropy of this rank's rows over all num_classes (a collective; no gradient):
        equal to ``F.cross_entropy(full_linear(x), target, reduction=...)``."""
        def check():
            self._check_input(x, target)
            if reduction not in REDUCTIONS:
                raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")

        self._checked(check)
        x = x.to(self.weight.dtype)
        _, flat_t, batch = self._gather(x, target)
        rows = exact_row_losses(self._comm, batch, self.weight.detach(),
                                None if self.bias is None else self.bias.detach(), self.class_start,
                                self._chunk(batch))
        return _reduce(rows.to(x.dtype), flat_t, self.ignore_index, reduction, target.shape)

    @torch.no_grad()
    def topk(self, x: Tensor, k: int) -> Tuple[Tensor, Tensor]:
        """(values, global class ids) [*, k] of the k largest logits over all num_classes, for this
        rank's rows (a collective)."""
        def check():
            self._check_input(x, None)
            if check_positive_int("k", k) > self.num_classes:
                raise ValueError(f"k must be <= num_classes ({self.num_classes}), got {k}")

        self._checked(check)
        k = int(k)  # checked: an int, or a numpy integer / one-element integer tensor
        flat_x, _, batch = self._gather(x.to(self.weight.dtype), None)
        v, i = sharded_topk(self._comm, batch, self.weight.detach(),
                            None if self.bias is None else self.bias.detach(), self.class_start, k,
                            self._chunk(batch))
        return v.reshape(*x.shape[:-1], k), i.reshape(*x.shape[:-1], k)

    def _chunk(self, batch: GatheredBatch) -> int:
        return self.eval_chunk_size or default_chunk(batch.x.shape[0])

    # -- checkpoints -------------------------------------------------------------------------
    def get_extra_state(self) -> Dict[str, Any]:
        return {_EXTRA_STATE_MARK: 1, "num_classes": self.num_classes, "class_start": self.class_start,
                "class_stop": self.class_stop, "world_size": self.world_size, "rank": self.rank,
                "training_calls": self._training_calls, "index_stale": self._index_stale,
                "sampler": self.sampler.state_dict()}

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        restored = self.sampler.load_state_dict(state["sampler"], device=self.weight.device)
        self._training_calls = int(state["training_calls"])
        self._index_stale = bool(state["index_stale"]) or not restored

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        extra = state_dict.get(prefix + _EXTRA_STATE_KEY)
        here = f"this rank ({self.rank} of {self.world_size}) owns classes [{self.class_start}, {self.class_stop}) of {self.num_classes}"
        fix = ("load each rank's own shard, or reshard through a full checkpoint: "
               "head.full_state_dict() on the old group, head.load_full_state_dict(sd) on the new one")
        if isinstance(extra, dict) and _EXTRA_STATE_MARK in extra:
            saved = (extra["class_start"], extra["class_stop"], extra["num_classes"])
            if saved != (self.class_start, self.class_stop, self.num_classes):
                raise ValueError(f"the state_dict holds the shard of classes [{saved[0]}, {saved[1]}) of {saved[2]} "
                                 f"(rank {extra['rank']} of {extra['world_size']}), but {here}: {fix}")
        elif extra is not None:
            raise ValueError("the state_dict's _extra_state was not written by ShardedIMISoftmax")
        weight = state_dict.get(prefix + "weight")
        if isinstance(weight, Tensor) and weight.shape[0] != self.num_local_classes:
            full = " (a full checkpoint: use head.load_full_state_dict)" if weight.shape[0] == self.num_classes else ""
            raise ValueError(f"the state_dict's weight has {weight.shape[0]} rows{full}, but {here}: {fix}")
        self._index_stale = True
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        key = prefix + _EXTRA_STATE_KEY
        if key in missing_keys:
            missing_keys.remove(key)

    def full_state_dict(self, dst: int = 0) -> Optional[Dict[str, Tensor]]:
        """nn.Linear-compatible ``{"weight", "bias"}`` of all classes on rank ``dst``, None elsewhere
        (a collective)."""
        return gather_full_state_dict(self, dst)

    def load_full_state_dict(self, state_dict: Optional[Dict[str, Tensor]], src: int = 0, prefix: str = "") -> None:
        """Scatters a full checkpoint held by rank ``src`` (None on the others) into the shards (a collective)."""
        scatter_full_state_dict(self, state_dict, src, prefix)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, bias={self.bias is not None}, "
                f"rank={self.rank}/{self.world_size}, classes=[{self.class_start}, {self.class_stop}), "
                f"num_samples={self.num_samples} (this shard {self.local_num_samples}), sampler={self.sampler}, "
                f"refresh_every={self.refresh_every}, remove_accidental_hits={self.remove_accidental_hits}, "
                f"sparse_grad={self.sparse_grad}, grad_reduction={self.grad_reduction!r}")


def _reduce(rows: Tensor, flat_t: Tensor, ignore_index: int, reduction: str, shape) -> Tensor:
    if reduction == "none":
        return rows.reshape(shape)
    if reduction == "sum":
        return rows.sum()
    kept = flat_t != ignore_index
    return rows[kept].sum() / kept.sum().to(rows.dtype)
