"""The busy benchmark's verdict statistic (bench/core_targets.py: median_interval): the interval of
order statistics it returns covers the median with at least the level asked for, and is the
narrowest such pair, checked against exact binomial sums."""
import math
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from core_targets import median_interval  # noqa: E402


def coverage(n: int, k: int) -> float:
    """P(x_(k) <= median < x_(n+1-k)) for n draws of a continuous law: P(k <= Binomial(n, 1/2) <= n - k)."""
    return sum(math.comb(n, j) for j in range(k, n - k + 1)) / 2 ** n


@pytest.mark.parametrize("n", [6, 9, 15, 30])
def test_interval_is_the_narrowest_that_covers(n):
    values = random.Random(n).sample(range(1000), n)
    xs = sorted(values)
    med, lo, hi = median_interval(values, level=0.95)
    assert med == pytest.approx((xs[(n - 1) // 2] + xs[n // 2]) / 2)
    k = xs.index(lo) + 1
    assert hi == xs[n - k]
    assert coverage(n, k) >= 0.95
    assert coverage(n, k + 1) < 0.95


def test_too_few_rounds_give_an_unbounded_interval():
    # 5 rounds: even the extremes cover the median with probability 1 - 2/32 = 0.9375 < 0.95
    med, lo, hi = median_interval([3.0, 1.0, 2.0, 5.0, 4.0])
    assert med == 3.0 and lo == -math.inf and hi == math.inf
