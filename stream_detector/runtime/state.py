"""Window state snapshots for the changelog: what is due at a batch boundary, and sending it.

Snapshots are written with explicit partitions (the input record's) through the worker's output
producer; Faust declares the changelog topic and restores from it. A snapshot is taken in two
parts: the window part at the batch boundary (before the next batch's events enter the windows)
and the key's incident and threshold state once the batch is judged (:meth:`complete`).
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from ..detector import Detector
from ..kafka.output import OutputProducer
from ..metrics import WorkerMetrics
from .checkpoint import Snapshots


class ChangelogState:
    """The changed keys' snapshots, tombstones of evicted keys, and the partitions revoked since."""

    def __init__(self, detector: Detector, out: OutputProducer, changelog_topic: str, metrics: WorkerMetrics,
                 state_min_events: int, restore_source: Callable[[bytes], bytes | None] | None = None):
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
        if restore_source is not None:
            detector.windows.restore = self.restore

    def restore(self, key: str) -> bytes | None:
        blob = self._restore_source(key.encode()) if self._restore_source is not None else None
        if blob is not None:
            self.metrics.keys_restored.inc()
        return blob

    def tombstone(self, key: str, slot: int) -> None:
        if self.store.is_persisted(slot):  # nothing to delete for a key never written
            self.tombstones.append((key.encode(), self.store.position(slot)[0]))

    def revoke(self, partitions: set[int]) -> int:
        """Partitions handed over: their keys are dropped and their snapshots no longer sent."""
        self.revocations.append(partitions)
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
            # Not evicted since; and a key's very first event is not worth a changelog write (a flood
            # of one-off keys would double the traffic): at worst one event is missing from its window.
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

    def send(self, snapshots: Snapshots | None) -> Awaitable[Any] | None:
        """Sends snapshots once the alerts they follow are acknowledged; None if there were none."""
        if snapshots is None:
            return None
        revoked = set().union(*self.revocations[snapshots.revocations:])
        sent = self.out.group()
        topic = self.changelog_topic
        for key, value, partition in snapshots.items:
            if partition not in revoked:  # its new owner has restored the key already
                sent.send(topic, key, value, partition)
        self.metrics.state_writes.inc(len(sent))
        return sent.wait() if len(sent) else None
