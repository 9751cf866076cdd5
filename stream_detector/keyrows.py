"""Per-key state in preallocated rows, judged a micro-batch at a time in event order per key."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np


def rows_and_occurrences(keys: Sequence[str], rows: Mapping[str, int], allocate: Callable[[str], int]
                         ) -> tuple[np.ndarray, np.ndarray, bool]:
    """Each window's state row (allocated for a new key) and which occurrence of its key in the batch
    it is (0 for a key's first window); and whether every key occurs once. Round r of a batch, the
    windows of occurrence r, holds each key at most once, so vectorised updates within a round never
    collide and rounds in order keep each key's windows in event order."""
    n = len(keys)
    out_rows = np.empty(n, dtype=np.int64)
    occurrence = np.empty(n, dtype=np.int64)
    seen: dict[int, int] = {}
    get = rows.get
    for i, key in enumerate(keys):
        row = get(key)
        if row is None:
            row = allocate(key)
        out_rows[i] = row
        k = seen.get(row, 0)
        occurrence[i] = k
        seen[row] = k + 1
    return out_rows, occurrence, len(seen) == n
