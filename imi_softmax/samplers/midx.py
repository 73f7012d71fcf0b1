"""The MIDX proposal: an Inverted Multi-Index over two quantizations of the class vectors."""
import functools
import math
import sys
import threading
from typing import Any, Dict, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .._ops import ops
from .._serial_glue import serial_glue
from .._fallback._checks import MAX_CODEWORDS
from .._validation import (FLOAT_DTYPES, _compiling, check_class_ids, check_finite, check_flag, check_fp32_range, check_generator,
                           check_positive_int, check_tensor)
from ..kmeans import assign_chunked, assign_residual, kmeans
from .base import Sampler, no_autocast

QUANTIZERS = ("rq", "pq")
# 2: code1, code2, class_ids, alias_pos are int32 (version 1 kept int64; load_state_dict converts)
_STATE_VERSION = 2
# The index's per-class arrays are int32 (half the bytes of int64; the draws read class_ids at
# random positions): an index holds fewer than 2^31 classes.
MAX_INDEX_CLASSES = 2 ** 31 - 1
_INDEX_INT32_FIELDS = ("code1", "code2", "class_ids", "alias_pos")
_OVERFLOW_FIX = ("weights this large usually mean training diverged: lower the learning rate, clip the "
                 "gradients or rescale the weight (and query) before building the index")


def _row_sq_norms(w: Tensor, chunk: int = 1 << 16) -> Tensor:
    """The largest squared row norm of each chunk of rows of w [N, d]: float32 [ceil(N / chunk)],
    finite exactly when every row's is (all a range check needs), without an [N] tensor (80 MB at
    N = 20M, on top of the old index at the start of a rebuild) or a second [N, d] one (w.pow(2))."""
    out = torch.empty((w.shape[0] + chunk - 1) // chunk, dtype=torch.float32, device=w.device)
    for i, start in enumerate(range(0, w.shape[0], chunk)):  # widened per chunk: bf16/fp16 squared in fp32
        out[i] = w[start:start + chunk].to(torch.float32).pow(2).sum(1).max()
    return out


def _check_lr(value, name: str = "kl_refine_lr") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} ({value!r})")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def _reads_index(method):
    """Runs a reader of the index under the sampler's lock, from its one read of the index to the
    end of its ops: an in-place update (which takes the lock) never runs in between, and a reader
    holds no reference to the index while an update checks who references it. Under torch.compile
    the lock is not taken (a graph cannot hold one)."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        if _compiling():
            return method(self, *args, **kwargs)
        with self._lock:
            return method(self, *args, **kwargs)
    return locked


class MIDXIndex(NamedTuple):
    """Every tensor of one built index. A reader that took one reference sees one whole index: a
    rebuild makes a new MIDXIndex and swaps it in with one assignment, and an incremental update
    rewrites the arrays in place (CPU) only while nobody but the sampler references this MIDXIndex
    or its tensors (otherwise it makes a new one too), under the sampler's lock, which every
    reader holds around the ops that read the arrays (:meth:`MIDXSampler.update`)."""

    codebook1: Tensor        # [K, d] (rq) or [K, d/2] (pq) float32
    codebook2: Tensor
    code1: Tensor            # [N] int32, first codeword of each class
    code2: Tensor            # [N] int32
    beta: Optional[Tensor]   # [N] float32 bias snapshot, None without bias
    offsets: Tensor          # [K*K + 1] int64, CSR over cells
    class_ids: Tensor        # [N] int32, classes sorted by cell
    alias_prob: Optional[Tensor]  # [N] float32 within-cell alias tables (bias only)
    alias_pos: Optional[Tensor]   # [N] int32
    beta_csr: Optional[Tensor]    # [N] float32 beta in cell order (bias only)
    log_n: Tensor            # [K, K] float32 log cell mass
    cell_mass: Tensor        # [K, K] float32
    log_n_max: Tensor        # [1] float32
    num_classes: int
    in_features: int


_TENSOR_FIELDS = tuple(f for f in MIDXIndex._fields if f not in ("num_classes", "in_features"))
# The arrays update_cells_ rewrites in place (the codebooks are kept as they are).
_INPLACE_FIELDS = tuple(f for f in _TENSOR_FIELDS if f not in ("codebook1", "codebook2"))
_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _holders(holder: Any) -> Tuple[int, Tuple[Tuple[int, int], ...]]:
    """References to ``holder._index`` and, per in-place field, to its tensor object and to that
    tensor's storage (views and other tensors sharing it count there). Compared with the counts of a
    probe index that only its holder references (:func:`_sole_holder_counts`, same code path)."""
    index = holder._index
    fields = []
    for name in _INPLACE_FIELDS:
        t = getattr(index, name)
        if t is None:
            fields.append((0, 0))
            continue
        storage = -1 if _storage_use_count is None else _storage_use_count(t.untyped_storage()._cdata)
        fields.append((sys.getrefcount(t), storage))
        del t
    return sys.getrefcount(index), tuple(fields)


_SOLE_COUNTS: Optional[Tuple[int, Tuple[int, int]]] = None


def _sole_holder_counts() -> Tuple[int, Tuple[int, int]]:
    """(references to the index, (to a field tensor, to its storage)) when one holder is the only
    referrer of an index and of each of its tensors: measured once on a probe."""
    global _SOLE_COUNTS
    if _SOLE_COUNTS is None:
        class _Probe:
            pass

        probe = _Probe()
        probe._index = MIDXIndex(*(torch.zeros(1) for _ in _TENSOR_FIELDS), num_classes=1, in_features=1)
        count, fields = _holders(probe)
        _SOLE_COUNTS = (count, fields[0])
    return _SOLE_COUNTS


# Rows checked at a time when an incremental update found a bad one (8 MiB of float32 rows at d = 64).
_CHECK_CHUNK_ROWS = 32768


_ROW_NORMS = "weight's squared row norms (k-means distances)"


def _check_weight_rows(w: Tensor) -> None:
    """The build's checks of weight rows w: no NaN/Inf, and squared norms that fit in float32
    (k-means distances and the proposal scores square the rows: past ~1e19 they are inf)."""
    check_finite("weight", w)
    check_fp32_range(_ROW_NORMS, _row_sq_norms(w), _OVERFLOW_FIX, cause=w)


def _raise_for_rows(weight: Tensor, rows: Tensor) -> None:
    """The error for the rows of weight that op assign_rows found NaN/Inf or with a float32 squared
    norm that overflows, named as a full build names it."""
    for start in range(0, rows.numel(), _CHECK_CHUNK_ROWS):
        _check_weight_rows(weight.detach()[rows[start:start + _CHECK_CHUNK_ROWS]].to(torch.float32))
    # torch's sum of some row stayed finite where the kernel's (another order) did not: the edge itself
    raise ValueError(f"{_ROW_NORMS} overflow float32 (|value| > 3.4e38); {_OVERFLOW_FIX}")


class MIDXSampler(Sampler):
    """Adaptive proposal Q(i|h) proportional to exp(s1[a1(i)] + s2[a2(i)] + beta_i).

    ``quantizer="rq"``: residual quantization, C1 = kmeans(W), C2 = kmeans(W - C1[a1]); both score
    the full query. ``"pq"``: product quantization of the two halves of the dimensions (d even).
    ``beta`` is the bias snapshot taken at build time (0 without bias). Sampling and log_prob are
    exact for that Q (DESIGN.md, "Proposal").

    ``build``/``update`` may run in one thread while others call ``sample``/``log_prob``/``search``:
    each call reads the current :class:`MIDXIndex` once and uses only it, either the old or the new
    index, never a mix. The sampler's lock makes that hold for the in-place update and the full
    rebuild, which drops the old arrays first (see :meth:`update`, :meth:`build`): readers hold it
    from their read of the index to the end of their ops (~50 ns uncontended; readers of one
    sampler run one at a time, and wait while an in-place update or a rebuild's cell pass runs).

    Args:
        num_codewords: K codewords per codebook, K*K cells.
        quantizer: "rq" or "pq".
        kmeans_iters: Lloyd iterations per rebuild (warm-started from the previous codebooks).
        max_points_per_centroid: k-means is fitted on at most this many classes per codeword.
        seed: seed of the k-means subsampling/initialisation generator.
        kl_refine_steps: default Adam steps of :meth:`refine_codebooks` (0: the owner does not
            refine; IMISoftmax refines after each full rebuild when this is > 0 and it keeps a
            ``query_reservoir``).
        kl_refine_lr: default Adam learning rate of :meth:`refine_codebooks`, relative to the
            root-mean-square entry of the k-means codebooks.
    """

    kernel_bound = True  # the draws, log Q and index updates are ops; around them only the scores' product

    def __init__(self, num_codewords: int = 64, quantizer: str = "rq", kmeans_iters: int = 10,
                 max_points_per_centroid: int = 256, seed: int = 0, kl_refine_steps: int = 0,
                 kl_refine_lr: float = 0.01):
        self.num_codewords = check_positive_int("num_codewords", num_codewords)
        if num_codewords > MAX_CODEWORDS:  # the ops' limit (csrc kMaxCodewords): K * K cells
            raise ValueError(f"num_codewords must be <= {MAX_CODEWORDS} (K codewords per codebook give K * K "
                             f"cells), got {num_codewords}; 64 to 1024 suit up to ~10^8 classes")
        if quantizer not in QUANTIZERS:
            raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {quantizer!r}")
        self.quantizer = quantizer
        self.kmeans_iters = check_positive_int("kmeans_iters", kmeans_iters, minimum=0)
        self.max_points_per_centroid = check_positive_int("max_points_per_centroid", max_points_per_centroid)
        self._generator = torch.Generator().manual_seed(seed)
        self._index: Optional[MIDXIndex] = None
        self.kl_refine_steps = check_positive_int("kl_refine_steps", kl_refine_steps, minimum=0)
        self.kl_refine_lr = _check_lr(kl_refine_lr)
        self.last_refine: Optional[Dict[str, float]] = None  # stats of the latest refine_codebooks
        # (weight, bias) of the last build/update, by reference (no copy; detached at use):
        # search()'s default rerank. The objects themselves, not detached views: a head's
        # Parameters follow module.to() (their .data is swapped), so no old storage is kept alive.
        self._vectors: Optional[Tuple[Tensor, Optional[Tensor]]] = None
        # build(copy_vectors=True): (index, weight and bias rows in cell order, identity positions)
        # taken from the vectors of that index's build/update; search() uses it only with that index.
        self._copy_vectors = False
        self._cell_copy: Optional[Tuple[MIDXIndex, Tensor, Optional[Tensor], Tensor]] = None
        # Held by readers around the ops that read the index's arrays and by the writers that change
        # or drop arrays of an index readers may already have taken (reentrant: wrappers such as
        # TopCellsSampler hold it around calls into this sampler).
        self._lock = threading.RLock()
        self.last_update_in_place: Optional[bool] = None  # how the latest update() ran (inspection)

    # -- copies: a lock neither pickles nor deep-copies; each copy gets its own ---------------
    def __getstate__(self) -> Dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    # -- index ------------------------------------------------------------------------------
    @property
    def index(self) -> Optional[MIDXIndex]:
        """The current index (None before the first build)."""
        return self._index

    def build(self, weight: Tensor, bias: Optional[Tensor] = None, *, copy_vectors: bool = False) -> "MIDXSampler":
        """(Re)build codebooks and cells from weight [N, d] (and bias [N]); warm-starts k-means.

        ``copy_vectors=True`` (for retrieval over a frozen catalogue) also keeps a copy of weight and
        bias in cell order, each cell's rows contiguous like FAISS's inverted lists: :meth:`search`
        without ``weight=`` then reranks that copy (the rows of a cell are read in one stream instead
        of gathered). Costs N * (d + 1) elements of weight's dtype plus N int32/int64 positions; taken
        here and by every :meth:`update`, so it holds the vectors of the index being searched: in-place
        changes of weight after this call are not seen (call build/update again, or pass weight=).

        Memory: a rebuild of an existing index lets go of the old index's arrays (codebooks kept for
        the warm start) once weight and bias are checked, before k-means, the assignment and the
        new cells allocate, so two indices' per-class arrays are never held at once (unless
        someone else still references the old index). Readers arriving meanwhile wait for the new
        index (the whole rebuild). Should the rebuild fail after that (out of memory, k-means
        codewords out of range), the sampler is left without an index: the next call raises "no
        index yet" and an IMISoftmax head rebuilds fully at its next refresh. Bad input (shapes,
        NaN/Inf, overflowing rows) is refused before, with the old index kept."""
        copy_vectors = check_flag("copy_vectors", copy_vectors)
        check_tensor("weight", weight, dims=(2,), dtypes=FLOAT_DTYPES)
        n, d = weight.shape
        if n < 1:
            raise ValueError("weight must hold at least one class (got 0 rows)")
        if self.quantizer == "pq" and d % 2 != 0:
            raise ValueError(f"quantizer='pq' splits the dimensions in two halves: in_features must be even, got {d}")
        if n > MAX_INDEX_CLASSES:
            raise ValueError(f"weight has {n} rows but one MIDX index holds at most 2^31 - 1 = {MAX_INDEX_CLASSES} "
                             "classes (its class ids are int32): shard the head over processes "
                             "(IMISoftmax(..., process_group=pg)) so that each rank's index holds fewer")
        if bias is not None:
            check_tensor("bias", bias, dims=(1,), dtypes=FLOAT_DTYPES)
            if bias.shape[0] != n:
                raise ValueError(f"bias must be [{n}] to match weight, got {tuple(bias.shape)}")
        with no_autocast(weight.device):
            try:
                index = self._build_index(weight, bias)
                self._copy_vectors = copy_vectors
                self._cell_copy = self._take_cell_copy(index, weight, bias)
                self._index = index
            finally:
                if self._rebuilding:  # taken by _build_index once the inputs are checked
                    self._rebuilding = False
                    self._lock.release()
        self._vectors = (weight, bias)
        return self

    _rebuilding = False  # True while build() holds the lock from the drop of the old index to the swap

    def _drop_old_index(self) -> None:
        """Lets go of the current index (the caller keeps its codebooks) under the lock, which is
        kept until build() swaps the new one in: readers that come meanwhile wait for it."""
        if self._index is None:
            return
        self._lock.acquire()
        self._rebuilding = True
        self._cell_copy = None  # it references the old index too
        self._index = None

    def _take_cell_copy(self, index: MIDXIndex, weight: Tensor, bias: Optional[Tensor]):
        if not self._copy_vectors:
            return None
        order = index.class_ids.long()
        w = weight.detach()[order].contiguous()
        b = None if bias is None else bias.detach()[order].contiguous()
        pos_dtype = torch.int32 if index.num_classes <= torch.iinfo(torch.int32).max else torch.int64
        return index, w, b, torch.arange(index.num_classes, dtype=pos_dtype, device=weight.device)

    def _build_index(self, weight: Tensor, bias: Optional[Tensor]) -> MIDXIndex:
        n, d = weight.shape
        # A bf16/fp16 weight is never copied to float32 whole (25.6 GB at 100M x 64): k-means runs on
        # a widened subsample and the assignment widens one chunk of rows at a time. The codebooks
        # and the scores are float32 for every weight dtype.
        half = weight.dtype in (torch.float16, torch.bfloat16)
        w = weight.detach() if half else weight.detach().to(torch.float32)
        _check_weight_rows(w)
        beta = None if bias is None else bias.detach().to(torch.float32).contiguous()
        if beta is not None:
            check_finite("bias", beta)
        k = self.num_codewords
        fit = dict(iters=self.kmeans_iters, max_points_per_centroid=self.max_points_per_centroid,
                   generator=self._generator)
        prev = self._index
        prev1, prev2 = (None, None) if prev is None else (prev.codebook1, prev.codebook2)
        del prev
        # The inputs are checked: the old index's arrays go now, before k-means, the assignment and
        # the new cells allocate (its codebooks stay, for the warm start)
        self._drop_old_index()
        if beta is not None and beta.untyped_storage().data_ptr() == bias.untyped_storage().data_ptr():
            # an fp32 bias: the snapshot would be the bias's own memory, changed by every optimizer
            # step (and written by in-place updates); log Q must stay that of the cells built here
            beta = beta.clone()
        cap = self.max_points_per_centroid * k

        def subsample():
            if n <= cap:
                return slice(None)
            # a copy of the first cap ids: the slice alone would keep the whole [N] int64
            # permutation alive through the rest of the build (160 MB at N = 20M)
            return torch.randperm(n, generator=self._generator)[:cap].clone().to(w.device)

        if half:
            sub = subsample()
            fit_w = w[sub].to(torch.float32)
        else:
            fit_w = w  # kmeans subsamples by itself
        # a chunk of rows at a time, into int32: no [N] int64 codes or [N] distances (240 MB at 20M)
        codes_of = (lambda x, c: assign_chunked(x, c, dtype=torch.int32))  # noqa: E731
        if self.quantizer == "rq":
            c1 = kmeans(fit_w, k, init=prev1, **fit)
            code1 = codes_of(w, c1)
            # the second codebook is fitted on the residuals of a subsample only
            if not half:
                sub = subsample()
            c2 = kmeans(w[sub].to(torch.float32) - c1[code1[sub]], k, init=prev2, **fit)
            code2 = assign_residual(w, c1, code1, c2, dtype=torch.int32)
        else:
            h = d // 2
            c1 = kmeans(fit_w[:, :h].contiguous(), k, init=prev1, **fit)
            c2 = kmeans(fit_w[:, h:].contiguous(), k, init=prev2, **fit)
            code1 = codes_of(w[:, :h], c1)
            code2 = codes_of(w[:, h:], c2)
        check_fp32_range("weight's k-means codewords", torch.cat([c1, c2], 1), _OVERFLOW_FIX)
        (offsets, class_ids, alias_prob, alias_pos, beta_csr, log_n, cell_mass,
         log_n_max) = ops.build_cells(code1, code2, beta, k)
        has_bias = beta is not None
        return MIDXIndex(c1, c2, code1, code2, beta, offsets, class_ids,
                         alias_prob if has_bias else None, alias_pos if has_bias else None,
                         beta_csr if has_bias else None, log_n, cell_mass, log_n_max, n, d)

    def update(self, weight: Tensor, bias: Optional[Tensor], changed: Tensor) -> "MIDXSampler":
        """Incremental rebuild: re-assign only the classes ``changed`` (int64 ids, any order and
        repeats) against the current codebooks (kept frozen), take their bias snapshot, and update
        the cells they leave or join. weight [N, d] and bias [N] are the current parameters (the
        same N, d, device and bias presence as the index). The result equals a full rebuild's cells
        for the same codebooks, codes and beta, bit for bit. The k-means generator is not used (a
        resumed run stays bit exact).

        On CPU the index's arrays are rewritten in place (op ``update_cells_``: no second copy of
        the per-class arrays, ~28 bytes per class with a bias) when nothing but this sampler
        references the current :class:`MIDXIndex`: no reader in the middle of a call, no
        ``sampler.index`` kept by the caller, no cell-ordered copy (``copy_vectors=True``). A
        tensor of the index that something else references (a kept ``sampler.class_ids``, a state
        dict) is copied first, so what others hold never changes. It runs under the sampler's lock,
        which readers hold around their ops, so a concurrent reader sees the old or the new index.
        Otherwise (and on CUDA) a new index is made beside the old one (op ``update_cells``) and
        swapped in by one assignment. ``last_update_in_place`` says which way the latest update ran."""
        # The checks, the re-assignment and the cell update are ops with their own threads around a
        # few O(C) torch ops: serial glue (imi_softmax/_serial_glue.py), so that none of those waits
        # for a thread that a busy machine keeps off its core.
        with serial_glue():
            index = self._require_index()
            check_tensor("weight", weight, dims=(2,))
            if tuple(weight.shape) != (index.num_classes, index.in_features):
                raise ValueError(f"weight must be [{index.num_classes}, {index.in_features}] like the index, got "
                                 f"{tuple(weight.shape)}: a different shape needs a full build(weight, bias)")
            if weight.device != index.codebook1.device:
                raise ValueError(f"weight is on {weight.device} but the index is on {index.codebook1.device}: "
                                 f"a new device needs a full build(weight, bias)")
            if (bias is None) != (index.beta is None):
                raise ValueError("bias must be given exactly when the index was built with one "
                                 f"(index has {'a' if index.beta is not None else 'no'} bias snapshot): "
                                 "call build(weight, bias) instead")
            if bias is not None:
                check_tensor("bias", bias, dims=(1,))
                if bias.shape[0] != index.num_classes:
                    raise ValueError(f"bias must be [{index.num_classes}] to match weight, got {tuple(bias.shape)}")
            check_tensor("changed", changed)
            if changed.dtype != torch.int64:
                raise TypeError(f"changed must hold int64 class ids, got {changed.dtype}")
            if changed.device != weight.device:
                raise ValueError(f"changed is on {changed.device} but weight is on {weight.device}")
            check_class_ids("changed", changed, index.num_classes)
            changed = changed.reshape(-1)
            if changed.numel() > 1 and not bool((changed[1:] > changed[:-1]).all()):
                changed = torch.unique(changed)  # a sort; a mask's nonzero() is ascending already
            with no_autocast(weight.device):
                a1, a2, new_beta = self._assign_changed(index, weight, bias, changed)
                on_cpu = index.codebook1.device.type == "cpu"
                del index  # this frame's reference would count as another holder
                new_index = None
                if not (on_cpu and self._update_in_place(changed, a1, a2, new_beta)):
                    index = self._require_index()
                    new_index = self._update_index(index, changed, a1, a2, new_beta)
                    del index
        if new_index is not None:  # torch's threads for the cell-ordered copy ([N, d] gathers)
            self._cell_copy = self._take_cell_copy(new_index, weight, bias)
            self._index = new_index
            self.last_update_in_place = False
        self._vectors = (weight, bias)
        return self

    def _update_in_place(self, changed: Tensor, a1: Tensor, a2: Tensor, new_beta: Optional[Tensor]) -> bool:
        """update_cells_ on the current index when only this sampler references it; False (nothing
        done) otherwise. Tensors of the index referenced elsewhere are replaced by copies first."""
        with self._lock:
            count, fields = _holders(self)
            sole_count, sole_field = _sole_holder_counts()
            if count != sole_count or self._cell_copy is not None or self._index is None:
                return False
            index = self._index
            owned = {}
            for name, held in zip(_INPLACE_FIELDS, fields):
                t = getattr(index, name)
                if t is not None and held != sole_field:
                    owned[name] = t.clone()
            # a new MIDXIndex object over the same arrays: caches keyed by the old one's identity miss
            index = self._index = index._replace(**owned)
            try:
                ops.update_cells_(index.offsets, index.class_ids, index.alias_prob, index.alias_pos, index.beta_csr,
                                  index.log_n, index.cell_mass, index.log_n_max, index.code1, index.code2,
                                  index.beta, changed, a1, a2, new_beta, self.num_codewords)
            except RuntimeError as err:
                if "now invalid" in str(err):  # refused half-way (an inconsistent index): never sample it
                    self._index = None
                raise
            self.last_update_in_place = True
            return True

    def _assign_changed(self, index: MIDXIndex, weight: Tensor, bias: Optional[Tensor],
                        changed: Tensor) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """New codes (int32 [C] each) of the rows ``changed`` against the index's codebooks, and
        their bias snapshot (float32 [C] or None)."""
        new_beta = None
        if bias is not None:
            new_beta = bias.detach()[changed].to(torch.float32)
            check_finite("bias", new_beta)
        # One op for the gather, the widening to float32, the check and both assignments, in row
        # blocks the threads claim as they come (no [C, d] copy, no torch op in between): the same
        # codes as assign / assign_residual on the float32 rows.
        a1, a2, finite = ops.assign_rows(weight.detach(), changed, index.codebook1, index.codebook2,
                                         self.quantizer == "rq")
        if not bool(finite):
            _raise_for_rows(weight, changed)
        return a1, a2, new_beta

    def _update_index(self, index: MIDXIndex, changed: Tensor, a1: Tensor, a2: Tensor,
                      new_beta: Optional[Tensor]) -> MIDXIndex:
        """A new index: the copy op update_cells (every device)."""
        c1, c2 = index.codebook1, index.codebook2
        (code1, code2, beta, offsets, class_ids, alias_prob, alias_pos, beta_csr, log_n, cell_mass,
         log_n_max) = ops.update_cells(index.offsets, index.class_ids, index.alias_prob, index.alias_pos,
                                       index.beta_csr, index.log_n, index.cell_mass, index.log_n_max,
                                       index.code1, index.code2, index.beta, changed, a1, a2, new_beta,
                                       self.num_codewords)
        has_bias = new_beta is not None
        return MIDXIndex(c1, c2, code1, code2, beta if has_bias else None, offsets, class_ids,
                         alias_prob if has_bias else None, alias_pos if has_bias else None,
                         beta_csr if has_bias else None, log_n, cell_mass, log_n_max,
                         index.num_classes, index.in_features)

    def refine_codebooks(self, queries: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
                         steps: Optional[int] = None, lr: Optional[float] = None) -> Dict[str, float]:
        """Move the codebooks to lower KL(P || Q) on ``queries`` [Bq, d], cells kept (see
        :mod:`imi_softmax.samplers.kl_refine` for the math and why the assignment is kept).

        P = softmax(queries @ weight.T + bias) over all classes, with the current weight [N, d] and
        bias [N] (or None); the index must be built over the same N and d. ``steps`` (default
        ``kl_refine_steps``) Adam steps with ``lr`` (default ``kl_refine_lr``, relative to the
        codebooks' RMS entry). The new codebooks are swapped in only when they lower the mean KL on
        ``queries``; log Q stays exact either way. Returns (and keeps in ``last_refine``) a dict with
        ``kl_before``, ``kl_after`` (mean nats over the queries), ``steps`` and ``improved``.
        Cost: two passes of O(Bq N d) for P's cell masses, then O(Bq K (K + d)) per step."""
        from .kl_refine import refine_codebooks

        index = self._require_index()
        steps = self.kl_refine_steps if steps is None else check_positive_int("steps", steps, minimum=0)
        lr = self.kl_refine_lr if lr is None else _check_lr(lr, "lr")
        self._check_query(index, queries)
        check_finite("query", queries)  # refinement does not go through scores(), where sampling checks it
        self._check_weight(index, weight, "build(weight, bias) first")
        check_finite("weight", weight)
        if bias is not None:
            check_tensor("bias", bias, dims=(1,))
            if bias.shape[0] != index.num_classes:
                raise ValueError(f"bias must be [{index.num_classes}] to match weight, got {tuple(bias.shape)}")
            if bias.device != weight.device:
                raise ValueError(f"bias is on {bias.device} but weight is on {weight.device}")
            check_finite("bias", bias)
        if queries.shape[0] == 0:
            raise ValueError("queries must hold at least one row (got 0): refinement fits the codebooks to them")
        with no_autocast(weight.device):
            c1, c2, stats = refine_codebooks(index, self.quantizer, queries, weight, bias, steps=steps, lr=lr)
        if stats["improved"]:
            check_fp32_range("refined codewords", torch.cat([c1, c2], 1), _OVERFLOW_FIX)
            # only the codebooks change: cells, masses and alias tables do not depend on them
            new_index = index._replace(codebook1=c1, codebook2=c2)
            copy = self._cell_copy
            if copy is not None and copy[0] is index:  # nor does the cell-ordered copy
                self._cell_copy = (new_index,) + copy[1:]
            self._index = new_index
        self.last_refine = stats
        return stats

    def _require_index(self) -> MIDXIndex:
        index = self._index
        if index is None:  # a rebuild may have dropped the old index: it holds the lock until the new one is in
            with self._lock:
                index = self._index
        if index is None:
            raise RuntimeError("MIDXSampler has no index yet: call build(weight, bias) first")
        return index

    # Read-only views of the current index (tests, benchmarks, inspection). A caller that needs
    # several of them consistent under concurrent rebuilds should read ``sampler.index`` once.
    num_classes = property(lambda self: None if self._index is None else self._index.num_classes)
    in_features = property(lambda self: None if self._index is None else self._index.in_features)
    codebooks = property(lambda self: (None, None) if self._index is None
                         else (self._index.codebook1, self._index.codebook2))
    code1 = property(lambda self: getattr(self._index, "code1", None))
    code2 = property(lambda self: getattr(self._index, "code2", None))
    beta = property(lambda self: getattr(self._index, "beta", None))
    offsets = property(lambda self: getattr(self._index, "offsets", None))
    class_ids = property(lambda self: getattr(self._index, "class_ids", None))
    alias_prob = property(lambda self: getattr(self._index, "alias_prob", None))
    alias_pos = property(lambda self: getattr(self._index, "alias_pos", None))
    beta_csr = property(lambda self: getattr(self._index, "beta_csr", None))
    log_n = property(lambda self: getattr(self._index, "log_n", None))
    cell_mass = property(lambda self: getattr(self._index, "cell_mass", None))
    log_n_max = property(lambda self: getattr(self._index, "log_n_max", None))

    @property
    def device(self) -> Optional[torch.device]:
        index = self._index
        return None if index is None else index.codebook1.device

    @_reads_index
    def cell_counts(self) -> Tensor:
        """Classes per cell, [K, K] int64 (for inspection)."""
        offsets = self._require_index().offsets
        return (offsets[1:] - offsets[:-1]).view(self.num_codewords, self.num_codewords)

    # -- proposal ---------------------------------------------------------------------------
    def scores(self, query: Tensor, index: Optional[MIDXIndex] = None, *, check: bool = True) -> Tuple[Tensor, Tensor]:
        """Codeword scores s1, s2: [B, K] float32 each (never autocast: log Q is exact for them).
        ``check=False`` skips the finiteness check (a sync): for callers whose op checks them."""
        index = self._require_index() if index is None else index
        c1, c2 = index.codebook1, index.codebook2
        q = query.detach().to(torch.float32)
        k = c1.shape[0]
        with no_autocast(q.device):
            if self.quantizer == "rq":
                # one product and one check for both codebooks: each op is a parallel region, and a
                # region waits for every thread (sampling is a few ms, so they showed)
                both = q @ self._codewords_t(c1, c2)            # [B, 2K]
            else:
                h = q.shape[1] // 2
                both = torch.cat([q[:, :h] @ c1.T, q[:, h:] @ c2.T], 1)
        if check and not _compiling() and both.numel() and not bool(torch.isfinite(both.sum())):
            self._explain_scores(q, both)
        return both[:, :k], both[:, k:]

    def _codewords_t(self, c1: Tensor, c2: Tensor) -> Tensor:
        """[d, 2K]: the two rq codebooks side by side, transposed, kept while the codebooks are the
        same tensors, unmodified (the concatenation was a few percent of a sample() call)."""
        if _compiling():
            return torch.cat([c1, c2]).T
        key = (c1._version, c2._version)
        cached = getattr(self, "_codewords_cache", None)
        if cached is not None and cached[0] is c1 and cached[1] is c2 and cached[2] == key:
            return cached[3]
        both = torch.cat([c1, c2]).T
        self._codewords_cache = (c1, c2, key, both)
        return both

    @staticmethod
    def _explain_scores(q: Tensor, both: Tensor) -> None:
        """Raises the error that names why the scores [B, 2K] of query q [B, d] are not finite."""
        # A NaN / Inf query makes its scores non-finite, so the query's own check runs only here.
        check_finite("query", q)
        check_fp32_range("proposal scores query @ codewords(weight)", both,
                         "the query or the weight is too large: " + _OVERFLOW_FIX, cause=q)

    def _op_scores(self, query: Tensor, index: MIDXIndex) -> Tuple[Tensor, Tensor]:
        """scores() for an op called through :meth:`_proposal_op`: unchecked on the CPU, whose ops
        check them themselves."""
        return self.scores(query, index, check=query.device.type != "cpu")

    def _proposal_op(self, query: Tensor, s1: Tensor, s2: Tensor, op, *args):
        """op(*args) for a proposal or search op given scores that scores(check=False) did not check:
        the CPU ops (and their fallbacks) check them (the sampling ops in their loop, sparing the sync
        of a check here); when they find NaN / Inf scores, the error names the cause as
        scores(check=True) would."""
        if _compiling() or query.device.type != "cpu":
            return op(*args)
        try:
            return op(*args)
        except RuntimeError as e:
            if "hold NaN or Inf" not in str(e):
                raise
        q = query.detach().to(torch.float32)
        self._explain_scores(q, torch.cat([s1, s2], 1))
        raise RuntimeError("the query scores hold NaN or Inf")  # _explain_scores raised already

    @staticmethod
    def _check_index_ids(name: str, index: MIDXIndex, query: Tensor, ids: Tensor) -> None:
        check_tensor(name, ids)
        if ids.dim() < 1 or ids.shape[0] != query.shape[0]:
            raise ValueError(f"{name} must be [B, ...] with B = {query.shape[0]} (query rows), got {tuple(ids.shape)}")
        check_class_ids(name, ids, index.num_classes)

    @staticmethod
    def _check_weight(index: MIDXIndex, weight: Tensor, shape_fix: str) -> None:
        """weight is a [N, d] tensor matching the index, on its device; ``shape_fix`` ends the
        shape error with what the caller should do."""
        check_tensor("weight", weight, dims=(2,))
        if tuple(weight.shape) != (index.num_classes, index.in_features):
            raise ValueError(f"weight must be [{index.num_classes}, {index.in_features}] like the index, got "
                             f"{tuple(weight.shape)}: {shape_fix}")
        if weight.device != index.codebook1.device:
            raise ValueError(f"weight is on {weight.device} but the index is on {index.codebook1.device}")

    def _check_query(self, index: MIDXIndex, query: Tensor) -> None:
        check_tensor("query", query, dims=(2,), dtypes=FLOAT_DTYPES)
        if query.shape[1] != index.in_features:
            raise ValueError(f"query must be [B, {index.in_features}], got {tuple(query.shape)}")
        if query.device != index.codebook1.device:
            raise ValueError(f"query is on {query.device} but the index is on {index.codebook1.device}; rebuild or move it")
        # finiteness: checked in scores(), where a NaN / Inf query shows as non-finite scores

    def sample(self, query: Tensor, num_samples: int, generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
        """Draw num_samples classes per query row: (ids [B, M] int64, log_q [B, M] float32)."""
        ids, log_q, _ = self.sample_with_targets(query, num_samples, None, generator)
        return ids, log_q

    @_reads_index
    def sample_with_targets(self, query: Tensor, num_samples: int, targets: Optional[Tensor],
                            generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """One query preparation serves the draws and the targets' log Q (bit-equal to log_prob).
        targets [B, L] int64 class ids or None -> (ids [B, M], log_q [B, M], target_log_q [B, L])."""
        index = self._require_index()  # the one read of the index for this call
        self._check_query(index, query)
        num_samples = check_positive_int("num_samples", num_samples, minimum=0)
        check_generator(generator)
        if targets is not None:
            self._check_index_ids("targets", index, query, targets)
            if targets.dim() != 2:
                raise ValueError(f"targets must be [B, L], got {tuple(targets.shape)}")
        if query.shape[0] == 0:  # nothing to draw (the op would still size its scratch by num_samples)
            ids, log_q = self._empty_draw(query, num_samples)
            return ids, log_q, log_q.new_empty((0, 0 if targets is None else targets.shape[1]))
        s1, s2 = self._op_scores(query, index)
        return self._proposal_op(query, s1, s2, ops.midx_sample, s1, s2, index.log_n, index.cell_mass,
                                 index.log_n_max, index.offsets, index.class_ids, index.alias_prob,
                                 index.alias_pos, index.beta_csr, num_samples, generator, targets, index.beta,
                                 index.code1, index.code2)

    @_reads_index
    def log_prob(self, query: Tensor, ids: Tensor) -> Tensor:
        """Exact log Q(ids | query); ids [B, ...] int64 -> float32 of the same shape."""
        index = self._require_index()  # the one read of the index for this call
        self._check_query(index, query)
        self._check_index_ids("ids", index, query, ids)
        s1, s2 = self._op_scores(query, index)
        flat = ids.reshape(ids.shape[0], math.prod(ids.shape[1:]))  # -1 is ambiguous when B = 0
        out = self._proposal_op(query, s1, s2, ops.midx_log_prob, s1, s2, index.log_n, index.cell_mass,
                                index.log_n_max, index.beta, index.code1, index.code2, flat)
        return out.reshape(ids.shape)

    # -- retrieval --------------------------------------------------------------------------
    @_reads_index
    def search(self, query: Tensor, k: int, budget: int = 4096, *, weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, rerank: str = "auto") -> Tuple[Tensor, Tensor]:
        """Approximate top-k classes of each query row by the exact logit ``query . w_i + b_i``.

        Cells are visited in decreasing ``s1[k1] + s2[k2]`` order (the inverted multi-index's
        multi-sequence algorithm; empty cells skipped) until they hold ``>= budget`` classes (or all
        classes); those candidates are reranked exactly and the ``k`` best returned, best first (ties:
        smaller id). ``budget >= num_classes`` gives the exact top-k.

        Args:
            query: [B, d] (d = in_features of the index), cast to the weight's dtype for the rerank.
            k: results per row, 1 <= k <= min(budget, num_classes).
            budget: candidates to collect per row (classes scored is at least this, up to one cell more).
            weight, bias: class vectors [N, d] and [N] (or None) to rerank with, e.g. a head's current
                parameters; the cells stay those of the last build. Default (weight None): the
                weight and bias given to the last ``build``/``update`` (held by reference), or their
                cell-ordered copy taken then if that build had ``copy_vectors=True`` (same
                candidates and scores; among equal scores the order is the copy's, not the id's).
            rerank: the CPU's rerank order; the result does not depend on it. ``"query"``: each query
                scores its candidates (reads their rows itself); ``"cell"``: the batch's visited cells
                are scored one at a time against all the queries that visit them (each row read once
                per batch: faster when queries share cells); ``"auto"``: ``"cell"`` for batches of
                64 queries or more. CUDA runs one kernel for all three.
        Returns:
            ids [B, k] int64, scores [B, k] (float32; float64 for a float64 weight).
        """
        index = self._require_index()  # the one read of the index for this call
        k = check_positive_int("k", k)
        budget = check_positive_int("budget", budget)
        if rerank not in ("auto", "query", "cell"):
            raise ValueError(f"rerank must be 'auto', 'query' or 'cell', got {rerank!r}")
        if budget < k:
            raise ValueError(f"budget ({budget}) must be >= k ({k}): the k results are chosen among the budget "
                             f"candidates; raise budget or lower k")
        if k > index.num_classes:
            raise ValueError(f"k must be <= num_classes ({index.num_classes}), got {k}")
        self._check_query(index, query)
        copy = self._cell_copy
        if weight is None and bias is None and copy is not None and copy[0] is index:
            s1, s2 = self._op_scores(query, index)
            with no_autocast(query.device):
                pos, scores = self._proposal_op(query, s1, s2, ops.midx_search, query.detach().to(copy[1].dtype),
                                                copy[1], copy[2], s1, s2, index.offsets, copy[3], k, budget, rerank)
            return index.class_ids[pos].long(), scores  # gather, then widen: never the whole [N] array
        if weight is None:
            if bias is not None:
                raise ValueError("bias was given without weight: pass both (or neither, to rerank with the "
                                 "vectors of the last build)")
            if self._vectors is None:
                raise RuntimeError("this sampler's index was loaded from a state dict without its class vectors: "
                                   "pass weight= (and bias=) to search")
            weight, bias = self._vectors
        self._check_weight(index, weight, "rebuild the index for a new shape")
        if bias is not None:
            check_tensor("bias", bias, dims=(1,))
            if bias.shape[0] != index.num_classes or bias.dtype != weight.dtype or bias.device != weight.device:
                raise ValueError(f"bias must be [{index.num_classes}] with weight's dtype ({weight.dtype}) and device, "
                                 f"got {tuple(bias.shape)} {bias.dtype} on {bias.device}")
        s1, s2 = self._op_scores(query, index)
        with no_autocast(query.device):
            return self._proposal_op(query, s1, s2, ops.midx_search, query.detach().to(weight.dtype), weight.detach(),
                                     None if bias is None else bias.detach(), s1, s2, index.offsets,
                                     index.class_ids, k, budget, rerank)

    @_reads_index
    def search_cells(self, query: Tensor, budget: int) -> Tuple[Tensor, Tensor]:
        """The cells :meth:`search` visits (for inspection and tests): cells [B, min(K*K, budget)]
        int64 (cell ``k1 * K + k2`` in visit order, -1 after the last) and the classes they hold [B]."""
        index = self._require_index()
        budget = check_positive_int("budget", budget)
        self._check_query(index, query)
        s1, s2 = self._op_scores(query, index)
        return self._proposal_op(query, s1, s2, ops.midx_search_cells, s1, s2, index.offsets, budget)

    # -- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """k-means generator state and the index tensors (so a resumed run neither rebuilds nor
        shifts the generator: bit-exact continuation)."""
        with self._lock:  # never an index half-way through an in-place update
            index = self._index
        state: Dict[str, Any] = {
            "version": _STATE_VERSION, "num_codewords": self.num_codewords, "quantizer": self.quantizer,
            "generator": self._generator.get_state(), "index": None,
        }
        if index is not None:
            state["index"] = index._asdict()
        return state

    def load_state_dict(self, state: Dict[str, Any], device=None) -> bool:
        if not isinstance(state, dict) or not {"num_codewords", "quantizer", "generator"} <= state.keys():
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"this sampler state was not written by MIDXSampler.state_dict() (it holds {keys}): "
                             "was the checkpoint saved by a head with another sampler? Construct the head with "
                             "the sampler it was saved with")
        for key in ("num_codewords", "quantizer"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"sampler state was saved with {key}={state.get(key)!r}, this sampler has "
                                 f"{key}={getattr(self, key)!r}: construct the head with the same {key}")
        self._generator.set_state(state["generator"])
        saved = state.get("index")
        if saved is None:
            self._index = None
            return False
        self._vectors = None  # a loaded index without its vectors: search() needs weight=
        self._cell_copy = None
        fields = {f: (None if saved[f] is None else saved[f].to(device)) for f in _TENSOR_FIELDS}
        # version 1 states kept the per-class arrays in int64: the ops take int32 (ids < N < 2^31)
        for f in _INDEX_INT32_FIELDS:
            if fields[f] is not None and fields[f].dtype != torch.int32:
                if fields[f].numel() > 0 and int(fields[f].max()) > MAX_INDEX_CLASSES:
                    raise ValueError(f"saved index field {f} holds {int(fields[f].max())}, beyond int32: "
                                     "this state was not written by an MIDXSampler; rebuild the index")
                fields[f] = fields[f].to(torch.int32)
        self._index = MIDXIndex(**fields, num_classes=int(saved["num_classes"]),
                                in_features=int(saved["in_features"]))
        return True

    def extra_repr(self) -> str:
        return (f"num_codewords={self.num_codewords}, quantizer={self.quantizer!r}, "
                f"kmeans_iters={self.kmeans_iters}, num_classes={self.num_classes}"
                + (f", kl_refine_steps={self.kl_refine_steps}" if self.kl_refine_steps else "")
                + (", copy_vectors=True" if self._copy_vectors else ""))
