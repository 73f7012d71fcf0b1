"""IMISoftmax: nn.Linear + cross-entropy over a huge output space, trained with the MIDX sampled softmax."""
import contextlib
import math
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ._ddp import head_params_managed_by_active_ddp
from ._serial_glue import serial_glue
from ._validation import (FLOAT_DTYPES, check_class_ids, check_finite, check_flag, check_generator, check_head_input,
                          check_ignore_index, check_positive_int, check_tensor)
from .chunked import auto_chunk_size, chunked_cross_entropy, chunked_multilabel_loss, chunked_topk
from .functional import _sampled_softmax_loss
from .multilabel import MultiLabelTarget, is_multilabel_target, multilabel_loss, padded_positives
from .samplers import MIDXSampler, Sampler
from .samplers.base import no_autocast
from .samplers.factory import SAMPLERS, make_sampler  # noqa: F401  (SAMPLERS: public name)

_EXTRA_STATE_KEY = "_extra_state"  # torch.nn.modules.module._EXTRA_STATE_KEY_SUFFIX
_EXTRA_STATE_MARK = "imi_softmax_head"


class IMISoftmax(nn.Module):
    r"""Output layer over ``num_classes`` classes with an adaptive sampled-softmax training loss.

    ``head(x)`` returns the full logits ``F.linear(x, weight, bias)`` [*, num_classes].
    ``head(x, target)`` returns, in training mode, the sampled-softmax loss (a scalar, mean over
    targets != ignore_index) with ``num_samples`` negatives per row drawn from the proposal and
    corrected by its exact log-probability; in eval mode, the exact
    ``F.cross_entropy(F.linear(x, weight, bias), target)``.

    Args:
        in_features: d, size of each input row.
        num_classes: N, number of output classes.
        bias: learn an additive bias (as nn.Linear).
        num_samples: M, negatives per query row.
        num_codewords: K codewords per codebook (K*K cells) for ``sampler="midx"``.
        quantizer: "rq" (residual, default) or "pq" (product; needs even in_features).
        sampler: "midx" | "uniform" | "unigram" | "exact", or a :class:`Sampler` instance.
        refresh_every: training forward calls between index rebuilds (0 = only manual
            :meth:`refresh_index`). The first training forward always builds the index.
        full_refresh_every: with ``sampler="midx"``, one refresh in this many is a full rebuild
            (k-means + assignment of every class); the others are incremental: only the classes
            that were a target or a sample since the last build are re-assigned against the frozen
            codebooks (0 or 1 = every refresh is full). See :meth:`refresh_index`.
        eval_chunk_size: classes per chunk of the eval-mode exact cross-entropy and of
            :meth:`topk` (None: chosen so that a [B, chunk] float32 block is about 32 MiB).
        remove_accidental_hits: drop samples equal to the row's target.
        sparse_grad: weight.grad / bias.grad as sparse COO tensors over the touched rows.
        class_counts: [num_classes] frequencies, required by ``sampler="unigram"``.
        kmeans_iters: Lloyd iterations per index rebuild.
        kl_refine_steps: with ``sampler="midx"`` (or a MIDXSampler), Adam steps of
            :meth:`MIDXSampler.refine_codebooks` after each full rebuild, on the last
            ``kl_refine_queries`` training query rows (0 = no refinement, the default; a sampler
            instance keeps its own ``kl_refine_steps`` unless this is > 0). README, "KL-refined
            codebooks", says when it helps. Each rank of a multi-process run refines on its own
            queries (every index stays exact, but the ranks' proposals then differ).
        kl_refine_queries: size of the ring buffer of recent training query rows the refinement
            fits (kept only when refinement is on; saved in ``_extra_state``).
        ignore_index: target value that is skipped (as in F.cross_entropy).
        process_group: a torch.distributed process group: the constructor then returns a
            :class:`imi_softmax.ShardedIMISoftmax` (each rank owns a contiguous class range;
            ``full_refresh_every`` does not apply there). None: this single-process head.

    Multi-label targets: ``head(x, target)`` also takes a padded ``[*, L]`` int64 target (pad =
    ``ignore_index``; told apart from a single-label target by having one more dimension, x's) or a
    CSR pair ``(offsets [B+1], labels [nnz])`` over the B = prod(*) rows. Training: for each positive
    p of a row, the sampled softmax over {p} and the row's negatives, with every positive of the row
    removed from its negatives; mean over the row's positives, then over rows with at least one
    (:func:`imi_softmax.functional.multilabel_sampled_softmax_loss` offers "sum" and "none"). Eval:
    the exact ``log(exp(o_p) + sum_{j not a positive} exp(o_j)) - o_p`` with the same reduction,
    over class chunks. The L positives of a row share one pass over its M negatives.

    Shapes: x [*, in_features], target [*] int64. ``B = 0`` rows give NaN (a mean over zero
    targets, as F.cross_entropy); ``num_samples=0`` gives the loss over the target alone (0).

    Mixed precision: under ``torch.autocast`` an fp32 head takes bf16/fp16 ``x``; ``head(x)`` is
    F.linear under autocast, the training loss is computed in the weight's dtype (fp32) and the
    index is built without autocast.

    Checkpoints: ``state_dict()`` holds ``weight``, ``bias`` (nn.Linear's keys) and
    ``_extra_state`` (the index, the k-means generator, the training-call counter), so a run resumes
    bit for bit. A plain nn.Linear's state_dict loads into the head as is (the index is then rebuilt
    on first use); the other way, drop the extra key with :meth:`linear_state_dict` (or load with
    ``strict=False``).

    Distributed: inside DistributedDataParallel use ``sparse_grad=False`` (DDP's reducer copies
    every gradient into dense buckets; only nn.Embedding's sparse gradients are exempt, so a
    sparse-gradient head inside DDP raises a clear error at its first forward). To keep sparse
    gradients, leave the head outside the DDP wrapper and average its gradients yourself:
    ``head.broadcast_parameters()`` once, then ``head.all_reduce_grads()`` after each backward.
    Every rank builds the same index from the same weights (the k-means generator is seeded
    identically).

    Under ``torch.compile`` the index is not rebuilt inside the compiled graph: build it once
    (``refresh_index()`` or one eager training step) and call ``refresh_index()`` on your schedule.
    """

    def __new__(cls, *args, process_group=None, **kwargs):
        # IMISoftmax(..., process_group=pg) is the class-sharded head (DESIGN.md's spelling).
        if process_group is not None and cls is IMISoftmax:
            from .distributed import ShardedIMISoftmax
            return ShardedIMISoftmax(*args, process_group=process_group, **kwargs)
        return super().__new__(cls)

    def __init__(self, in_features: int, num_classes: int, bias: bool = True, *,
                 num_samples: int = 256, num_codewords: int = 64, quantizer: str = "rq",
                 sampler: Union[str, Sampler] = "midx", refresh_every: int = 1000,
                 remove_accidental_hits: bool = True, sparse_grad: bool = False,
                 class_counts: Optional[Tensor] = None, kmeans_iters: int = 10,
                 ignore_index: int = -100, full_refresh_every: int = 10,
                 eval_chunk_size: Optional[int] = None, kl_refine_steps: int = 0,
                 kl_refine_queries: int = 4096, process_group=None, device=None, dtype=None):
        super().__init__()
        self.in_features = check_positive_int("in_features", in_features)
        self.num_classes = check_positive_int("num_classes", num_classes)
        self.num_samples = check_positive_int("num_samples", num_samples, minimum=0)
        self.refresh_every = refresh_every
        num_codewords = check_positive_int("num_codewords", num_codewords)
        self.remove_accidental_hits = check_flag("remove_accidental_hits", remove_accidental_hits)
        self.sparse_grad = check_flag("sparse_grad", sparse_grad)
        bias = check_flag("bias", bias)
        self.ignore_index = ignore_index
        self.full_refresh_every = full_refresh_every
        self.eval_chunk_size = eval_chunk_size
        self._touched: Optional[Tensor] = None  # [N] bool: classes that may have changed since the last build
        self._refreshes_since_full = 0
        factory = {"device": device, "dtype": dtype}
        if dtype is not None and dtype not in FLOAT_DTYPES:  # before nn.Parameter refuses it less clearly
            floats = ", ".join(str(d) for d in FLOAT_DTYPES)
            raise TypeError(f"dtype must be a floating dtype ({floats}), got {dtype!r}")
        self.weight = nn.Parameter(torch.empty((num_classes, in_features), **factory))
        self.bias = nn.Parameter(torch.empty(num_classes, **factory)) if bias else None
        self.sampler = self._make_sampler(sampler, num_codewords, quantizer, class_counts, kmeans_iters)
        kl_refine_steps = check_positive_int("kl_refine_steps", kl_refine_steps, minimum=0)
        self.kl_refine_queries = check_positive_int("kl_refine_queries", kl_refine_queries)
        if kl_refine_steps > 0:
            if not isinstance(self.sampler, MIDXSampler):
                raise ValueError(f"kl_refine_steps={kl_refine_steps} refines MIDX codebooks, but the sampler is "
                                 f"{type(self.sampler).__name__}: use sampler='midx' or kl_refine_steps=0")
            self.sampler.kl_refine_steps = kl_refine_steps
        self._reservoir: Optional[Tensor] = None  # [kl_refine_queries, d] float32 ring of recent query rows
        self._reservoir_fill = 0
        self._reservoir_pos = 0
        self.reset_parameters()

    def _make_sampler(self, sampler, num_codewords, quantizer, class_counts, kmeans_iters) -> Sampler:
        return make_sampler(sampler, in_features=self.in_features, num_classes=self.num_classes,
                            num_codewords=num_codewords, quantizer=quantizer, class_counts=class_counts,
                            kmeans_iters=kmeans_iters)

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        self._index_stale = True
        self._training_calls = 0

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, copy: bool = False, **kwargs) -> "IMISoftmax":
        """An IMISoftmax over ``linear``'s weight and bias.

        By default the head adopts linear's Parameters (the same objects: a weight tied to an
        embedding stays tied, and an optimizer holding them keeps working); ``copy=True`` gives
        the head its own copies instead."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        factory = {"device": linear.weight.device, "dtype": linear.weight.dtype}
        if copy:
            head = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, **factory, **kwargs)
            with torch.no_grad():
                head.weight.copy_(linear.weight)
                if linear.bias is not None:
                    head.bias.copy_(linear.bias)
            return head
        # built on meta (no allocation), then the meta Parameters are replaced by linear's own
        factory["device"] = "meta"
        head = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, **factory, **kwargs)
        head.weight = linear.weight
        if linear.bias is not None:
            head.bias = linear.bias
        return head

    # -- settings -----------------------------------------------------------------------------
    def __setstate__(self, state: Dict[str, Any]) -> None:
        # a head pickled whole (torch.save(model)) before these settings became checked properties
        for name in ("refresh_every", "ignore_index"):
            if name in state:
                state["_" + name] = state.pop(name)
        super().__setstate__(state)

    @property
    def refresh_every(self) -> int:
        """Training forward calls between index rebuilds (0 = only manual :meth:`refresh_index`)."""
        return self._refresh_every

    @refresh_every.setter
    def refresh_every(self, value: int) -> None:
        self._refresh_every = check_positive_int("refresh_every", value, minimum=0)

    @property
    def ignore_index(self) -> int:
        """Target value that is skipped (as in F.cross_entropy)."""
        return self._ignore_index

    @ignore_index.setter
    def ignore_index(self, value: int) -> None:
        self._ignore_index = check_ignore_index(value)

    @property
    def full_refresh_every(self) -> int:
        """One refresh in this many is a full rebuild; the others are incremental (0 or 1: all full)."""
        return self._full_refresh_every

    @full_refresh_every.setter
    def full_refresh_every(self, value: int) -> None:
        self._full_refresh_every = check_positive_int("full_refresh_every", value, minimum=0)

    @property
    def eval_chunk_size(self) -> Optional[int]:
        """Classes per chunk of the eval loss and topk (None: about 32 MiB of float32 logits)."""
        return self._eval_chunk_size

    @eval_chunk_size.setter
    def eval_chunk_size(self, value: Optional[int]) -> None:
        self._eval_chunk_size = None if value is None else check_positive_int("eval_chunk_size", value)

    # -- index ------------------------------------------------------------------------------
    def _tracks_touched(self) -> bool:
        return isinstance(self.sampler, MIDXSampler) and self.full_refresh_every > 1

    @torch.no_grad()
    def refresh_index(self, full: bool = False) -> None:
        """Rebuild the proposal from the current weight and bias.

        Incremental (``sampler="midx"``, the default between full rebuilds): the classes that were a
        target or a sample of a training forward since the last build (the only rows a row-sparse
        optimizer changed) are re-assigned against the current codebooks, kept frozen, and only the
        cells they leave or join are rebuilt, with their new bias snapshot. Full (``full=True``, one
        refresh in ``full_refresh_every``, the first build, after a device change or a load without
        the index, and in a multi-process run outside a DDP forward): warm-started k-means and
        assignment of every class. Either way log Q is exact for the index built, and a thread
        sampling meanwhile uses either the old or the new index, never a mix: the sampler swaps a
        new index in with one assignment, or (incremental, CPU, nobody else holding the index)
        rewrites it in place under its lock, which samplers hold while they read it. A full
        rebuild lets go of the old index's arrays before it allocates the new ones (one index in
        memory at a time; samplers wait for the new one). Rows changed by something other than their gradient
        (dense optimizers' momentum or weight decay) keep their old codes until the next full
        rebuild: still an exact proposal, only a less adapted one. Never autocast."""
        self._refresh(full, sync=False)

    @torch.no_grad()
    def mark_changed(self, ids: Tensor) -> None:
        """Record classes (int64 ids, any shape) whose weight or bias changed other than through a
        training forward of this head (e.g. edited rows), so the next incremental
        :meth:`refresh_index` re-assigns them. Targets and samples are recorded automatically."""
        check_tensor("ids", ids)
        check_class_ids("ids", ids, self.num_classes)
        touched = self._touched
        if touched is not None:
            touched.index_fill_(0, ids.reshape(-1).to(touched.device), True)

    @torch.no_grad()
    def _refresh(self, full: bool, sync: bool) -> None:
        check_tensor("weight", self.weight)  # a meta head: names the fix
        # the new mask first: marks made while this refresh runs belong to the next one
        touched = self._touched
        self._touched = (torch.zeros(self.num_classes, dtype=torch.bool, device=self.weight.device)
                         if self._tracks_touched() else None)
        if not full and touched is not None and self._can_update(touched, sync):
            if sync:
                touched = _union_over_ranks(touched)
            with no_autocast(self.weight.device), serial_glue():  # the update's own glue, and the mask's nonzero
                self.sampler.update(self.weight, self.bias, touched.nonzero().flatten())
            self._refreshes_since_full += 1
            return
        self.sampler = self.sampler.to(self.weight.device)
        with no_autocast(self.weight.device):
            self.sampler.build(self.weight, self.bias)
            if self._refines() and self._reservoir_fill > 0:
                queries = self._reservoir[: self._reservoir_fill].to(self.weight.device)
                self.sampler.refine_codebooks(queries, self.weight, self.bias)
        self._index_stale = False
        self._refreshes_since_full = 0

    def _refines(self) -> bool:
        return isinstance(self.sampler, MIDXSampler) and self.sampler.kl_refine_steps > 0

    @torch.no_grad()
    def _record_queries(self, flat_x: Tensor) -> None:
        """Keeps the last ``kl_refine_queries`` query rows (a ring) for the codebook refinement."""
        size = self.kl_refine_queries
        buf = self._reservoir
        if buf is None or buf.device != flat_x.device or buf.shape != (size, self.in_features):
            buf = self._reservoir = flat_x.new_zeros((size, self.in_features), dtype=torch.float32)
            self._reservoir_fill = self._reservoir_pos = 0
        rows = flat_x.detach()[-size:]
        r = rows.shape[0]
        pos = (self._reservoir_pos + torch.arange(r, device=buf.device)) % size
        buf[pos] = rows.to(torch.float32)
        self._reservoir_pos = (self._reservoir_pos + r) % size
        self._reservoir_fill = min(size, self._reservoir_fill + r)

    def _can_update(self, touched: Tensor, sync: bool) -> bool:
        """An incremental refresh is possible and due: the sampler holds an index of this head's
        classes on this device, built from the same bias presence, and no full rebuild is due.
        In a multi-process run the ranks' touched sets differ: they are merged inside a DDP forward
        (every rank refreshes there at the same step), and a refresh elsewhere is full."""
        index = getattr(self.sampler, "index", None)
        if (not self._tracks_touched() or self._index_stale or index is None
                or self._refreshes_since_full + 1 >= self.full_refresh_every):
            return False
        if (index.codebook1.device != self.weight.device or touched.device != self.weight.device
                or index.num_classes != self.num_classes or index.in_features != self.in_features
                or (index.beta is None) != (self.bias is None) or touched.numel() != self.num_classes):
            return False
        return sync or not _multi_process()

    def _maybe_refresh(self) -> None:
        if torch.compiler.is_compiling():
            if self._index_stale:
                raise RuntimeError("IMISoftmax under torch.compile: call refresh_index() before compiling")
            return
        due = self.refresh_every > 0 and self._training_calls > 0 and self._training_calls % self.refresh_every == 0
        sampler_device = getattr(self.sampler, "device", None)
        moved = sampler_device is not None and sampler_device != self.weight.device
        if self._index_stale or due or moved:
            self._refresh(full=moved, sync=_in_ddp_forward())
        self._training_calls += 1

    # -- checkpoints -------------------------------------------------------------------------
    def get_extra_state(self) -> Dict[str, Any]:
        """The index, the k-means generator and the training-call counter: what a run needs to
        continue bit for bit after a reload (tensors and plain values: weights_only-loadable)."""
        return {_EXTRA_STATE_MARK: 1, "training_calls": self._training_calls,
                "index_stale": self._index_stale, "sampler": self.sampler.state_dict(),
                "touched": self._touched, "refreshes_since_full": self._refreshes_since_full,
                "reservoir": self._reservoir, "reservoir_fill": self._reservoir_fill,
                "reservoir_pos": self._reservoir_pos}

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        if not isinstance(state, dict) or _EXTRA_STATE_MARK not in state:
            raise ValueError("the state_dict's _extra_state was not written by IMISoftmax.get_extra_state")
        restored = self.sampler.load_state_dict(state["sampler"], device=self.weight.device)
        index = getattr(self.sampler, "index", None)
        if restored and index is not None and (index.num_classes, index.in_features) != (self.num_classes,
                                                                                         self.in_features):
            self.sampler.load_state_dict({**state["sampler"], "index": None}, device=self.weight.device)
            raise ValueError(f"_extra_state's index was built for [{index.num_classes}, {index.in_features}] "
                             f"(num_classes, in_features), this head is [{self.num_classes}, {self.in_features}]: "
                             f"was it saved by a head of another shape? Load a checkpoint of this shape, or "
                             f"drop the '_extra_state' key (the index is then rebuilt from the weight)")
        self._training_calls = int(state["training_calls"])
        self._index_stale = bool(state["index_stale"]) or not restored
        # checkpoints from before incremental refreshes have no touched set: the next refresh is full
        touched = state.get("touched")
        if touched is not None and (touched.dtype != torch.bool or tuple(touched.shape) != (self.num_classes,)):
            raise ValueError(f"_extra_state's touched set must be bool [{self.num_classes}], got "
                             f"{touched.dtype} {tuple(touched.shape)}: was it saved by a head with another num_classes?")
        self._touched = None if touched is None else touched.to(self.weight.device, copy=True)
        self._refreshes_since_full = int(state.get("refreshes_since_full", 0))
        reservoir = state.get("reservoir")
        if reservoir is not None and tuple(reservoir.shape) != (self.kl_refine_queries, self.in_features):
            raise ValueError(f"_extra_state's query reservoir must be [{self.kl_refine_queries}, {self.in_features}], "
                             f"got {tuple(reservoir.shape)}: construct the head with the same kl_refine_queries")
        self._reservoir = None if reservoir is None else reservoir.to(self.weight.device, copy=True)
        self._reservoir_fill = int(state.get("reservoir_fill", 0)) if reservoir is not None else 0
        self._reservoir_pos = int(state.get("reservoir_pos", 0)) if reservoir is not None else 0

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Without an _extra_state (e.g. an nn.Linear checkpoint) the index is derived from the
        # loaded weights: rebuilt on next use. With one, set_extra_state restores it.
        self._index_stale = True
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        key = prefix + _EXTRA_STATE_KEY
        if key in missing_keys:
            missing_keys.remove(key)

    @staticmethod
    def linear_state_dict(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
        """``state_dict`` without the IMISoftmax heads' ``_extra_state`` entries, so it loads with
        ``strict=True`` into a model whose head is a plain nn.Linear (works on whole-model dicts)."""
        return {k: v for k, v in state_dict.items()
                if not (k.split(".")[-1] == _EXTRA_STATE_KEY and isinstance(v, dict) and _EXTRA_STATE_MARK in v)}

    # -- forward ----------------------------------------------------------------------------
    def _check_input(self, x: Tensor, target: Optional[Tensor]) -> None:
        check_head_input(self, x, target)

    def forward(self, x: Tensor, target: Optional[Union[Tensor, MultiLabelTarget]] = None) -> Tensor:
        if target is not None and is_multilabel_target(x, target):
            return self._multilabel_forward(x, target)
        self._check_input(x, target)
        if target is None:
            return F.linear(x, self.weight, self.bias)
        if not self.training:
            return chunked_cross_entropy(x.reshape(-1, self.in_features), self.weight, self.bias,
                                         target.reshape(-1), ignore_index=self.ignore_index,
                                         chunk_size=self.eval_chunk_size)
        return self._sampled_loss(x, target)

    def _check_ddp(self) -> None:
        """DDP's reducer copies every gradient it manages into a dense bucket; only nn.Embedding's
        sparse gradients are exempt, so a sparse head gradient would fail inside backward."""
        if not self.sparse_grad:
            return
        managed = head_params_managed_by_active_ddp(self, trainable_only=True)
        if managed:
            raise RuntimeError(
                "IMISoftmax(sparse_grad=True) inside DistributedDataParallel: DDP cannot all-reduce "
                "sparse gradients of a head like this one (it fails with 'Cannot access storage of "
                f"SparseTensorImpl'). Construct the head with sparse_grad=False under DDP "
                f"(or set head.sparse_grad = False): dense gradients, all-reduced by DDP as for nn.Linear. "
                f"To keep sparse gradients, leave the head outside the DDP wrapper and call "
                f"head.broadcast_parameters() once and head.all_reduce_grads() after each backward. "
                f"Parameters: {managed}"
            )

    # -- data parallel without DDP (keeps sparse gradients) -----------------------------------
    @torch.no_grad()
    def broadcast_parameters(self, src: int = 0, group=None) -> None:
        """Copies rank ``src``'s weight and bias to every rank of ``group`` (what DDP does at wrap
        time), and marks the index stale so every rank rebuilds the same one."""
        import torch.distributed as dist

        for p in (self.weight, self.bias):
            if p is not None:
                dist.broadcast(p.data, src=src, group=group)
        self._index_stale = True

    @torch.no_grad()
    def all_reduce_grads(self, group=None) -> None:
        """Averages weight.grad and bias.grad over the ranks of ``group``, as DDP would: dense grads
        with one all_reduce, sparse COO grads by gathering every rank's rows (any backend, NCCL
        included) and summing duplicates. Call it on every rank after backward, before the
        optimizer step; a rank without a gradient contributes zeros."""
        import torch.distributed as dist

        world = dist.get_world_size(group)
        for p in (self.weight, self.bias):
            if p is None:
                continue
            if self.sparse_grad:
                p.grad = _all_reduce_sparse(p.grad, p, world, group)
            else:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, group=group)
                p.grad.div_(world)

    def _draw(self, x: Tensor, target: Tensor, generator=None) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        with serial_glue():
            check_finite("x", x)  # named here: the sampler would call it "query"
        flat_x = x.reshape(-1, self.in_features)
        if self._refines() and not torch.compiler.is_compiling():
            self._record_queries(flat_x)
        self._maybe_refresh()  # a refresh keeps torch's threads (its products are O(changed rows * d))
        flat_t = target.reshape(-1)
        with serial_glue():
            # ignored rows score class 0 (any valid id): the loss masks them, and the sampler's checks pass
            safe_t = torch.where(flat_t == self.ignore_index, torch.zeros_like(flat_t), flat_t)
            # a batch-aware sampler (in-batch negatives) must not take the placeholders as the batch's targets
            batch = {"valid": flat_t != self.ignore_index} if getattr(self.sampler, "batch_aware", False) else {}
        ids, log_q, target_log_q = self._sample_and_mark(flat_x, safe_t.unsqueeze(1), generator=generator, **batch)
        return flat_x, flat_t, ids, log_q, target_log_q.squeeze(1)

    def _sample_and_mark(self, flat_x: Tensor, safe_targets: Tensor, **kwargs) -> Tuple[Tensor, Tensor, Tensor]:
        """The sampler's draws for flat_x [B, d] with the log Q of safe_targets [B, L] (valid ids),
        then the rows this step's gradient reaches marked for the next incremental refresh. The
        sampler's call runs under serial_glue() when its work is in our kernels
        (Sampler.kernel_bound); a sampler made of torch ops (ExactSampler scores all N classes)
        keeps torch's threads."""
        glue = serial_glue() if getattr(self.sampler, "kernel_bound", False) else contextlib.nullcontext()
        with glue:
            ids, log_q, target_log_q = self.sampler.sample_with_targets(flat_x.detach(), self.num_samples,
                                                                        safe_targets, **kwargs)
        touched = self._touched
        if touched is not None:  # O(B * M)
            with serial_glue():
                # one index built from the draws' output: ordered after the op that checks the targets
                touched.index_fill_(0, torch.cat([ids.reshape(-1), safe_targets.reshape(-1)]), True)
        return ids, log_q, target_log_q

    def _sampled_loss(self, x: Tensor, target: Tensor) -> Tensor:
        self._check_ddp()
        # Under autocast the loss runs in the weight's dtype (fp32), as autocast runs softmax/CE.
        x = x.to(self.weight.dtype)
        with no_autocast(x.device):
            flat_x, flat_t, ids, log_q, target_log_q = self._draw(x, target)
            # x and target were checked by forward and _draw, the samples come from the sampler
            with serial_glue():
                return _sampled_softmax_loss(flat_x, self.weight, self.bias, flat_t, ids, log_q, target_log_q,
                                             remove_accidental_hits=self.remove_accidental_hits,
                                             ignore_index=self.ignore_index, reduction="mean",
                                             sparse_grad=self.sparse_grad)

    def _multilabel_forward(self, x: Tensor, target: MultiLabelTarget) -> Tensor:
        """Multi-label loss (imi_softmax/multilabel.py): sampled in training, exact over class chunks
        in eval; "mean" over each row's positives, then over rows with at least one."""
        self._check_input(x, None)
        positives = padded_positives(target, x.shape[:-1], self.num_classes, self.ignore_index)
        if positives.device != x.device:
            raise ValueError(f"target is on {positives.device} but x is on {x.device}")
        flat_x = x.reshape(-1, self.in_features)
        if not self.training:
            return chunked_multilabel_loss(flat_x, self.weight, self.bias, positives, chunk_size=self.eval_chunk_size)
        self._check_ddp()
        flat_x = flat_x.to(self.weight.dtype)  # under autocast the loss runs in the weight's dtype
        with no_autocast(x.device):
            with serial_glue():
                check_finite("x", flat_x)
            self._maybe_refresh()
            with serial_glue():
                # pads score class 0 (any valid id): the loss ignores them, and the sampler's checks pass
                safe = positives.clamp_min(0)
            ids, log_q, target_log_q = self._sample_and_mark(flat_x, safe)
            with serial_glue():
                return multilabel_loss(flat_x, self.weight, self.bias, positives, ids, log_q, target_log_q,
                                       remove_accidental_hits=self.remove_accidental_hits, reduction="mean",
                                       sparse_grad=self.sparse_grad)

    def sampled_logits(self, x: Tensor, target: Tensor, generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
        """Bias-corrected logits [B, 1+M] (column 0 = target; accidental hits -inf when removed)
        and the sample ids [B, M], for x [*, d] flattened to B rows. Differentiable (materializes
        the gathered rows; the training loss uses the fused kernel instead)."""
        self._check_input(x, target)
        check_generator(generator)
        x = x.to(self.weight.dtype)  # differs only under autocast: logits in the weight's dtype
        with no_autocast(x.device):
            flat_x, flat_t, ids, log_q, target_log_q = self._draw(x, target, generator)
            all_ids = torch.cat([flat_t.clamp_min(0).unsqueeze(1), ids], dim=1)
            w = self.weight[all_ids]
            logits = torch.einsum("bd,bmd->bm", flat_x, w)
            if self.bias is not None:
                logits = logits + self.bias[all_ids]
            logits = logits - torch.cat([target_log_q.unsqueeze(1), log_q], dim=1).to(logits.dtype)
            if self.remove_accidental_hits:
                hits = ids == flat_t.unsqueeze(1)
                logits = torch.cat([logits[:, :1], logits[:, 1:].masked_fill(hits, float("-inf"))], dim=1)
        return logits, ids

    @torch.no_grad()
    def topk(self, x: Tensor, k: int, chunk_size: Optional[int] = None, *, approximate: bool = False,
             budget: int = 4096) -> Tuple[Tensor, Tensor]:
        """(values, indices) [*, k] of the k largest logits of x [*, in_features].

        Exact (default): over class chunks, so the full [*, num_classes] logit matrix never exists
        at once (memory O(B * (chunk_size + k))). chunk_size: classes per chunk; None takes
        ``eval_chunk_size`` (automatic when that is None).

        ``approximate=True`` (``sampler="midx"``, index built): retrieval from the index
        (:meth:`MIDXSampler.search`): the cells of the last refresh are visited in decreasing
        codeword-score order until they hold ``budget`` classes, which are reranked exactly with the
        current weight and bias. ``budget >= num_classes`` gives the exact top-k. Values are in the
        weight's dtype (no autocast)."""
        self._check_input(x, None)
        k = check_positive_int("k", k)
        if chunk_size is not None:
            chunk_size = check_positive_int("chunk_size", chunk_size)
        if k > self.num_classes:
            raise ValueError(f"k must be <= num_classes ({self.num_classes}), got {k}")
        flat = x.reshape(-1, self.in_features)
        if approximate:
            values, indices = self._approximate_topk(flat, k, budget)
        else:
            chunk = chunk_size if chunk_size is not None else self.eval_chunk_size
            if chunk is None:
                chunk = auto_chunk_size(flat.shape[0], self.num_classes)
            values, indices = chunked_topk(flat, self.weight, self.bias, k, chunk)
        return values.reshape(*x.shape[:-1], k), indices.reshape(*x.shape[:-1], k)

    def _approximate_topk(self, flat: Tensor, k: int, budget: int) -> Tuple[Tensor, Tensor]:
        if not isinstance(self.sampler, MIDXSampler):
            raise ValueError(f"topk(approximate=True) searches the MIDX index: it needs sampler='midx', this head "
                             f"has {type(self.sampler).__name__}; use the exact topk (approximate=False)")
        index = self.sampler.index
        if index is None or self._index_stale:
            raise RuntimeError("topk(approximate=True): the head's index is not built; call head.refresh_index() "
                               "(or train a step) first")
        if index.codebook1.device != self.weight.device or index.num_classes != self.num_classes:
            raise RuntimeError("topk(approximate=True): the index was built for another device or class count; "
                               "call head.refresh_index()")
        ids, scores = self.sampler.search(flat, k, budget, weight=self.weight, bias=self.bias)
        return scores.to(self.weight.dtype), ids

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, "
                f"bias={self.bias is not None}, num_samples={self.num_samples}, sampler={self.sampler}, "
                f"refresh_every={self.refresh_every}, full_refresh_every={self.full_refresh_every}, "
                f"eval_chunk_size={self.eval_chunk_size}, remove_accidental_hits={self.remove_accidental_hits}, "
                f"sparse_grad={self.sparse_grad}")


def _multi_process() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _in_ddp_forward() -> bool:
    """Inside a DistributedDataParallel forward every rank reaches the same training call, so a
    collective there cannot leave one rank waiting."""
    if not _multi_process():
        return False
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel._get_active_ddp_module() is not None


def _union_over_ranks(touched: Tensor) -> Tensor:
    """The classes touched on any rank (one all_reduce of N bytes per refresh)."""
    import torch.distributed as dist

    flags = touched.to(torch.uint8)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags.bool()


def _all_reduce_sparse(grad: Optional[Tensor], param: Tensor, world: int, group) -> Tensor:
    """Mean over ranks of sparse COO row gradients: all_gather of the (padded) touched rows, then
    one coalesce. Every rank calls it, with or without a gradient."""
    import torch.distributed as dist

    if grad is None:
        grad = torch.sparse_coo_tensor(torch.empty((1, 0), dtype=torch.int64, device=param.device),
                                       param.new_empty((0,) + tuple(param.shape[1:])), param.shape)
    grad = grad.coalesce()
    rows, values = grad.indices()[0], grad.values()
    count = torch.tensor([rows.numel()], dtype=torch.int64, device=param.device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    counts = [int(c) for c in counts]
    longest = max(counts)
    pad = longest - rows.numel()
    rows = torch.cat([rows, rows.new_zeros(pad)])
    values = torch.cat([values, values.new_zeros((pad,) + tuple(values.shape[1:]))])
    all_rows = [torch.empty_like(rows) for _ in range(world)]
    all_values = [torch.empty_like(values) for _ in range(world)]
    dist.all_gather(all_rows, rows, group=group)
    dist.all_gather(all_values, values, group=group)
    rows = torch.cat([r[:c] for r, c in zip(all_rows, counts)])
    values = torch.cat([v[:c] for v, c in zip(all_values, counts)]) / world
    return torch.sparse_coo_tensor(rows.unsqueeze(0), values, param.shape).coalesce()
