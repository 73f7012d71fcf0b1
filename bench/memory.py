"""Measurement utilities shared by the benchmarks: peak memory of one training step, step timing,
and a description of the machine.

Peak memory (:func:`peak_step_memory`):

* CPU: torch's CPU allocator is invisible to ``tracemalloc``, so each measurement runs in a fresh
  subprocess. The child builds the head, inputs and index (everything touched), runs one warm-up
  step, frees the gradients, returns free memory to the OS (``malloc_trim``), resets the kernel's
  RSS high-water mark (``/proc/self/clear_refs`` = 5) and reads its RSS as the baseline; then it runs
  one training step (forward + backward; sampling included, index build excluded) and reports
  ``VmHWM - baseline``. ``MALLOC_MMAP_THRESHOLD_`` is fixed in the child so large buffers are
  mmapped and released eagerly; the number is the step's transient peak (activations, logits,
  gradient buffers), not the weights. If the high-water mark cannot be reset, the warm-up step is
  skipped and ``ru_maxrss`` is used instead (the JSON says which).
* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the memory
  allocated before the step, in-process.

Run as a script to measure one configuration:
``python bench/memory.py imi_sparse --N 1000000 --d 128 --B 512 --M 256``.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
if HERE not in sys.path:
    sys.path.insert(0, HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


# ------------------------------------------------------------------------------------------------
# machine / timing
# ------------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10)
        commit = out.stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"


def machine_info(device: str = "cpu") -> Dict[str, object]:
    info = {
        "hostname": platform.node(),
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") and torch.cuda.is_available() else "",
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    try:
        info["load_avg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    return info


def machine_tag(device: str = "cpu") -> str:
    """Short, file-name-safe name of the machine for result files."""
    if device.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
    else:
        name = f"{cpu_model()}-{os.cpu_count()}c"
    keep = "".join(ch if ch.isalnum() else "-" for ch in name)
    while "--" in keep:
        keep = keep.replace("--", "-")
    return keep.strip("-").lower()[:60]


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device: str = "cpu", warmup: int = 2, repeats: int = 5,
            max_seconds: Optional[float] = None) -> Dict[str, float]:
    """Median / min wall time (ms) of ``fn()`` over ``repeats`` runs after ``warmup`` runs (CUDA synced).
    ``max_seconds`` stops repeating early (at least 1 timed run) when a run is slow."""
    for _ in range(warmup):
        fn()
        sync(device)
    times = []
    start_all = time.perf_counter()
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
        if max_seconds is not None and time.perf_counter() - start_all > max_seconds:
            break
    return {"median_ms": statistics.median(times), "min_ms": min(times), "n": len(times)}


def time_interleaved(fns: Dict[str, Callable[[], object]], device: str = "cpu", warmup: int = 2,
                     repeats: int = 30) -> Dict[str, Dict[str, float]]:
    """Like :func:`time_fn` for several functions at once, run in turns (a, b, c, a, b, c, ...), so
    that a shared machine's slow and fast phases hit every contender alike and their ratio is
    steadier than with back-to-back blocks."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
            sync(device)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: {"median_ms": statistics.median(ts), "min_ms": min(ts), "n": len(ts)}
            for name, ts in times.items()}


# ------------------------------------------------------------------------------------------------
# one training step
# ------------------------------------------------------------------------------------------------
def make_inputs(N: int, d: int, B: int, device: str, dtype: torch.dtype, counts: Optional[torch.Tensor] = None,
                seed: int = 0):
    """x [B, d] (requires grad, as the output of an encoder), targets [B] drawn from ``counts`` (Zipf)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    if counts is None:
        y = torch.randint(0, N, (B,), generator=g)
    else:
        y = torch.multinomial(counts.to(torch.float32), B, replacement=True, generator=g)
    return x, y.to(device)


def add_step_shape_args(p: argparse.ArgumentParser) -> None:
    """--N --d --B --M --K with the acceptance benchmark's defaults (N = 1M, d = 128, B = 512, M = 256,
    K = 64): the step shape of the scripts that time build_step."""
    p.add_argument("--N", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--B", type=int, default=512)
    p.add_argument("--M", type=int, default=256)
    p.add_argument("--K", type=int, default=64)


def build_step(method: str, N: int, d: int, B: int, M: int, device: str = "cpu", dtype=torch.float32,
               K: int = 64, seed: int = 0):
    """(head, step_fn) for one method; step_fn() runs forward + backward (grads reset to None first).
    The head's index (if any) is built here, outside the step."""
    from peers import make_head, prepare_head, zipf_counts

    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    torch.manual_seed(seed)
    counts = zipf_counts(N)
    head = make_head(method, d, N, num_samples=M, num_codewords=K, counts=counts, device=device, dtype=dtype)
    head.train()
    prepare_head(head)
    x, y = make_inputs(N, d, B, device, dtype, counts, seed)
    params = [p for p in head.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.grad = None
        x.grad = None
        loss = head(x, y)
        loss.backward()
        return loss

    return head, step


# ------------------------------------------------------------------------------------------------
# peak memory
# ------------------------------------------------------------------------------------------------
def status_bytes(key: str) -> Optional[int]:
    """A size field of /proc/self/status (VmRSS, VmHWM, ...) in bytes; None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _read_status(key: str) -> int:
    value = status_bytes(key)
    if value is None:
        raise KeyError(key)
    return value


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:
        pass


def reset_peak_rss() -> bool:
    """Resets the kernel's peak RSS of this process (VmHWM) to the current RSS (Linux >= 4.0), so
    the peak of one phase can be read; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _child_measure(method: str, N: int, d: int, B: int, M: int, device: str, dtype: str, K: int) -> Dict:
    dt = DTYPES[dtype]
    head, step = build_step(method, N, d, B, M, device, dt, K)
    out = {"method": method, "N": N, "d": d, "B": B, "M": M, "K": K, "device": device, "dtype": dtype}
    if device.startswith("cuda"):
        step()
        for p in head.parameters():
            p.grad = None
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        out.update(peak_bytes=int(torch.cuda.max_memory_allocated() - base), baseline_bytes=int(base),
                   mode="cuda_max_memory_allocated")
        return out
    can_reset = reset_peak_rss()
    if can_reset:
        step()                              # warm-up: thread pools, lazy buffers, kernel caches
        for p in head.parameters():
            p.grad = None
        gc.collect()
        _malloc_trim()
        reset_peak_rss()
        base = _read_status("VmRSS")
        step()
        peak = _read_status("VmHWM")
        mode = "vmhwm_after_warmup"
    else:
        import resource

        gc.collect()
        _malloc_trim()
        base = _read_status("VmRSS")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        step()
        peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, before)
        mode = "ru_maxrss_no_warmup"
    out.update(peak_bytes=int(max(peak - base, 0)), baseline_bytes=int(base), mode=mode)
    return out


def peak_step_memory(method_name: str, N: int, d: int, B: int, M: int, device: str = "cpu",
                     dtype="fp32", K: int = 64, timeout: float = 1800.0, details: bool = False):
    """Peak extra memory (bytes) of one training step of ``method_name`` (see ``peers.METHODS``),
    measured in a fresh subprocess. ``details=True`` returns the child's JSON dict instead."""
    if isinstance(dtype, torch.dtype):
        dtype = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    env["PYTHONPATH"] = os.pathsep.join([HERE, ROOT, env.get("PYTHONPATH", "")])
    cmd = [sys.executable, os.path.abspath(__file__), method_name, "--N", str(N), "--d", str(d), "--B", str(B),
           "--M", str(M), "--K", str(K), "--device", device, "--dtype", dtype, "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result if details else result["peak_bytes"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("method")
    p.add_argument("--N", type=int, default=100_000)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--B", type=int, default=512)
    p.add_argument("--M", type=int, default=256)
    p.add_argument("--K", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--json", action="store_true", help="(child mode) measure in this process, print JSON")
    a = p.parse_args(argv)
    if a.json:
        print(json.dumps(_child_measure(a.method, a.N, a.d, a.B, a.M, a.device, a.dtype, a.K)))
    else:
        r = peak_step_memory(a.method, a.N, a.d, a.B, a.M, a.device, a.dtype, a.K, details=True)
        print(json.dumps(r, indent=1))
        print(f"{a.method}: peak step memory {r['peak_bytes'] / 2**20:.1f} MiB ({r['mode']})")


if __name__ == "__main__":
    main()
