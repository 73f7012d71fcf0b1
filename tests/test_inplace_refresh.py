"""In-place incremental refresh (op update_cells_, CPU): the index's arrays rewritten equal the copy
op update_cells and build_cells on the new codes bit for bit; MIDXSampler.update takes it only when
nothing else references the index; a concurrent reader sees the old or the new index, never a mix;
bad input is refused before any write; a full rebuild lets go of the old arrays first."""
import copy
import gc
import pickle
import threading
import time

import pytest
import torch

from imi_softmax import IMISoftmax, MIDXSampler, _fallback as fb, ops
from imi_softmax._loader import USING_FALLBACK
from conftest import random_index

CELL_NAMES = ("offsets", "class_ids", "alias_prob", "alias_pos", "beta_csr", "log_n", "cell_mass", "log_n_max")
_UNSET = object()
ALL_NAMES = ("code1", "code2", "beta") + CELL_NAMES


def _index_arrays(n, k, bias, seed, code2_values=None):
    (code1, code2, beta), cells = random_index(n, k, bias, seed=seed, code2_values=code2_values)
    arrays = dict(zip(ALL_NAMES, (code1, code2, beta) + tuple(cells)))
    if not bias:
        for name in ("alias_prob", "alias_pos", "beta_csr"):
            arrays[name] = None  # as MIDXSampler passes them
    return arrays


def _args(a, changed, new1, new2, new_beta, k):
    return (a["offsets"], a["class_ids"], a["alias_prob"], a["alias_pos"], a["beta_csr"], a["log_n"],
            a["cell_mass"], a["log_n_max"], a["code1"], a["code2"], a["beta"], changed, new1, new2, new_beta, k)


def _copy_op(a, change, k):
    out = ops.update_cells(*_args(a, *change, k))
    return dict(zip(ALL_NAMES, out))


def _in_place(a, change, k, fn=None):
    b = {name: None if t is None else t.clone() for name, t in a.items()}
    (fn or ops.update_cells_)(*_args(b, *change, k))
    return b


def _assert_equal(got, want, bias):
    for name in ALL_NAMES:
        g, w = got[name], want[name]
        if g is None:
            assert not bias and (w is None or w.numel() == 0), name
            continue
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert torch.equal(g, w), name


def _change(n, k, rows, bias, seed, to_cells=None):
    """New codes for the ids ``rows`` (ascending), random or drawn from to_cells [(k1, k2), ...]."""
    g = torch.Generator().manual_seed(seed)
    changed = torch.as_tensor(rows, dtype=torch.int64).sort().values
    c = changed.numel()
    if to_cells is None:
        new1 = torch.randint(0, k, (c,), generator=g).int()
        new2 = torch.randint(0, k, (c,), generator=g).int()
    else:
        pick = torch.as_tensor(to_cells, dtype=torch.int32)[torch.randint(0, len(to_cells), (c,), generator=g)]
        new1, new2 = pick[:, 0].contiguous(), pick[:, 1].contiguous()
    new_beta = torch.randn(c, generator=g) * 2 if bias else None
    return changed, new1, new2, new_beta


def _check_all_three(a, change, k, bias):
    """in place == copy op == build_cells on the new codes."""
    got = _in_place(a, change, k)
    want = _copy_op(a, change, k)
    _assert_equal(got, want, bias)
    code1, code2, beta = got["code1"], got["code2"], got["beta"]
    built = dict(zip(CELL_NAMES, ops.build_cells(code1, code2, beta, k)))
    for name in CELL_NAMES:
        if got[name] is not None:
            assert torch.equal(got[name], built[name]), name
    return got


def _sets(n, seed):
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    return {"empty": [], "one": perm[:1].tolist(), "1%": perm[: max(1, n // 100)].tolist(),
            "50%": perm[: n // 2].tolist(), "all": list(range(n))}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("k", [4, 16])
@pytest.mark.parametrize("which", ["empty", "one", "1%", "50%", "all"])
def test_in_place_equals_copy_op_and_build(bias, k, which):
    n = 3000
    a = _index_arrays(n, k, bias, seed=k + len(which))
    rows = _sets(n, seed=7)[which]
    _check_all_three(a, _change(n, k, rows, bias, seed=3), k, bias)


@pytest.mark.parametrize("bias", [True, False])
def test_cells_that_empty_and_rows_that_move_to_empty_cells(bias):
    k, n = 8, 1500
    # code2 in {0, 1, 2}: cells with code2 >= 3 start empty
    a = _index_arrays(n, k, bias, seed=1, code2_values=[0, 1, 2])
    cell = a["code1"].long() * k + a["code2"].long()
    emptied = [int(c) for c in cell.unique()[:5]]
    rows = torch.nonzero(torch.isin(cell, torch.tensor(emptied))).flatten().tolist()  # whole cells leave
    change = _change(n, k, rows, bias, seed=2, to_cells=[(1, 5), (6, 7), (0, 3)])  # into empty cells
    got = _check_all_three(a, change, k, bias)
    counts = got["offsets"][1:] - got["offsets"][:-1]
    assert all(int(counts[c]) == 0 for c in emptied)
    assert int(counts[1 * k + 5]) > 0 and int(counts[6 * k + 7]) > 0


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("n", [20, 200])
def test_every_class_moving_to_one_cell(bias, n):
    """Every class joins one cell: the cells that stay empty but sit in a saved band are copied with
    zero entries from an empty per-thread buffer, whose data() is null: memcpy(dst, nullptr, 0) is
    undefined behaviour (UBSan: "null pointer passed as argument 2"), so such a cell copies nothing."""
    k = 4
    a = _index_arrays(n, k, bias, seed=5)
    change = _change(n, k, list(range(n)), bias, seed=6, to_cells=[(0, k - 1)])
    got = _check_all_three(a, change, k, bias)
    counts = got["offsets"][1:] - got["offsets"][:-1]
    assert int(counts[k - 1]) == n


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("direction", ["grow_first", "grow_last", "shrink_first", "shrink_last"])
def test_staging_in_both_directions(bias, direction):
    """Rows moving into the first (last) cell shift every later (earlier) cell right (left); rows
    leaving it shift them the other way: the staging queue and the boundary bands in both directions."""
    k, n = 6, 2400
    a = _index_arrays(n, k, bias, seed=5)
    first, last = (0, 0), (k - 1, k - 1)
    cell = a["code1"].long() * k + a["code2"].long()
    g = torch.Generator().manual_seed(9)
    if direction.startswith("grow"):
        target = first if direction == "grow_first" else last
        rows = torch.randperm(n, generator=g)[:300].tolist()
        change = _change(n, k, rows, bias, seed=4, to_cells=[target])
    else:
        source = 0 if direction == "shrink_first" else k * k - 1
        rows = torch.nonzero(cell == source).flatten().tolist()
        change = _change(n, k, rows, bias, seed=4, to_cells=[(k // 2, k // 2)])
    _check_all_three(a, change, k, bias)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_in_place_is_the_same_for_any_thread_count(threads):
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for seed in range(4):
            n, k = 5000, 16
            a = _index_arrays(n, k, True, seed=seed)
            rows = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: 50 * (seed + 1)].tolist()
            _check_all_three(a, _change(n, k, rows, True, seed=seed), k, True)
    finally:
        torch.set_num_threads(old)


def test_chained_in_place_updates_stay_equal_to_build():
    n, k = 2000, 8
    a = _index_arrays(n, k, True, seed=3)
    for step in range(6):
        rows = torch.randperm(n, generator=torch.Generator().manual_seed(step))[: 20 + 150 * step].tolist()
        change = _change(n, k, rows, True, seed=10 + step)
        want = _copy_op(a, change, k)
        ops.update_cells_(*_args(a, *change, k))  # the same tensors, again and again
        _assert_equal(a, want, True)


def test_fallback_in_place_matches_the_kernel():
    n, k = 700, 5
    for bias in (True, False):
        a = _index_arrays(n, k, bias, seed=11)
        change = _change(n, k, torch.randperm(n)[:90].tolist(), bias, seed=12)
        _assert_equal(_in_place(a, change, k, fb.update_cells_), _in_place(a, change, k), bias)


@pytest.mark.parametrize("impl", ["ops", "fallback"])
def test_bad_input_is_refused_before_any_write(impl):
    fn = ops.update_cells_ if impl == "ops" else fb.update_cells_
    n, k = 100, 4
    a = _index_arrays(n, k, True, seed=1)
    change = _change(n, k, [3, 17, 40, 41, 99], True, seed=2)
    before = {name: t.clone() for name, t in a.items()}

    def call(changed=None, new1=None, new2=None, new_beta=_UNSET, **over):
        c, n1, n2, nb = change
        b = dict(a, **over)
        fn(*_args(b, c if changed is None else changed, n1 if new1 is None else new1,
                  n2 if new2 is None else new2, nb if new_beta is _UNSET else new_beta, k))

    with pytest.raises(RuntimeError, match="strictly ascending"):
        call(changed=change[0].flip(0))
    with pytest.raises(RuntimeError, match="changed"):
        call(changed=torch.tensor([1, 2, 3, 4, n]))
    with pytest.raises(RuntimeError, match="changed"):
        call(changed=torch.tensor([-1, 2, 3, 4, 5]))
    with pytest.raises(RuntimeError, match="out of range"):
        call(new1=torch.tensor([0, 1, k, 0, 0], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="out of range"):
        call(new2=torch.tensor([0, -1, 0, 0, 0], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="new_code1"):
        call(new1=change[1].long())
    with pytest.raises(RuntimeError, match="changed"):
        call(changed=change[0].int())
    with pytest.raises(RuntimeError, match="new_beta"):
        call(new_beta=None)
    with pytest.raises(RuntimeError, match="new_beta"):
        call(new_beta=change[3].double())
    with pytest.raises(RuntimeError, match="int32"):
        call(class_ids=a["class_ids"].long())
    for name, t in before.items():
        assert torch.equal(a[name], t), f"{name} was modified by a refused call"


@pytest.mark.parametrize("impl", ["ops", "fallback"])
def test_an_index_that_does_not_match_its_codes_is_refused_intact(impl):
    fn = ops.update_cells_ if impl == "ops" else fb.update_cells_
    n, k = 100, 4
    a = _index_arrays(n, k, True, seed=1)
    change = _change(n, k, [3, 17, 40], True, seed=2)
    wrong = a["code1"].clone()
    wrong[change[0]] = (wrong[change[0]] + 1) % k  # not the codes the cells were built from
    b = dict(a, code1=wrong)
    before = {name: t.clone() for name, t in b.items()}
    with pytest.raises(RuntimeError, match="(not in the cell|do not match)"):
        fn(*_args(b, *change, k))
    for name, t in before.items():
        assert torch.equal(b[name], t), name


def _mismatch_cases():
    """(arrays, change, k) per way an index fails to match its codes: a changed row whose stated old
    cell is empty (a count below zero), and one whose stated old cell does not hold it."""
    n, k = 200, 4
    a = _index_arrays(n, k, True, seed=6, code2_values=[0, 1, 2])  # cells (*, 3) are empty
    change = _change(n, k, [5, 60], True, seed=3, to_cells=[(1, 1)])
    empty, elsewhere = dict(a, code2=a["code2"].clone()), dict(a, code1=a["code1"].clone())
    empty["code2"][60] = 3
    elsewhere["code1"][60] = (elsewhere["code1"][60] + 1) % k
    return {"empty": (empty, change, k), "elsewhere": (elsewhere, change, k)}


@pytest.mark.skipif(USING_FALLBACK, reason="the compiled library is not loaded: nothing to compare with")
@pytest.mark.parametrize("case", ["empty", "elsewhere"])
@pytest.mark.parametrize("name", ["update_cells", "update_cells_"])
def test_fallback_refuses_a_mismatched_index_with_the_kernels_message(name, case):
    a, change, k = _mismatch_cases()[case]
    messages = []
    for fn in (getattr(ops, name), getattr(fb, name)):
        b = {key: None if t is None else t.clone() for key, t in a.items()}
        with pytest.raises(RuntimeError) as err:
            fn(*_args(b, *change, k))
        messages.append(str(err.value).splitlines()[0])
        assert all(t is None or torch.equal(t, a[key]) for key, t in b.items()), "a refused call wrote"
    assert messages[0] == messages[1]
    assert messages[0].startswith(name + ": ") and "old" in messages[0]


@pytest.mark.parametrize("impl", ["ops", "fallback"])
def test_arguments_sharing_memory_are_refused(impl):
    fn = ops.update_cells_ if impl == "ops" else fb.update_cells_
    n, k = 100, 4
    a = _index_arrays(n, k, True, seed=1)
    change = _change(n, k, [3, 17, 40], True, seed=2)
    before = {name: t.clone() for name, t in a.items()}
    with pytest.raises(RuntimeError, match="update_cells_: code1 and code2 share memory"):
        fn(*_args(dict(a, code2=a["code1"]), *change, k))
    changed = a["offsets"][:3]  # a view of the index's offsets: written by the op, read as changed
    with pytest.raises(RuntimeError, match="update_cells_: offsets and changed share memory"):
        fn(*_args(a, changed, *change[1:], k))
    for name, t in before.items():
        assert torch.equal(a[name], t), f"{name} was modified by a refused call"


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(bias):
    a = _index_arrays(120, 4, bias, seed=3)
    change = _change(120, 4, torch.randperm(120, generator=torch.Generator().manual_seed(4))[:17].tolist(), bias, 5)
    # opcheck runs the op several times on the same inputs: a change that is its own fixed point
    # (each changed row keeps its codes and bias) leaves the index the same after every run
    changed = change[0]
    same = (changed, a["code1"][changed].clone(), a["code2"][changed].clone(),
            a["beta"][changed].clone() if bias else None)
    torch.library.opcheck(ops.update_cells_, _args(a, *same, 4))


# -- the sampler ------------------------------------------------------------------------------------
def _sampler(bias=True, n=3000, d=8, k=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, d, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    return MIDXSampler(num_codewords=k, kmeans_iters=3).build(w, b), w, b


def _perturb(w, b, rows, seed):
    g = torch.Generator().manual_seed(seed)
    w[rows] += torch.randn(len(rows), w.shape[1], generator=g) * 2
    if b is not None:
        b[rows] += torch.randn(len(rows), generator=g)


def _snapshot(index):
    return {f: None if getattr(index, f) is None else getattr(index, f).clone() for f in ALL_NAMES}


@pytest.mark.parametrize("bias", [True, False])
def test_sampler_updates_in_place_when_it_alone_holds_the_index(bias):
    s, w, b = _sampler(bias)
    rows = torch.arange(0, 3000, 7)
    _perturb(w, b, rows, 1)
    twin = copy.deepcopy(s)  # the same index, updated through the copy op below
    twin_index = twin.index  # held: twin must take the copy path
    s.update(w, b, rows)
    assert s.last_update_in_place is True
    twin.update(w, b, rows)
    assert twin.last_update_in_place is False
    for f in ALL_NAMES:
        x, y = getattr(s.index, f), getattr(twin.index, f)
        assert (x is None and y is None) or torch.equal(x, y), f
    del twin_index
    # sample log_q == log_prob after the in-place refresh
    q = torch.randn(16, 8, generator=torch.Generator().manual_seed(3))
    ids, log_q = s.sample(q, 64, generator=torch.Generator().manual_seed(4))
    assert torch.equal(log_q, s.log_prob(q, ids))


def test_a_held_index_or_array_is_never_changed():
    s, w, b = _sampler()
    held = s.index
    before = _snapshot(held)
    rows = torch.arange(0, 3000, 5)
    _perturb(w, b, rows, 2)
    s.update(w, b, rows)
    assert s.last_update_in_place is False
    for f, t in before.items():
        assert torch.equal(getattr(held, f), t), f
    del held
    gc.collect()
    # now only the sampler holds it: in place; a kept array (and the state dict's) is copied first
    ids = s.class_ids
    ids_before = ids.clone()
    state = s.state_dict()
    state_before = {f: v.clone() for f, v in state["index"].items() if isinstance(v, torch.Tensor)}
    view = s.offsets[1:]
    view_before = view.clone()
    _perturb(w, b, rows, 3)
    s.update(w, b, rows)
    assert s.last_update_in_place is True
    assert torch.equal(ids, ids_before) and torch.equal(view, view_before)
    for f, t in state_before.items():
        assert torch.equal(state["index"][f], t), f
    assert not torch.equal(s.class_ids, ids_before)  # the sampler's index did change


def test_copy_vectors_keeps_the_copy_path():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(2000, 8, generator=g), torch.randn(2000, generator=g)
    s = MIDXSampler(num_codewords=5, kmeans_iters=2).build(w, b, copy_vectors=True)
    _perturb(w, b, torch.arange(0, 2000, 3), 1)
    s.update(w, b, torch.arange(0, 2000, 3))
    assert s.last_update_in_place is False
    q = torch.randn(4, 8, generator=g)
    ids, _ = s.search(q, 5, budget=2000)
    exact = (q @ w.T + b).topk(5).indices
    assert torch.equal(ids, exact)


def test_the_bias_snapshot_is_not_the_bias():
    """build keeps its own copy of an fp32 bias: an update in place writes the snapshot, never the
    head's bias (nor does the optimizer's step change the snapshot)."""
    s, w, b = _sampler()
    assert s.index.beta.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
    b_before = b.clone()
    s.update(w, b + 1.0, torch.arange(0, 3000, 2))
    assert torch.equal(b, b_before)


def test_lock_survives_deepcopy_pickle_and_state_dict():
    s, w, b = _sampler()
    for other in (copy.deepcopy(s), pickle.loads(pickle.dumps(s))):
        assert other._lock is not s._lock
        with other._lock:
            pass
        other.update(w, b, torch.arange(10))
        q = torch.randn(3, 8)
        ids, log_q = other.sample(q, 8)
        assert torch.equal(log_q, other.log_prob(q, ids))
    restored = MIDXSampler(num_codewords=6, kmeans_iters=3)
    restored.load_state_dict(s.state_dict())
    restored.update(w, b, torch.arange(10))  # the state dict is dropped: in place is allowed
    head = IMISoftmax(8, 500, num_codewords=4)
    head.refresh_index()
    head2 = copy.deepcopy(head)
    head2.refresh_index()


def test_a_reader_thread_sees_the_old_or_the_new_index_never_a_mix():
    """One thread samples in a loop (fixed seeds) while the main thread refreshes in place: each
    draw's log_q equals log_prob under the index before or after one of the refreshes, and the ids
    are those that index draws with that seed."""
    s, w, b = _sampler(n=20000, k=16)
    q = torch.randn(8, 8, generator=torch.Generator().manual_seed(1))
    steps = 4
    rows = [torch.randperm(20000, generator=torch.Generator().manual_seed(10 + i))[:4000].sort().values
            for i in range(steps)]
    weights = []
    for i in range(steps):  # the sequence of parameters, applied in the same order below
        _perturb(w, b, rows[i].tolist(), 20 + i)
        weights.append((w.clone(), b.clone()))
    # the expected draws of every index in the sequence (built on a twin with the copy path)
    twin = copy.deepcopy(s)
    expected = []

    def draws(sampler, seed):
        return sampler.sample(q, 32, generator=torch.Generator().manual_seed(seed))

    seeds = range(6)
    expected.append({sd: draws(twin, sd) for sd in seeds})
    for i in range(steps):
        twin.update(*weights[i], rows[i])
        expected.append({sd: draws(twin, sd) for sd in seeds})

    seen, stop, errors = [], threading.Event(), []

    def reader():
        try:
            j = 0
            deadline = time.monotonic() + 60
            while not stop.is_set() and time.monotonic() < deadline:
                sd = seeds[j % len(seeds)]
                seen.append((sd, draws(s, sd)))
                j += 1
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    t = threading.Thread(target=reader)
    t.start()
    in_place = 0
    try:
        for i in range(steps):
            time.sleep(0.02)
            s.update(*weights[i], rows[i])
            in_place += bool(s.last_update_in_place)
        time.sleep(0.02)
    finally:
        stop.set()
        t.join(timeout=120)
    assert not t.is_alive() and not errors
    assert in_place >= 1  # the reader's reference is short-lived: most refreshes run in place
    assert len(seen) > 0
    for sd, (ids, log_q) in seen:
        assert any(torch.equal(ids, e[sd][0]) and torch.equal(log_q, e[sd][1]) for e in expected), sd


def test_full_rebuild_drops_the_old_arrays_first(monkeypatch):
    s, w, b = _sampler()
    seen = {}
    real = ops.build_cells

    def spy(*args):
        seen["index_during_cells"] = s._index
        seen["locked"] = not s._lock.acquire(blocking=False) or (s._lock.release() or False)
        return real(*args)

    import imi_softmax.samplers.midx as midx_module
    monkeypatch.setattr(midx_module.ops, "build_cells", spy)
    old_c1 = s.index.codebook1.clone()
    s.build(w, b)
    assert seen["index_during_cells"] is None  # the old snapshot was let go before the new arrays
    assert s.index is not None and s.index.codebook1.shape == old_c1.shape
    q = torch.randn(4, 8)
    ids, log_q = s.sample(q, 16)
    assert torch.equal(log_q, s.log_prob(q, ids))


def test_failed_cell_pass_leaves_no_index(monkeypatch):
    s, w, b = _sampler()
    import imi_softmax.samplers.midx as midx_module

    def boom(*args):
        raise RuntimeError("simulated out of memory")

    monkeypatch.setattr(midx_module.ops, "build_cells", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        s.build(w, b)
    assert s.index is None
    with pytest.raises(RuntimeError, match="no index yet"):
        s.sample(torch.randn(2, 8), 4)
    monkeypatch.undo()
    s.build(w, b)  # the lock was released: the next build works
    assert s.index is not None


def test_bad_weight_keeps_the_old_index():
    s, w, b = _sampler()
    old = _snapshot(s.index)
    bad = w.clone()
    bad[5, 0] = float("nan")
    with pytest.raises(ValueError):
        s.build(bad, b)
    for f, t in old.items():
        assert torch.equal(getattr(s.index, f), t), f


def test_head_refreshes_in_place():
    torch.manual_seed(0)
    head = IMISoftmax(8, 3000, num_codewords=6, refresh_every=0, full_refresh_every=5, num_samples=32)
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    head.refresh_index()
    x = torch.randn(64, 8)
    t = torch.randint(0, 3000, (64,))
    head.train()
    head(x, t).backward()
    opt.step()
    head.refresh_index()
    assert head.sampler.last_update_in_place is True
    ids, log_q = head.sampler.sample(x, 16)
    assert torch.equal(log_q, head.sampler.log_prob(x, ids))


@pytest.mark.parametrize("case", range(40))
def test_random_skewed_indices_any_thread_count(case):
    """Fixed-seed random cases: skewed cell sizes, rows piling into one cell, tiny and empty indices'
    corners (K = 1, N = 1), 1-8 threads: in place == copy op bit for bit."""
    rng = torch.Generator().manual_seed(1000 + case)
    pick = lambda options: options[int(torch.randint(0, len(options), (1,), generator=rng))]  # noqa: E731
    k, n = pick([1, 2, 3, 7, 16]), pick([1, 2, 50, 700, 3000])
    bias = bool(torch.rand(1, generator=rng) < 0.6)
    weights = torch.rand(k, generator=rng) ** 4 + 1e-3  # a few codewords take most classes
    code1 = torch.multinomial(weights, n, replacement=True, generator=rng).int()
    code2 = torch.multinomial(weights, n, replacement=True, generator=rng).int()
    beta = torch.randn(n, generator=rng) * 3 if bias else None
    cells = ops.build_cells(code1, code2, beta, k)
    a = dict(zip(ALL_NAMES, (code1, code2, beta) + tuple(cells)))
    if not bias:
        a.update(alias_prob=None, alias_pos=None, beta_csr=None)
    count = min(n, pick([0, 1, max(1, n // 100), n // 10, n // 2, n]))
    rows = torch.randperm(n, generator=rng)[:count].tolist()
    one_cell = bool(torch.rand(1, generator=rng) < 0.3)
    target = [(int(torch.randint(0, k, (1,), generator=rng)), int(torch.randint(0, k, (1,), generator=rng)))]
    change = _change(n, k, rows, bias, seed=case, to_cells=target if one_cell else None)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(pick([1, 2, 3, 8]))
        _assert_equal(_in_place(a, change, k), _copy_op(a, change, k), bias)
    finally:
        torch.set_num_threads(old)
