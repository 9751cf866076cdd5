"""Window state snapshots for the changelog: what is due at a batch boundary, and sending it.

Snapshots are written with explicit partitions (the input record's) through the worker's output
producer; Faust declares the changelog topic and restores from it. A snapshot is taken in two
parts: the window part at the batch boundary (before the next batch's events enter the windows)
and the key's incident and threshold state once the batch is judged (:meth:`complete`).
"""

from __future__ import annotations

import logging
import struct
from typing import Any, Awaitable, Callable, Iterable, Mapping

from ..detector import Detector
from ..kafka.output import OutputProducer
from ..metrics import WorkerMetrics
from ..windows import snapshot_partition, snapshot_position, without_position
from .checkpoint import Snapshots

log = logging.getLogger("stream_detector.worker")
# A partition's floor in its changelog partition: the committed input offset known when the
# partition's snapshots were last written. Not valid UTF-8, so never a key's name.
FLOOR_KEY = b"\xff\xfefloor:%d"
FLOOR = struct.Struct("<q")


def floor_key(partition: int) -> bytes:
    return FLOOR_KEY % partition


class ChangelogState:
    """The changed keys' snapshots, tombstones of evicted keys, and the partitions revoked since."""

    def __init__(self, detector: Detector, out: OutputProducer, changelog_topic: str, metrics: WorkerMetrics,
                 state_min_events: int, restore_source: Callable[[bytes], bytes | None] | None = None,
                 committed: Callable[[int], int | None] | None = None):
        self.detector = detector
        self.out = out
        self.changelog_topic = changelog_topic
        self.metrics = metrics
        self.state_min_events = state_min_events
        self._restore_source = restore_source
        self.store = detector.windows.store
        # Changelog deletes of evicted keys, sent with the next snapshots (first), so that a key's
        # snapshot collected before its eviction can never land after its tombstone.
        self.tombstones: list[tuple[bytes, int]] = []
        self.revocations: list[set[int]] = []  # partitions revoked, in order: snapshots of those are not sent
        self.store.on_evict_key = self.tombstone
        # The group's committed offset of an input partition as the consumer knows it now (None if
        # unknown): written as the partition's floor with its snapshots.
        self._committed = committed
        self._floors: dict[int, int] = {}  # the floor last written per partition
        # Partitions whose committed offset went back below their floor (a group reset, or the input
        # topic recreated): the positions of their snapshots are dropped at restore.
        self.reset_partitions: set[int] = set()
        # Each assigned input partition's end offset at its recovery: no snapshot written before can
        # name an offset at or past it (one that does is garbled or foreign, and loses its position).
        self._ends: dict[int, int] = {}
        self._past_end_logged: set[int] = set()
        if restore_source is not None:
            detector.windows.restore = self.restore

    def restore(self, key: str) -> bytes | None:
        blob = self._restore_source(key.encode()) if self._restore_source is not None else None
        if blob is not None:
            self.metrics.keys_restored.inc()
            if self.reset_partitions and snapshot_partition(blob) in self.reset_partitions:
                self.metrics.positions_dropped.inc()
                return without_position(blob)
            partition, offset = snapshot_position(blob)
            end = self._ends.get(partition)
            if end is not None and offset >= end:
                # Trusted, it would take every event of the key for one its window holds, for ever.
                self.metrics.positions_dropped.inc()
                if partition not in self._past_end_logged:
                    self._past_end_logged.add(partition)
                    log.warning("key %r: its snapshot names offset %d of input partition %d, whose end was %d "
                                "at recovery: its position is dropped (its window kept); logged once per "
                                "partition", key, offset, partition, end)
                return without_position(blob)
        return blob

    async def recover(self, data: Mapping[bytes, Any], committed_now: Mapping[int, int],
                      ends: Mapping[int, int] | None = None) -> set[int]:
        """At recovery, with the changelog read (``data``), the group's committed offset of each
        assigned input partition (-1 where none) and their end offsets (``ends``, when known; a
        snapshot naming an offset at or past its partition's end loses its position when restored):
        the partitions whose committed offset is below the
        floor their snapshots were written at. The group was reset (or the topic recreated, which
        deletes its committed offsets): the events from there on are to be processed again, so
        those partitions' snapshots lose their positions (their windows are kept). Each new floor
        is written at once, so a crash later does not take the reset for a new one."""
        reset = set()
        if ends is not None:
            self._ends.update({p: end for p, end in ends.items() if end is not None and end >= 0})
            self._past_end_logged -= set(ends)
        for partition, committed in committed_now.items():
            raw = data.pop(floor_key(partition), None)
            try:
                floor = FLOOR.unpack(raw)[0] if isinstance(raw, bytes) else -1
            except struct.error:
                floor = -1
            if floor > committed:
                reset.add(partition)
                log.warning("input partition %d: committed offset %d is behind the %d the state was written at "
                            "(group reset or topic recreated): its events are processed again, none taken for "
                            "a replay", partition, committed, floor)
            self._floors[partition] = min(floor, committed)
        self.reset_partitions = (self.reset_partitions - set(committed_now)) | reset
        if reset:
            sent = self.out.group()
            for partition in reset:
                sent.send(self.changelog_topic, floor_key(partition), FLOOR.pack(committed_now[partition]), partition)
            await sent.wait()
        return reset

    def restore_open_incidents(self, snapshots: Iterable[tuple[bytes, bytes]]) -> int:
        """At recovery: restores at once the keys whose snapshot holds an open incident (the rest are
        restored lazily, when their next event comes), so that the idle sweep closes the incident of
        a key that never sends again. How many were restored."""
        detector = self.detector
        has_open, restore_now = detector.snapshot_has_open_incident, detector.windows.restore_now
        now = detector.key_clock()
        restored = 0
        for key, blob in list(snapshots):
            if isinstance(key, bytes) and isinstance(blob, bytes) and has_open(blob):
                restored += restore_now(key.decode("utf-8", "replace"), now)
        return restored

    def tombstone(self, key: str, slot: int) -> None:
        if self.store.is_persisted(slot):  # nothing to delete for a key never written
            self.tombstones.append((key.encode(), self.store.position(slot)[0]))

    def revoke(self, partitions: set[int]) -> int:
        """Partitions handed over: their keys are dropped and their snapshots no longer sent."""
        self.revocations.append(partitions)
        for partition in partitions:
            self._floors.pop(partition, None)
            self._ends.pop(partition, None)
        return self.store.drop_partitions(partitions)

    def collect_windows(self, sealed_by: float | None = None) -> Snapshots | None:
        """The window part of the snapshots of the changed keys that are due (those first changed by
        micro-batches sealed by ``sealed_by``; all with None), as they stand now: at a batch boundary,
        before the next batch's events enter the windows. :meth:`complete` adds each key's incident
        and threshold state once the batch is judged. None when nothing is due."""
        windows = self.detector.windows
        if sealed_by is None:
            covers = windows.newest_sealed
            touched = windows.drain_touched()
        else:
            touched, covers = windows.drain_sealed(sealed_by)
        tombstones = self.tombstones
        if not touched and covers is None and not tombstones:
            return None
        items: list[tuple[bytes, bytes | None, int]] = [(key, None, partition) for key, partition in tombstones]
        tombstones.clear()
        keys: list[str] = []
        min_events = self.state_min_events
        store = self.store
        window_snapshot, position = store.snapshot, store.position
        for key, slot in touched.items():
            # Not evicted since; and holding `state_min_events` (1 by default: the batch's offsets are
            # acked once this is written, so a key left out starts over without those events after a
            # rebalance, and its first full window is then never scored).
            if store.slot_of(key) == slot and store.count(slot) >= min_events:
                keys.append(key)
                items.append((key.encode(), window_snapshot(slot), position(slot)[0]))
                store.mark_persisted(slot)
        return Snapshots(items, len(self.revocations), keys, covers)

    def complete(self, snapshots: Snapshots | None) -> Snapshots | None:
        """Adds the key state (after the batch's thresholds and incidents) to collected windows."""
        if snapshots is None:
            return None
        key_state = self.detector.key_state
        items = snapshots.items
        first = len(items) - len(snapshots.keys)  # the tombstones come first
        for i, key in enumerate(snapshots.keys, first):
            name, body, partition = items[i]
            items[i] = (name, body + key_state(key), partition)  # type: ignore[operator]
        snapshots.keys = []
        return snapshots

    def collect_snapshots(self) -> Snapshots | None:
        """Whole snapshots of every changed key (at a batch boundary: after the batch's thresholds and
        incidents, before the next batch's events)."""
        return self.complete(self.collect_windows())

    def collect_floors(self) -> Snapshots | None:
        """The floors of the partitions written to whose committed offset moved since (None if
        none did): written while the input is quiet, since a burst's last snapshots go out before
        the offsets they cover are committed."""
        if self._committed is None:
            return None
        floors = self._floors
        items: list[tuple[bytes, bytes | None, int]] = []
        for partition, written in floors.items():
            floor = self._committed(partition)
            if floor is not None and floor > written:
                items.append((floor_key(partition), FLOOR.pack(floor), partition))
                floors[partition] = floor
        return Snapshots(items, len(self.revocations), [], None) if items else None

    def send(self, snapshots: Snapshots | None) -> Awaitable[Any] | None:
        """Sends snapshots once the alerts they follow are acknowledged; None if there were none."""
        if snapshots is None:
            return None
        revoked = set().union(*self.revocations[snapshots.revocations:])
        sent = self.out.group()
        topic = self.changelog_topic
        written: set[int] = set()
        floors = self._floors
        for key, value, partition in snapshots.items:
            if partition not in revoked:  # its new owner has restored the key already
                sent.send(topic, key, value, partition)
                written.add(partition)
        self.metrics.state_writes.inc(len(sent))
        if self._committed is not None:
            for partition in written:
                floor = self._committed(partition)
                if floor is not None and floor > floors.get(partition, -1):
                    floors[partition] = floor
                    sent.send(topic, floor_key(partition), FLOOR.pack(floor), partition)
                elif partition not in floors:
                    floors[partition] = -1  # written to: its floor is written once the group commits
        return sent.wait() if len(sent) else None
