"""Bad input raises a clear Python error naming the argument, before any kernel runs."""
import pytest
import torch

import imi_softmax.functional as IF
from imi_softmax import IMISoftmax, MIDXSampler, UniformSampler, UnigramSampler


@pytest.fixture
def head():
    torch.manual_seed(0)
    return IMISoftmax(8, 50, num_samples=4, num_codewords=4)


@pytest.mark.parametrize(
    "kwargs, exc, word",
    [
        (dict(num_samples=-1), ValueError, "num_samples"),
        (dict(num_codewords=0), ValueError, "num_codewords"),
        (dict(num_samples=2.5), TypeError, "num_samples"),
        (dict(sampler="bogus"), ValueError, "sampler"),
        (dict(quantizer="xq"), ValueError, "quantizer"),
        (dict(sampler="unigram"), ValueError, "class_counts"),
        (dict(refresh_every=-1), ValueError, "refresh_every"),
    ],
)
def test_bad_constructor_arguments(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        IMISoftmax(8, 50, **kwargs)


def test_pq_needs_even_features():
    with pytest.raises(ValueError, match="even"):
        IMISoftmax(7, 50, quantizer="pq")
    with pytest.raises(ValueError, match="even"):
        MIDXSampler(4, "pq").build(torch.randn(10, 7))


def test_bad_forward_inputs(head):
    y = torch.randint(0, 50, (3,))
    with pytest.raises(ValueError, match=r"x must be \[\*, 8\]"):
        head(torch.randn(3, 7), y)
    with pytest.raises(TypeError, match="dtype"):
        head(torch.randn(3, 8, dtype=torch.float64), y)
    with pytest.raises(TypeError, match="x must"):
        head(torch.randint(0, 3, (3, 8)), y)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        head([[0.0] * 8], y)
    with pytest.raises(ValueError, match="target must have shape"):
        head(torch.randn(3, 8), torch.randint(0, 50, (4,)))
    with pytest.raises(TypeError, match="int64"):
        head(torch.randn(3, 8), y.to(torch.int32))
    with pytest.raises(IndexError, match="50"):
        head(torch.randn(3, 8), torch.tensor([1, 50, 2]))
    with pytest.raises(IndexError, match="-3"):
        head(torch.randn(3, 8), torch.tensor([1, -3, 2]))
    with pytest.raises(ValueError, match="NaN"):
        head(torch.randn(3, 8).index_fill_(0, torch.tensor([1]), float("nan")), y)
    assert torch.isfinite(head(torch.randn(3, 8), torch.tensor([1, -100, 2])))


def test_bad_functional_inputs():
    x, w, b = torch.randn(3, 4), torch.randn(10, 4), torch.randn(10)
    t, ids, lq, tlq = torch.tensor([1, 2, 3]), torch.randint(0, 10, (3, 5)), torch.zeros(3, 5), torch.zeros(3)
    with pytest.raises(IndexError, match="sample_ids"):
        IF.sampled_softmax_loss(x, w, b, t, ids.clone().fill_(10), lq, tlq)
    with pytest.raises(ValueError, match="sample_log_q"):
        IF.sampled_softmax_loss(x, w, b, t, ids, torch.zeros(3, 4), tlq)
    with pytest.raises(ValueError, match="bias"):
        IF.sampled_softmax_loss(x, w, torch.randn(9), t, ids, lq, tlq)
    with pytest.raises(ValueError, match="reduction"):
        IF.sampled_softmax_loss(x, w, b, t, ids, lq, tlq, reduction="avg")
    with pytest.raises(ValueError, match="device"):
        IF.sampled_softmax_loss(x, w, b, t, ids, lq, tlq.to("meta"))


def test_bad_sampler_inputs():
    s = MIDXSampler(4).build(torch.randn(20, 6))
    with pytest.raises(ValueError, match="num_samples"):
        s.sample(torch.randn(2, 6), -1)
    with pytest.raises(ValueError, match=r"query must be \[B, 6\]"):
        s.sample(torch.randn(2, 5), 3)
    with pytest.raises(IndexError, match="ids"):
        s.log_prob(torch.randn(2, 6), torch.tensor([[0, 20]]).expand(2, 2))
    with pytest.raises(ValueError, match="NaN"):
        MIDXSampler(4).build(torch.full((5, 3), float("nan")))
    with pytest.raises(RuntimeError, match="build"):
        MIDXSampler(4).sample(torch.randn(2, 6), 3)
    with pytest.raises(ValueError, match="num_codewords"):
        MIDXSampler(0)
    with pytest.raises(ValueError, match="num_classes"):
        UniformSampler(0)
    with pytest.raises(ValueError, match="non-negative"):
        UnigramSampler(torch.tensor([1.0, -1.0]))


def test_direct_op_calls_are_checked():
    from imi_softmax import ops
    with pytest.raises(RuntimeError, match="out of range"):
        ops.build_cells(torch.tensor([0, 5], dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32), None, 4)
    with pytest.raises(RuntimeError, match="num_classes"):
        ops.dense_weight_grad(torch.ones(1, 2), torch.tensor([[0, 9]]), torch.ones(1, 3), 5)
    for op in (ops.dense_weight_grad, ops.sparse_weight_grad):
        with pytest.raises(RuntimeError, match="num_classes must be >= 0, got -1"):
            op(torch.ones(1, 2), torch.tensor([[0, 1]]), torch.ones(1, 3), -1)
        with pytest.raises(RuntimeError, match="coef dtype must be the accumulation dtype"):
            op(torch.ones(1, 2, dtype=torch.float64), torch.tensor([[0, 1]]), torch.ones(1, 3), 5)


def test_sampler_names_a_non_finite_query():
    """The query's finiteness is checked from its scores (one check for both codebooks): a NaN or Inf
    query still gets an error naming the query, before any draw."""
    s = MIDXSampler(4).build(torch.randn(60, 8, generator=torch.Generator().manual_seed(0)))
    for bad in (float("nan"), float("inf")):
        q = torch.randn(3, 8)
        q[1, 5] = bad
        with pytest.raises(ValueError, match="query contains NaN or Inf"):
            s.sample(q, 4)
        with pytest.raises(ValueError, match="query contains NaN or Inf"):
            s.log_prob(q, torch.zeros(3, 2, dtype=torch.long))
        with pytest.raises(ValueError, match="query contains NaN or Inf"):
            s.sample_with_targets(q, 4, torch.zeros(3, 1, dtype=torch.long))
    # finite query, overflowing scores: named as the overflow, on the op's check too
    with pytest.raises(ValueError, match="scores.*overflows float32"):
        s.sample(torch.full((2, 8), 3e38), 4)
    with pytest.raises(ValueError, match="scores.*overflows float32"):
        s.log_prob(torch.full((2, 8), 3e38), torch.zeros(2, 1, dtype=torch.long))


# ---- found by fuzzing the public API with plausible user mistakes -----------------------------------

@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(dtype=torch.int64), TypeError, r"dtype must be a floating dtype .*got torch.int64"),
        (dict(ignore_index=None), TypeError, r"ignore_index must be an int .*got NoneType"),
        (dict(ignore_index=1.5), TypeError, r"ignore_index must be an int .*got float \(1.5\)"),
        (dict(ignore_index=True), TypeError, r"ignore_index must be an int .*got bool"),
        (dict(num_codewords=10 ** 6), ValueError, r"num_codewords must be <= 8192.*got 1000000"),
        (dict(sampler="unigram", class_counts=[1.0] * 50), TypeError, "class_counts must be a torch.Tensor, got list"),
    ],
)
def test_fuzzed_constructor_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        IMISoftmax(8, 50, num_samples=4, **kwargs)


def test_sizes_computed_from_data_are_accepted_as_ints():
    """num_classes = labels.max() + 1 is a numpy integer or a 0-d tensor: accepted as nn.Linear does,
    and stored as a Python int; bools, bool tensors and floats are still refused."""
    import numpy as np
    head = IMISoftmax(np.int64(8), torch.tensor(50), num_samples=np.int32(4), num_codewords=np.int64(4))
    assert (head.in_features, head.num_classes, head.num_samples) == (8, 50, 4)
    assert all(type(v) is int for v in (head.in_features, head.num_classes, head.num_samples))
    x, y = torch.randn(6, 8), torch.randint(0, 50, (6,))
    assert torch.isfinite(head(x, y))
    ids, log_q = head.sampler.sample(x, np.int64(3))
    assert ids.shape == log_q.shape == (6, 3)
    scores, top = head.topk(x, np.int64(5))
    assert top.shape == (6, 5)
    for bad, kind in ((True, "bool"), (torch.tensor(True), "Tensor"), (50.0, "float"), (np.float64(50), "float64")):
        with pytest.raises(TypeError, match=rf"num_classes must be an int, got {kind}"):
            IMISoftmax(8, bad)


def test_settings_are_checked_when_assigned_after_construction(head):
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        head.ignore_index = None
    with pytest.raises(ValueError, match="refresh_every must be >= 0, got -1"):
        head.refresh_every = -1
    head.ignore_index, head.refresh_every = 7, 0  # valid values still assign
    assert (head.ignore_index, head.refresh_every) == (7, 0)


def test_head_refuses_a_sampler_without_full_support():
    from imi_softmax import TopCellsSampler
    with pytest.raises(ValueError, match="TopCellsSampler gives most classes probability 0.*MixtureSampler"):
        IMISoftmax(8, 50, sampler=TopCellsSampler(MIDXSampler(4), budget=5))


def test_python_list_target_names_the_conversion(head):
    x = torch.randn(3, 8)
    for target in ([1, 2, 3], [1, 2]):
        with pytest.raises(TypeError, match=r"target must be an int64 tensor.*got a list of int.*torch.tensor"):
            head(x, target)


def test_generator_must_be_a_generator(head):
    x, y = torch.randn(3, 8), torch.tensor([1, 2, 3])
    with pytest.raises(TypeError, match=r"generator must be a torch.Generator or None, got int \(0\)"):
        head.sampled_logits(x, y, generator=0)
    s = MIDXSampler(4).build(torch.randn(20, 8))
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        s.sample(x, 3, generator=1)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        UniformSampler(20).sample(x, 3, generator="seed")


def test_functional_refuses_a_bool_ignore_index():
    """ignore_index=True is the int 1: it would silently drop every row whose target is class 1."""
    x, w = torch.randn(3, 4), torch.randn(10, 4)
    t, ids, lq, tlq = torch.tensor([1, 2, 3]), torch.randint(0, 10, (3, 5)), torch.zeros(3, 5), torch.zeros(3)
    for bad in (True, False):
        with pytest.raises(TypeError, match="ignore_index must be an int .*got bool"):
            IF.sampled_softmax_loss(x, w, None, t, ids, lq, tlq, ignore_index=bad)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_functional_losses_refuse_log_q_that_is_not_finite(bad):
    """+inf log Q silently drops its column (corrected logit -inf), -inf (a class the proposal cannot
    draw) and NaN make the loss NaN: the functional losses refuse them, naming the argument and the
    position; an ignored row's or a pad's target log Q is not read, and a constant offset (an
    unnormalized proposal) leaves the loss unchanged."""
    from imi_softmax.multilabel import multilabel_sampled_softmax_loss
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 4, generator=g), torch.randn(10, 4, generator=g)
    t, ids = torch.tensor([1, -100, 3]), torch.randint(0, 10, (3, 5), generator=g)
    lq, tlq = torch.full((3, 5), -2.3), torch.full((3,), -2.3)
    ref = IF.sampled_softmax_loss(x, w, None, t, ids, lq, tlq)
    torch.testing.assert_close(IF.sampled_softmax_loss(x, w, None, t, ids, lq + 7.0, tlq + 7.0), ref)
    ignored = tlq.clone()
    ignored[1] = bad  # row 1 is ignored: its target log Q is never read
    torch.testing.assert_close(IF.sampled_softmax_loss(x, w, None, t, ids, lq, ignored), ref)
    bad_lq, bad_tlq = lq.clone(), tlq.clone()
    bad_lq[2, 4], bad_tlq[2] = bad, bad
    why = "probability 0" if bad == float("-inf") else "not a log-probability"
    with pytest.raises(ValueError, match=rf"sample_log_q must be finite, got {bad} at \(2, 4\): .*{why}"):
        IF.sampled_softmax_loss(x, w, None, t, ids, bad_lq, tlq)
    with pytest.raises(ValueError, match=rf"target_log_q must be finite, got {bad} at \(2,\)"):
        IF.sampled_softmax_loss(x, w, None, t, ids, lq, bad_tlq)
    labels = torch.tensor([[1, 2], [4, -100], [3, 5]])
    mtlq = torch.full((3, 2), -2.3)
    mref = multilabel_sampled_softmax_loss(x, w, None, labels, ids, lq, mtlq)
    pad = mtlq.clone()
    pad[1, 1] = bad  # a pad: not read
    torch.testing.assert_close(multilabel_sampled_softmax_loss(x, w, None, labels, ids, lq, pad), mref)
    mbad = mtlq.clone()
    mbad[2, 0] = bad
    with pytest.raises(ValueError, match=rf"target_log_q must be finite, got {bad} at \(2, 0\)"):
        multilabel_sampled_softmax_loss(x, w, None, labels, ids, lq, mbad)
    with pytest.raises(ValueError, match=rf"sample_log_q must be finite, got {bad} at \(2, 4\)"):
        multilabel_sampled_softmax_loss(x, w, None, labels, ids, bad_lq, mtlq)


def test_every_head_and_loss_refuses_a_bool_ignore_index():
    """One check (check_ignore_index) for the multi-label loss and the sharded head too."""
    from imi_softmax import ShardedIMISoftmax
    from imi_softmax.multilabel import multilabel_sampled_softmax_loss
    x, w = torch.randn(3, 4), torch.randn(10, 4)
    labels, ids, lq = torch.tensor([[1, 2], [3, -100], [4, 5]]), torch.randint(0, 10, (3, 5)), torch.zeros(3, 5)
    with pytest.raises(TypeError, match=r"ignore_index must be an int .*got bool \(True\)"):
        multilabel_sampled_softmax_loss(x, w, None, labels, ids, lq, torch.zeros(3, 2), ignore_index=True)
    with pytest.raises(TypeError, match=r"ignore_index must be an int .*got float"):
        ShardedIMISoftmax(4, 10, ignore_index=-100.0)


def test_midx_refuses_non_float_weight_bias_and_query():
    with pytest.raises(TypeError, match=r"weight must have dtype in .*got torch.int64"):
        MIDXSampler(4).build(torch.randint(0, 5, (20, 8)))
    with pytest.raises(TypeError, match=r"bias must have dtype in .*got torch.int64"):
        MIDXSampler(4).build(torch.randn(20, 8), torch.zeros(20, dtype=torch.long))
    s = MIDXSampler(4).build(torch.randn(20, 8))
    with pytest.raises(TypeError, match=r"query must have dtype in .*got torch.int64"):
        s.sample(torch.randint(0, 3, (2, 8)), 3)


def test_midx_empty_batch_with_huge_num_samples_returns_at_once():
    """B = 0 draws nothing: it used to size the op's per-thread scratch by num_samples (minutes for 2^31)."""
    s = MIDXSampler(4).build(torch.randn(20, 8))
    ids, log_q, tlq = s.sample_with_targets(torch.randn(0, 8), 2 ** 31 + 5, torch.zeros(0, 2, dtype=torch.long))
    assert ids.shape == log_q.shape == (0, 2 ** 31 + 5) and tlq.shape == (0, 2)
    assert ids.dtype == torch.int64 and log_q.dtype == tlq.dtype == torch.float32


def test_midx_load_state_dict_names_a_foreign_state():
    with pytest.raises(ValueError, match=r"not written by MIDXSampler.state_dict\(\).*another sampler"):
        MIDXSampler(4).load_state_dict({})


def test_extra_state_of_another_shape_is_refused():
    torch.manual_seed(0)
    x, y = torch.randn(4, 8), torch.randint(0, 50, (4,))
    for other in (dict(in_features=8, num_classes=30), dict(in_features=6, num_classes=50)):
        src = IMISoftmax(8, 50, num_samples=4, num_codewords=4, full_refresh_every=0)
        src(x, y)
        sd = {"_extra_state": src.state_dict()["_extra_state"]}
        dst = IMISoftmax(other["in_features"], other["num_classes"], num_samples=4, num_codewords=4,
                         full_refresh_every=0)
        with pytest.raises(ValueError, match=r"index was built for \[50, 8\].*this head is \["):
            dst.load_state_dict(sd, strict=False)


def test_exact_sampler_checks_its_inputs():
    from imi_softmax import ExactSampler
    s = ExactSampler().build(torch.randn(10, 8))
    with pytest.raises(ValueError, match=r"query must be \[B, 8\].*got \(5, 7\)"):
        s.sample(torch.randn(5, 7), 3)
    with pytest.raises(ValueError, match=r"query must be \[B, 8\]"):
        s.log_prob(torch.randn(5, 7), torch.zeros(5, 1, dtype=torch.long))
    q = torch.randn(5, 8)
    q[0, 0] = float("nan")
    with pytest.raises(ValueError, match="softmax of query @ weight.T \\+ bias holds NaN"):
        s.sample(q, 3)
    with pytest.raises(ValueError, match=r"bias must be \[10\]"):
        ExactSampler().build(torch.randn(10, 8), torch.randn(9))
    masked = torch.zeros(10)
    masked[3] = float("-inf")  # a -inf bias masks a class: still a valid proposal
    ids, _ = ExactSampler().build(torch.randn(10, 8), masked).sample(torch.randn(5, 8), 40)
    assert not bool((ids == 3).any())


@pytest.mark.parametrize("flag", ["bias", "remove_accidental_hits", "sparse_grad"])
@pytest.mark.parametrize("bad", ["False", "no", "", None, 0.5, 0, 1, [True]])
def test_flags_refuse_values_that_are_not_plain_booleans(flag, bad):
    """bias='False' (from a config file or the command line) is truthy: it would silently turn the
    option on. A flag takes a bool (numpy's too) or a one-element bool tensor, as copy_vectors did."""
    with pytest.raises(TypeError, match=rf"{flag} must be a bool \(True or False\), got {type(bad).__name__}"):
        IMISoftmax(8, 50, num_samples=4, **{flag: bad})


def test_flags_accept_bools_of_every_kind():
    import numpy as np
    for off in (False, np.False_, torch.tensor(False)):
        head = IMISoftmax(8, 50, num_samples=4, bias=off, remove_accidental_hits=off, sparse_grad=off)
        assert head.bias is None and head.remove_accidental_hits is False and head.sparse_grad is False
    for on in (True, np.True_, torch.tensor([True])):
        head = IMISoftmax(8, 50, num_samples=4, bias=on, remove_accidental_hits=on, sparse_grad=on)
        assert head.bias is not None and head.remove_accidental_hits is True and head.sparse_grad is True


def test_every_loss_sampler_and_head_refuses_a_string_flag():
    from imi_softmax import ShardedIMISoftmax
    from imi_softmax.data import ClusteredBatchSampler
    from imi_softmax.multilabel import multilabel_sampled_softmax_loss
    x, w = torch.randn(3, 4), torch.randn(10, 4)
    y, ids, lq = torch.tensor([1, 2, 3]), torch.randint(0, 10, (3, 5)), torch.zeros(3, 5)
    for flag in ("remove_accidental_hits", "sparse_grad"):
        with pytest.raises(TypeError, match=rf"{flag} must be a bool .*got str \('False'\)"):
            IF.sampled_softmax_loss(x, w, None, y, ids, lq, torch.zeros(3), **{flag: "False"})
        with pytest.raises(TypeError, match=rf"{flag} must be a bool .*got str"):
            multilabel_sampled_softmax_loss(x, w, None, torch.tensor([[1, 2], [3, -100], [4, 5]]), ids, lq,
                                            torch.zeros(3, 2), **{flag: "False"})
        with pytest.raises(TypeError, match=rf"{flag} must be a bool .*got str"):
            ShardedIMISoftmax(4, 10, **{flag: "False"})
    with pytest.raises(TypeError, match=r"bias must be a bool .*got str"):
        ShardedIMISoftmax(4, 10, bias="False")
    with pytest.raises(TypeError, match=r"copy_vectors must be a bool .*got str"):
        MIDXSampler(4).build(torch.randn(20, 8), copy_vectors="False")
    with pytest.raises(TypeError, match=r"drop_last must be a bool .*got str"):
        ClusteredBatchSampler(torch.randn(20, 4), batch_size=4, drop_last="False")
