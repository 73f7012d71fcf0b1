"""Exact resume: train -> save -> load into a fresh head -> continue == the uninterrupted run, bit
for bit on CPU; and a checkpoint moves between IMISoftmax and a plain nn.Linear."""
import io

import pytest
import torch
import torch.nn as nn

from imi_softmax import IMISoftmax

N, D, STEPS, SPLIT = 300, 16, 7, 3


def make_head(sampler, init_seed, bias=True):
    torch.manual_seed(init_seed)
    counts = torch.arange(N, dtype=torch.float32) if sampler == "unigram" else None
    # refresh_every=2: rebuilds fall before and after the checkpoint (calls 0, 2, 4, 6)
    return IMISoftmax(D, N, bias=bias, num_samples=24, num_codewords=4, refresh_every=2,
                      sampler=sampler, class_counts=counts, kmeans_iters=2).train()


def batches():
    g = torch.Generator().manual_seed(99)
    return [(torch.randn(32, D, generator=g), torch.randint(0, N, (32,), generator=g)) for _ in range(STEPS)]


def step(head, opt, x, y):
    opt.zero_grad()
    loss = head(x, y)
    loss.backward()
    opt.step()
    return loss.detach()


def save(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)  # everything saved is plain tensors and values


def run_and_resume(sampler, bias, strip_index=False):
    data = batches()
    head = make_head(sampler, 0, bias)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    torch.manual_seed(1234)  # the sampling RNG (the module draws from torch's default generator)
    full = [step(head, opt, x, y) for x, y in data]

    head = make_head(sampler, 0, bias)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    torch.manual_seed(1234)
    first = [step(head, opt, x, y) for x, y in data[:SPLIT]]
    state = head.state_dict()
    if strip_index:
        state = IMISoftmax.linear_state_dict(state)
    ckpt = save({"head": state, "opt": opt.state_dict(), "rng": torch.get_rng_state()})
    del head, opt

    fresh = make_head(sampler, 7, bias)  # different init: everything must come from the checkpoint
    opt = torch.optim.Adam(fresh.parameters(), lr=0.05)
    fresh.load_state_dict(ckpt["head"])
    opt.load_state_dict(ckpt["opt"])
    torch.set_rng_state(ckpt["rng"])
    rest = [step(fresh, opt, x, y) for x, y in data[SPLIT:]]
    return full, first + rest


@pytest.mark.parametrize("sampler, bias", [("midx", True), ("midx", False), ("unigram", True), ("exact", True)])
def test_resume_is_bit_exact(sampler, bias):
    full, resumed = run_and_resume(sampler, bias)
    for i, (a, b) in enumerate(zip(full, resumed)):
        assert torch.equal(a, b), f"step {i}: {a.item()!r} != {b.item()!r}"


def test_resume_without_the_index_state_would_differ():
    """The same run with the index state dropped (weights only) rebuilds a different index, so the
    bit-exact test above does pin the saved index and generator."""
    full, resumed = run_and_resume("midx", True, strip_index=True)
    assert all(torch.equal(a, b) for a, b in zip(full[:SPLIT], resumed[:SPLIT]))
    assert not torch.equal(torch.stack(full[SPLIT:]), torch.stack(resumed[SPLIT:]))


def test_extra_state_holds_index_generator_and_counter():
    head = make_head("midx", 0)
    head(torch.randn(4, D), torch.randint(0, N, (4,)))
    extra = head.state_dict()["_extra_state"]
    assert extra["training_calls"] == 1 and not extra["index_stale"]
    assert torch.equal(extra["sampler"]["index"]["offsets"], head.sampler.offsets)
    assert torch.equal(extra["sampler"]["generator"], head.sampler._generator.get_state())


class Model(nn.Module):
    def __init__(self, head):
        super().__init__()
        self.body = nn.Linear(D, D)
        self.head = head


def test_checkpoint_moves_between_head_and_plain_linear():
    torch.manual_seed(0)
    with_head = Model(make_head("midx", 0))
    with_head.head(torch.randn(4, D), torch.randint(0, N, (4,)))  # builds an index
    with_linear = Model(nn.Linear(D, N))
    x = torch.randn(5, D)

    # IMISoftmax -> nn.Linear: drop the index entry (strict), or strict=False
    with_linear.load_state_dict(IMISoftmax.linear_state_dict(with_head.state_dict()))
    torch.testing.assert_close(with_linear.head(x), with_head.head(x), rtol=0, atol=0)
    result = Model(nn.Linear(D, N)).load_state_dict(with_head.state_dict(), strict=False)
    assert result.unexpected_keys == ["head._extra_state"] and not result.missing_keys

    # nn.Linear -> IMISoftmax: loads strictly; the index is rebuilt from the loaded weights
    with torch.no_grad():
        with_linear.head.weight.mul_(2)
    with_head.load_state_dict(with_linear.state_dict())
    assert with_head.head._index_stale
    torch.testing.assert_close(with_head.head(x), with_linear.head(x), rtol=0, atol=0)
    assert torch.isfinite(with_head.head(x, torch.randint(0, N, (5,))))
    assert not with_head.head._index_stale


def test_extra_state_from_another_configuration_is_refused():
    a = make_head("midx", 0)
    a.refresh_index()
    b = IMISoftmax(D, N, num_samples=24, num_codewords=8)
    with pytest.raises(ValueError, match="num_codewords"):
        b.load_state_dict(a.state_dict())


def test_a_head_pickled_with_plain_setting_attributes_still_loads():
    """Heads pickled whole before refresh_every / ignore_index became checked properties hold them
    as plain attributes: unpickling moves them behind the properties."""
    import imi_softmax
    head = imi_softmax.IMISoftmax(8, 50, num_samples=5, refresh_every=7, ignore_index=-5)
    state = dict(head.__dict__)
    state["refresh_every"] = state.pop("_refresh_every")
    state["ignore_index"] = state.pop("_ignore_index")
    old = imi_softmax.IMISoftmax.__new__(imi_softmax.IMISoftmax)
    old.__setstate__(state)
    assert (old.refresh_every, old.ignore_index) == (7, -5)
    assert "refresh_every" not in old.__dict__ and "ignore_index" not in old.__dict__
    x, t = torch.randn(4, 8), torch.tensor([1, -5, 3, 4])
    head.eval(), old.eval()
    torch.testing.assert_close(old(x, t), head(x, t))
