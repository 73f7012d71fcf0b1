"""Busy processes beside a benchmark: what a user's machine looks like with a data-loader worker or a
second job on one of its cores.

``with busy_processes(n):`` starts ``n`` processes that each spin on one core (pure Python loop, no
memory traffic to speak of) and stops them when the block ends. Each one also exits by itself after
``max_seconds`` and when its parent dies, so none outlives the benchmark even if it is killed.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from typing import Iterator, List

# The child: spins until its deadline or until its parent is gone (re-parented processes see a new
# parent id), checking the clock only every ~1e5 iterations.
_SPIN = """
import os, sys, time
parent, deadline = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])
x = 0
while True:
    for _ in range(100000):
        x += 1
    if time.monotonic() > deadline or os.getppid() != parent:
        break
"""


@contextlib.contextmanager
def busy_processes(n: int, max_seconds: float = 1800.0) -> Iterator[List[subprocess.Popen]]:
    """Runs ``n`` spinning processes for the duration of the block (``n = 0``: none)."""
    procs: List[subprocess.Popen] = []
    try:
        for _ in range(max(0, n)):
            procs.append(subprocess.Popen([sys.executable, "-c", _SPIN, str(os.getpid()), str(max_seconds)],
                                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
        if procs:
            time.sleep(0.5)  # let them start spinning before anything is timed
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
