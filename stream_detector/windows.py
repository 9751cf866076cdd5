"""Per-key sliding windows: the last W feature rows of every key, in preallocated numpy rings.

Count-based windows (the last W events, whatever their spacing) rather than Faust's time-bucketed
tables: a model sees a fixed-shape window, and a key's memory is fixed at W x F floats plus a small
profile state vector. Memory is bounded two ways, both counted: at most ``max_keys`` live keys (the
least recently seen is evicted to make room) and an idle TTL.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from typing import Callable

import numpy as np

EVICTED_CAPACITY = "capacity"
EVICTED_IDLE = "idle"
DROPPED_REVOKED = "revoked"  # reason given to drop listeners for keys of revoked partitions
GAP_SMOOTHING = 1.0 / 8  # weight of the newest gap in a key's rate: about its last 8 events

# Snapshot of one key: header, then the window oldest-first (float32), then the profile state, then
# (version 2) whatever else the owner keeps per key (its alert and threshold state), opaque here.
_SNAPSHOT_HEADER = struct.Struct("<BHHHqiq")  # version, W, F, S, count, partition, offset
# Version 3 (written only for a key that took events from the repartition topic): the offset of
# its last event read from there follows the input offset, then how many input partitions its
# forwarded events came from, and per such partition the input offset of the last one taken
# (``_ORIGIN`` pairs): a duplicate forward (the same input record forwarded again after a crash,
# at a new offset of the repartition topic) is recognised by it.
_SNAPSHOT_HEADER_V3 = struct.Struct("<BHHHqiqqH")
_ORIGIN = struct.Struct("<iq")
_SNAPSHOT_VERSION = 2
_SNAPSHOT_VERSIONS = (1, 2, 3)  # version 1: no trailing bytes


class SnapshotError(ValueError):
    """A key snapshot that does not fit this store (other window, features or format)."""


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
        on_evict_key: Callable[[str, int], None] | None = None,
    ):
        if window < 1 or n_features < 1 or max_keys < 1:
            raise ValueError("window, n_features and max_keys must be positive")
        self.window = window
        self.n_features = n_features
        self.state_size = state_size
        self.max_keys = max_keys
        self.ttl_s = ttl_s
        self.on_evict = on_evict
        self.on_evict_key = on_evict_key  # (key, slot) of each evicted key, before the slot is reused
        # (key, reason) of every key whose window is dropped (evicted, or its partition revoked), so
        # per-key state held elsewhere (thresholds, incidents) goes with it.
        self.drop_listeners: list[Callable[[str, str], None]] = []
        self._slots: OrderedDict[str, int] = OrderedDict()  # least recently seen first
        self._free: list[int] = []
        self._capacity = 0
        self._data = np.zeros((0, window, n_features), dtype=np.float32)
        self._count = np.zeros(0, dtype=np.int64)
        self._state = np.zeros((0, state_size), dtype=np.float64)
        self._last_seen = np.zeros(0, dtype=np.float64)
        # Source position of the last event applied to each key: replayed events are recognised.
        self._partition = np.zeros(0, dtype=np.int32)
        self._offset = np.zeros(0, dtype=np.int64)
        # Offset of the last event taken from the repartition topic (same partition number), -1 if none.
        self._roffset = np.zeros(0, dtype=np.int64)
        # Per key with forwarded events: input partition -> input offset of the last one taken.
        self._origins: dict[int, dict[int, int]] = {}
        self._event_time = np.zeros(0, dtype=np.float64)  # newest event timestamp seen per key
        # Moving average of the key's event-time gaps (seconds; -1 until its second event): its rate.
        self._gap = np.zeros(0, dtype=np.float64)
        self._persisted = np.zeros(0, dtype=bool)  # a snapshot of the key was handed to a changelog
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
        """Array bytes one key costs (window data + count + state + last seen + source position)."""
        return self.window * self.n_features * 4 + 8 + self.state_size * 8 + 8 + 4 + 8 + 8 + 8 + 8 + 1

    def slot(self, key: str, now: float) -> int:
        """The key's slot, allocating (and evicting if full) for a new key."""
        slot = self._slots.get(key)
        if slot is not None:
            self._slots.move_to_end(key)
        else:
            slot = self._allocate(key)
        self._last_seen[slot] = now
        return slot

    def slot_of(self, key: str) -> int | None:
        """The key's slot without touching its recency; None when the key has no window."""
        return self._slots.get(key)

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

    def ring(self, slot: int) -> np.ndarray:
        """The key's last W rows in ring order (a view; for order-free summaries of a full window)."""
        return self._data[slot]

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

    def holds(self, slot: int, partition: int, offset: int) -> bool:
        """True when the record at (partition, offset) is at or before the key's last applied one."""
        return self._partition[slot] == partition and offset <= self._offset[slot]

    def placed(self, slot: int, partition: int, offset: int) -> int:
        """Where the record at (partition, offset) stands for the key: 1 when the key already holds it
        (:meth:`holds`), -1 when the key's last applied event came from another partition, else 0."""
        known = self._partition[slot]
        if known == partition:
            return 1 if offset <= self._offset[slot] else 0
        return -1 if known >= 0 else 0

    def placed_repartitioned(self, slot: int, partition: int, offset: int) -> int:
        """:meth:`placed` for a record of the repartition topic: against the offset of the key's last
        event taken from there (a key's input and repartition positions are kept apart)."""
        known = self._partition[slot]
        if known == partition:
            return 1 if offset <= self._roffset[slot] else 0
        return -1 if known >= 0 else 0

    def position(self, slot: int) -> tuple[int, int]:
        """(partition, offset) of the last event applied to the key; (-1, -1) when unknown."""
        return int(self._partition[slot]), int(self._offset[slot])

    def observe_time(self, slot: int, timestamp: float) -> bool:
        """Records an event time; False when it is older than the key's newest (out of order)."""
        newest = self._event_time[slot]
        if timestamp < newest:
            return False
        if newest > -np.inf:
            gap, average = timestamp - newest, self._gap[slot]
            self._gap[slot] = gap if average < 0 else average + GAP_SMOOTHING * (gap - average)
        self._event_time[slot] = timestamp
        return True

    def events_per_s(self, slot: int) -> float:
        """The key's recent rate in event time (moving average of its gaps); 0 until its second event."""
        gap = float(self._gap[slot])
        return 0.0 if gap < 0 else (1.0 / gap if gap > 0 else float("inf"))

    def gap_of(self, key: str) -> float:
        """The key's typical gap between events (event time, seconds); -1 when not known."""
        slot = self._slots.get(key)
        return -1.0 if slot is None else float(self._gap[slot])

    def mark_persisted(self, slot: int) -> None:
        self._persisted[slot] = True

    def is_persisted(self, slot: int) -> bool:
        return bool(self._persisted[slot])

    def set_position(self, slot: int, partition: int, offset: int) -> None:
        self._partition[slot] = partition
        self._offset[slot] = offset

    def forget_repartitioned(self, slot: int) -> None:
        """The key moved to another partition: its repartition offset named the old one's record."""
        self._roffset[slot] = -1

    def set_repartitioned_position(self, slot: int, partition: int, offset: int) -> None:
        """The key's last event came from the repartition topic's ``partition`` at ``offset``."""
        if self._partition[slot] != partition:
            self._offset[slot] = -1
        self._partition[slot] = partition
        self._roffset[slot] = offset

    def forwarded_before(self, slot: int, origin_partition: int, origin_offset: int) -> bool:
        """Whether the key took a forwarded event of the same input partition at or after this
        input offset: this one is a duplicate forward (its input record forwarded again after a
        crash before the input offset was committed)."""
        origins = self._origins.get(slot)
        return origins is not None and origin_offset <= origins.get(origin_partition, -1)

    def set_origin(self, slot: int, origin_partition: int, origin_offset: int) -> None:
        origins = self._origins.get(slot)
        if origins is None:
            origins = self._origins[slot] = {}
        origins[origin_partition] = origin_offset

    def repartitioned_offset(self, slot: int) -> int:
        """Offset of the key's last event taken from the repartition topic; -1 when none."""
        return int(self._roffset[slot])

    @property
    def snapshot_body_size(self) -> int:
        """Bytes of a snapshot before its trailing ``extra`` bytes."""
        return _SNAPSHOT_HEADER.size + self.window * self.n_features * 4 + self.state_size * 8

    def snapshot(self, slot: int, extra: bytes = b"") -> bytes:
        """The key's window, state and source position as bytes (for a changelog), then ``extra``."""
        count = int(self._count[slot])
        window = np.empty((self.window, self.n_features), dtype=np.float32)
        if count >= self.window:
            self.copy_window(slot, window)
        else:
            window[:] = self._data[slot]  # not wrapped yet: rows 0..count-1 are oldest-first
        roffset = int(self._roffset[slot])
        origins = self._origins.get(slot)
        if roffset >= 0 or origins:
            origins = origins or {}
            header = _SNAPSHOT_HEADER_V3.pack(3, self.window, self.n_features, self.state_size, count,
                                              int(self._partition[slot]), int(self._offset[slot]), roffset,
                                              len(origins)) + b"".join(_ORIGIN.pack(q, o) for q, o in origins.items())
        else:
            header = _SNAPSHOT_HEADER.pack(_SNAPSHOT_VERSION, self.window, self.n_features, self.state_size, count,
                                           int(self._partition[slot]), int(self._offset[slot]))
        return header + window.tobytes() + self._state[slot].tobytes() + extra

    def restore(self, key: str, blob: bytes, now: float) -> int:
        """Recreates a key from :meth:`snapshot` bytes (its ``extra`` is ``blob[snapshot_body_size:]``);
        returns its slot."""
        expected = self.snapshot_body_size
        if len(blob) < _SNAPSHOT_HEADER.size:
            raise SnapshotError(f"snapshot of {len(blob)} bytes, expected at least {expected}")
        version, w, f, st, count, partition, offset = _SNAPSHOT_HEADER.unpack_from(blob)
        if version not in _SNAPSHOT_VERSIONS or (w, f, st) != (self.window, self.n_features, self.state_size):
            raise SnapshotError(f"snapshot shape {(version, w, f, st)} does not fit this store")
        try:
            header_size = _header_size(blob)
        except struct.error:
            raise SnapshotError(f"snapshot of {len(blob)} bytes: header cut short") from None
        expected = self.snapshot_body_size - _SNAPSHOT_HEADER.size + header_size
        if len(blob) < expected or (version == 1 and len(blob) != expected):
            raise SnapshotError(f"snapshot of {len(blob)} bytes, expected {expected}")
        roffset, origins = _repartition_positions(blob)
        slot = self.slot(key, now)
        body = np.frombuffer(blob, dtype=np.float32, count=w * f, offset=header_size).reshape(w, f)
        # Stored oldest-first; the ring is rotated so the key keeps its true event count (per-key
        # normals learn at every W-th event of a key, and must keep that phase across a restart).
        self._data[slot] = body if count < w else np.roll(body, count % w, axis=0)
        self._count[slot] = count
        self._state[slot] = np.frombuffer(blob, dtype=np.float64, count=st, offset=header_size + w * f * 4)
        self._partition[slot] = partition
        self._offset[slot] = offset
        self._roffset[slot] = roffset
        if origins:
            self._origins[slot] = origins
        self._persisted[slot] = True
        return slot

    def body_size_of(self, blob: bytes) -> int:
        """Bytes of this snapshot before its trailing ``extra`` bytes (its header's size depends on
        its version)."""
        return self.snapshot_body_size - _SNAPSHOT_HEADER.size + _header_size(blob)

    def drop_partitions(self, partitions: set[int]) -> int:
        """Forgets keys whose events come from these partitions (revoked in a rebalance)."""
        doomed = [key for key, slot in self._slots.items() if int(self._partition[slot]) in partitions]
        for key in doomed:
            slot = self._slots.pop(key)
            self._free.append(slot)
            for listener in self.drop_listeners:
                listener(key, DROPPED_REVOKED)
        return len(doomed)

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
        self._partition[slot] = -1
        self._offset[slot] = -1
        self._roffset[slot] = -1
        self._origins.pop(slot, None)
        self._event_time[slot] = -np.inf
        self._gap[slot] = -1.0
        self._persisted[slot] = False
        self._slots[key] = slot
        return slot

    def _release(self, key: str, reason: str) -> None:
        slot = self._slots.pop(key)
        self._free.append(slot)
        if self.on_evict is not None:
            self.on_evict(reason, 1)
        if self.on_evict_key is not None:
            self.on_evict_key(key, slot)
        for listener in self.drop_listeners:
            listener(key, reason)

    def _grow(self, capacity: int) -> None:
        if capacity <= self._capacity:
            return
        old = self._capacity
        self._data = _resized(self._data, capacity)
        self._count = _resized(self._count, capacity)
        self._state = _resized(self._state, capacity)
        self._last_seen = _resized(self._last_seen, capacity)
        self._partition = _resized(self._partition, capacity)
        self._offset = _resized(self._offset, capacity)
        self._roffset = _resized(self._roffset, capacity)
        self._event_time = _resized(self._event_time, capacity)
        self._gap = _resized(self._gap, capacity)
        self._persisted = _resized(self._persisted, capacity)
        # Lowest slots are handed out first, which keeps hot data together.
        self._free.extend(range(capacity - 1, old - 1, -1))
        self._capacity = capacity


def _header_size(blob: bytes) -> int:
    """Bytes of a snapshot's header (version 3: with its origin pairs)."""
    if blob and blob[0] == 3:
        return _SNAPSHOT_HEADER_V3.size + _ORIGIN.size * _SNAPSHOT_HEADER_V3.unpack_from(blob)[8]
    return _SNAPSHOT_HEADER.size


def _repartition_positions(blob: bytes) -> tuple[int, dict[int, int]]:
    """(repartition offset, input partition -> input offset of the last forwarded event) of a
    snapshot: (-1, {}) before version 3."""
    if not blob or blob[0] != 3:
        return -1, {}
    header = _SNAPSHOT_HEADER_V3.unpack_from(blob)
    origins = dict(_ORIGIN.unpack_from(blob, _SNAPSHOT_HEADER_V3.size + i * _ORIGIN.size) for i in range(header[8]))
    return header[7], origins


def snapshot_partition(blob: bytes) -> int:
    """The input partition a snapshot's position is on (-1 if the bytes are no snapshot)."""
    try:
        return _SNAPSHOT_HEADER.unpack_from(blob)[5]
    except struct.error:
        return -1


def snapshot_position(blob: bytes) -> tuple[int, int]:
    """(input partition, offset) of a snapshot's last event ((-1, -1) if the bytes are no snapshot)."""
    try:
        header = _SNAPSHOT_HEADER.unpack_from(blob)
    except struct.error:
        return -1, -1
    return header[5], header[6]


def with_offset(blob: bytes, offset: int) -> bytes:
    """The snapshot with its last input event's offset replaced (its partition and its repartition
    offset kept)."""
    version, w, f, st, count, partition, _ = _SNAPSHOT_HEADER.unpack_from(blob)
    return _SNAPSHOT_HEADER.pack(version, w, f, st, count, partition, offset) + blob[_SNAPSHOT_HEADER.size:]


def snapshot_repartitioned_offset(blob: bytes) -> int:
    """Offset of the key's last event taken from the repartition topic (-1 if none, or no snapshot)."""
    try:
        return _repartition_positions(blob)[0]
    except struct.error:
        return -1


def without_position(blob: bytes) -> bytes:
    """The snapshot with its offset forgotten (kept: its partition): none of the partition's records
    is taken for one the window already holds; nor (version 3) is any forwarded event taken for a
    duplicate forward (its input offsets per partition forgotten; its repartition topic offset kept:
    that topic is not reset with the input)."""
    blob = with_offset(blob, -1)
    if blob[0] != 3:
        return blob
    header = _SNAPSHOT_HEADER_V3.unpack_from(blob)
    return _SNAPSHOT_HEADER_V3.pack(*header[:8], 0) + blob[_header_size(blob):]


def _resized(array: np.ndarray, rows: int) -> np.ndarray:
    out = np.zeros((rows,) + array.shape[1:], dtype=array.dtype)
    out[: len(array)] = array
    return out
