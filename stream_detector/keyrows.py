"""Per-key state in preallocated rows, judged a micro-batch at a time in event order per key."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np


class KeyRows:
    """Bookkeeping shared by per-key threshold policies: key -> row of preallocated arrays, a free
    list, and per row the count of windows learned; a key is calibrated once it reaches ``warmup``."""

    warmup: int
    _rows: dict[str, int]
    _free: list[int]
    _count: np.ndarray
    _calibrated: int

    def calibrated(self, key: str) -> bool:
        """Whether the key is judged by its own calibration yet (warm-up over)."""
        row = self._rows.get(key)
        return row is not None and int(self._count[row]) >= self.warmup

    @property
    def calibrated_keys(self) -> int:
        """Keys judged by their own calibration (warm-up over)."""
        return self._calibrated

    def evict(self, key: str) -> None:
        """Drops the key's state (its window was evicted); a returning key warms up again."""
        row = self._rows.pop(key, None)
        if row is not None:
            self._free.append(row)
            if self._count[row] >= self.warmup:
                self._calibrated -= 1
            self._count[row] = 0  # a free row counts as not calibrated

    def _allocate(self, key: str) -> int:
        raise NotImplementedError

    def _adopted_row(self, key: str) -> int:
        """The row a key's state taken over from a snapshot goes to: a new one, or its own, then no
        longer counted as calibrated (the caller counts it again from the adopted count)."""
        row = self._rows.get(key)
        if row is None:
            return self._allocate(key)
        if self._count[row] >= self.warmup:
            self._calibrated -= 1
        return row

    def restart_warmup(self, key: str) -> None:
        """Forgets the key's calibration (an operator said its new behaviour is expected): it warms up
        again, judged against the global threshold meanwhile."""
        self.evict(key)

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, key: str) -> bool:
        return key in self._rows


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
