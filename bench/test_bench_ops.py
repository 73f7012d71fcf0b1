"""pytest-benchmark microbenchmarks of imi_softmax against its peers.

    pytest bench/ --benchmark-only                      # N = 100k (a few minutes on 2 cores)
    IMI_BENCH_N=1000000 pytest bench/ --benchmark-only  # bigger catalogue
    IMI_BENCH_ROUNDS=10 ...                             # more timed rounds per benchmark
    IMI_BENCH_THREADS=1 ...                             # torch.set_num_threads (shared machines)

Sizes: N = $IMI_BENCH_N (default 100,000), d = 128, B = 512, M = 256, K = 64, fp32.
Groups (compare within a group): ``step`` (forward+backward, sampling included, index refresh
excluded: IMI dense/sparse grad vs full softmax), ``sample`` (IMI MIDX vs the pure-PyTorch MIDX
port on the same index), ``log_prob`` (same pair, [B, M] ids), ``refresh`` (IMI ``refresh_index``
vs the port's torch k-means build), ``eval_logits`` (``head(x)`` vs ``F.linear``), ``topk``
(``head.topk`` vs ``F.linear(...).topk``). CUDA variants are skipped without a GPU; they call
``torch.cuda.synchronize()`` inside the timed function.
"""
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

imi_softmax = pytest.importorskip("imi_softmax")
from memory import build_step, make_inputs, sync  # noqa: E402
from peers import MIDXTorchSampler, zipf_counts  # noqa: E402

N = int(os.environ.get("IMI_BENCH_N", "100000"))
D, B, M, K = 128, 512, 256, 64
ROUNDS = int(os.environ.get("IMI_BENCH_ROUNDS", "5"))
if os.environ.get("IMI_BENCH_THREADS"):  # 1 on a shared, oversubscribed machine
    torch.set_num_threads(int(os.environ["IMI_BENCH_THREADS"]))

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]

_cache = {}


def _cached(key, make):
    if key not in _cache:
        _cache[key] = make()
    return _cache[key]


def _run(benchmark, fn, device, rounds=ROUNDS):
    def timed():
        out = fn()
        sync(device)
        return out

    return benchmark.pedantic(timed, rounds=rounds, warmup_rounds=1, iterations=1)


def _head(device):
    """An IMISoftmax with its index built (shared by the non-step benchmarks)."""
    def make():
        torch.manual_seed(0)
        head = imi_softmax.IMISoftmax(D, N, num_samples=M, num_codewords=K, refresh_every=0, device=device)
        head.refresh_index()
        x, y = make_inputs(N, D, B, device, torch.float32, zipf_counts(N))
        return head, x.detach(), y
    return _cached(("head", device), make)


def _port(device):
    head, _, _ = _head(device)
    return _cached(("port", device), lambda: MIDXTorchSampler.from_imi(head.sampler))


def _nobias_sampler(device):
    """IMI MIDXSampler on the same weights without bias: the exact proposal the port computes."""
    head, _, _ = _head(device)
    return _cached(("nobias", device),
                   lambda: imi_softmax.MIDXSampler(K, "rq").build(head.weight.detach()))


# -- training step ---------------------------------------------------------------------------------
@pytest.mark.benchmark(group="step")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["imi_dense", "imi_sparse", "full"])
def test_step(benchmark, method, device):
    benchmark.extra_info.update(N=N, d=D, B=B, M=M, K=K)
    _, step = _cached(("step", method, device), lambda: build_step(method, N, D, B, M, device, torch.float32, K))
    loss = _run(benchmark, step, device)
    assert torch.isfinite(loss)


# -- sampling --------------------------------------------------------------------------------------
@pytest.mark.benchmark(group="sample")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["imi_midx", "imi_midx_nobias", "midx_torch_port"])
def test_sample(benchmark, impl, device):
    benchmark.extra_info.update(N=N, d=D, B=B, M=M, K=K)
    head, x, _ = _head(device)
    sampler = {"imi_midx": lambda: head.sampler, "imi_midx_nobias": lambda: _nobias_sampler(device),
               "midx_torch_port": lambda: _port(device)}[impl]()
    ids, log_q = _run(benchmark, lambda: sampler.sample(x, M), device)
    assert ids.shape == (B, M) and log_q.shape == (B, M)


@pytest.mark.benchmark(group="log_prob")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["imi_midx", "midx_torch_port"])
def test_log_prob(benchmark, impl, device):
    benchmark.extra_info.update(N=N, d=D, B=B, M=M, K=K)
    head, x, _ = _head(device)
    ids = torch.randint(0, N, (B, M), device=device, generator=None)
    sampler = head.sampler if impl == "imi_midx" else _port(device)
    lp = _run(benchmark, lambda: sampler.log_prob(x, ids), device)
    assert lp.shape == ids.shape


# -- index refresh ---------------------------------------------------------------------------------
@pytest.mark.benchmark(group="refresh")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["imi_refresh_index", "midx_torch_port_build"])
def test_refresh(benchmark, impl, device):
    benchmark.extra_info.update(N=N, d=D, K=K)
    head, _, _ = _head(device)
    if impl == "imi_refresh_index":
        fn = head.refresh_index
    else:
        port = MIDXTorchSampler(K, "rq", kmeans_iters=head.sampler.kmeans_iters)
        fn = lambda: port.build(head.weight)  # noqa: E731
    _run(benchmark, fn, device, rounds=max(2, ROUNDS // 2))


# -- evaluation ------------------------------------------------------------------------------------
@pytest.mark.benchmark(group="eval_logits")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["imi_head", "F.linear"])
def test_eval_logits(benchmark, impl, device):
    benchmark.extra_info.update(N=N, d=D, B=B)
    head, x, _ = _head(device)
    fn = (lambda: head(x)) if impl == "imi_head" else (lambda: F.linear(x, head.weight, head.bias))
    with torch.no_grad():
        out = _run(benchmark, fn, device)
    assert out.shape == (B, N)


@pytest.mark.benchmark(group="topk")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["imi_topk", "linear_then_topk"])
def test_topk(benchmark, impl, device):
    benchmark.extra_info.update(N=N, d=D, B=B, k=100)
    head, x, _ = _head(device)
    if impl == "imi_topk":
        fn = lambda: head.topk(x, 100)  # noqa: E731
    else:
        fn = lambda: F.linear(x, head.weight, head.bias).topk(100, dim=-1)  # noqa: E731
    with torch.no_grad():
        v, i = _run(benchmark, fn, device)
    assert v.shape == (B, 100)
