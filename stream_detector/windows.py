"""Per-key sliding windows: the last W feature rows of every key, in preallocated numpy rings.

Count-based windows (the last W events, whatever their spacing) rather than Faust's time-bucketed
tables: a model sees a fixed-shape window, and a key's memory is fixed at W x F floats plus a small
profile state vector. Memory is bounded two ways, both counted: at most ``max_keys`` live keys (the
least recently seen is evicted to make room) and an idle TTL.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import numpy as np

EVICTED_CAPACITY = "capacity"
EVICTED_IDLE = "idle"


class WindowStore:
    """Ring buffers of shape (keys, window, features), grown by doubling up to ``max_keys``."""

    def __init__(
        self,
        window: int,
        n_features: int,
        state_size: int = 0,
        max_keys: int = 100_000,
        ttl_s: float = float("inf"),
        initial_capacity: int = 1024,
        on_evict: Callable[[str, int], None] | None = None,
    ):
        if window < 1 or n_features < 1 or max_keys < 1:
            raise ValueError("window, n_features and max_keys must be positive")
        self.window = window
        self.n_features = n_features
        self.state_size = state_size
        self.max_keys = max_keys
        self.ttl_s = ttl_s
        self.on_evict = on_evict
        self._slots: OrderedDict[str, int] = OrderedDict()  # least recently seen first
        self._free: list[int] = []
        self._capacity = 0
        self._data = np.zeros((0, window, n_features), dtype=np.float32)
        self._count = np.zeros(0, dtype=np.int64)
        self._state = np.zeros((0, state_size), dtype=np.float64)
        self._last_seen = np.zeros(0, dtype=np.float64)
        self._grow(min(initial_capacity, max_keys))

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, key: str) -> bool:
        return key in self._slots

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def bytes_per_key(self) -> int:
        """Array bytes one key costs (window data + count + state + last seen)."""
        return self.window * self.n_features * 4 + 8 + self.state_size * 8 + 8

    def slot(self, key: str, now: float) -> int:
        """The key's slot, allocating (and evicting if full) for a new key."""
        slot = self._slots.get(key)
        if slot is not None:
            self._slots.move_to_end(key)
        else:
            slot = self._allocate(key)
        self._last_seen[slot] = now
        return slot

    def state(self, slot: int) -> np.ndarray:
        return self._state[slot]

    def next_row(self, slot: int) -> np.ndarray:
        """The row the next event of this key is written into (a view); call :meth:`commit` after."""
        return self._data[slot, self._count[slot] % self.window]

    def commit(self, slot: int) -> int:
        """Marks the row from :meth:`next_row` as written; returns the key's event count."""
        self._count[slot] += 1
        return int(self._count[slot])

    def push(self, slot: int, row: np.ndarray) -> int:
        self.next_row(slot)[:] = row
        return self.commit(slot)

    def count(self, slot: int) -> int:
        return int(self._count[slot])

    def is_full(self, slot: int) -> bool:
        return self._count[slot] >= self.window

    def copy_window(self, slot: int, out: np.ndarray) -> None:
        """Writes the key's last W rows, oldest first, into ``out`` (shape W x F)."""
        count = int(self._count[slot])
        w = self.window
        if count < w:
            raise ValueError(f"window not full: {count} of {w} events")
        pos = count % w
        data = self._data[slot]
        out[: w - pos] = data[pos:]
        out[w - pos :] = data[:pos]

    def evict_idle(self, now: float) -> int:
        """Drops keys idle longer than the TTL; cheap because keys are kept in recency order."""
        evicted = 0
        limit = now - self.ttl_s
        while self._slots:
            key, slot = next(iter(self._slots.items()))
            if self._last_seen[slot] > limit:
                break
            self._release(key, EVICTED_IDLE)
            evicted += 1
        return evicted

    def _allocate(self, key: str) -> int:
        if len(self._slots) >= self.max_keys:
            oldest = next(iter(self._slots))
            self._release(oldest, EVICTED_CAPACITY)
        if not self._free:
            self._grow(min(max(self._capacity * 2, 1), self.max_keys))
        slot = self._free.pop()
        self._count[slot] = 0
        self._state[slot] = 0.0
        self._slots[key] = slot
        return slot

    def _release(self, key: str, reason: str) -> None:
        slot = self._slots.pop(key)
        self._free.append(slot)
        if self.on_evict is not None:
            self.on_evict(reason, 1)

    def _grow(self, capacity: int) -> None:
        if capacity <= self._capacity:
            return
        old = self._capacity
        self._data = _resized(self._data, capacity)
        self._count = _resized(self._count, capacity)
        self._state = _resized(self._state, capacity)
        self._last_seen = _resized(self._last_seen, capacity)
        # Lowest slots are handed out first, which keeps hot data together.
        self._free.extend(range(capacity - 1, old - 1, -1))
        self._capacity = capacity


def _resized(array: np.ndarray, rows: int) -> np.ndarray:
    out = np.zeros((rows,) + array.shape[1:], dtype=array.dtype)
    out[: len(array)] = array
    return out
