"""Result files shared by the recommender example scripts."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterable, Sequence


def write_csv(path: Path, rows: Iterable[dict], keys: Sequence[str]) -> None:
    """One CSV row per dict (columns ``keys``); floats as ``.6g`` so reruns diff cleanly."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
