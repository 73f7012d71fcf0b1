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


@pytest.mark.skipif(USING_FALLBACK, reason="the fallback rebuilds from the codes: it never reads the old cells")
def test_an_index_that_does_not_match_its_codes_is_refused_intact():
    n, k = 100, 4
    a = _index_arrays(n, k, True, seed=1)
    change = _change(n, k, [3, 17, 40], True, seed=2)
    wrong = a["code1"].clone()
    wrong[change[0]] = (wrong[change[0]] + 1) % k  # not the codes the cells were built from
    b = dict(a, code1=wrong)
    before = {name: t.clone() for name, t in b.items()}
    with pytest.raises(RuntimeError, match="(not in the cell|do not match)"):
        ops.update_cells_(*_args(b, *change, k))
    for name, t in before.items():
        assert torch.equal(b[name], t), name


@pytest.mark.skipif(USING_FALLBACK, reason="kernel check")
def test_arguments_sharing_memory_are_refused():
    n, k = 100, 4
    a = _index_arrays(n, k, True, seed=1)
    change = _change(n, k, [3, 17, 40], True, seed=2)
    with pytest.raises(RuntimeError, match="share memory"):
        ops.update_cells_(*_args(dict(a, code2=a["code1"]), *change, k))


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
