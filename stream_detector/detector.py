"""The detection pipeline, free of Kafka: events -> windows -> scoring -> thresholds -> alerts.

The worker wraps it with Kafka I/O; the trainer's replay evaluator drives it directly, so what is
measured offline is exactly what runs online. A micro-batch goes through three steps so the worker
can run the middle one off the event loop:

- :meth:`Detector.prepare` (event loop): decode, validate, featurize, update the windows, and copy
  each ready window, as it stands right after its event, into the batch;
- :meth:`Detector.score` (worker thread): one model call for the whole batch;
- :meth:`Detector.finish` (event loop): thresholds and alerts.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .alerts import build_alert
from .artifacts import ModelArtifact
from .events import Event, EventDecoder, Invalid
from .profiles import Profile
from .scoring import Scores
from .thresholds import GlobalThreshold, ThresholdPolicy
from .windows import WindowStore


@dataclass(slots=True)
class RawRecord:
    """One consumed message, as the worker hands it over."""

    value: bytes | None
    key: bytes | None = None
    timestamp: float | None = None  # broker/producer timestamp, seconds
    partition: int = -1
    offset: int = -1
    headers: Sequence[tuple[str, bytes]] = ()


@dataclass
class PreparedBatch:
    windows: np.ndarray  # (n, W, F), one row per scored event
    events: list[Event]
    records: list[RawRecord]  # the record of each scored event
    invalid: list[tuple[RawRecord, Invalid]] = field(default_factory=list)
    warming_up: int = 0  # valid events whose key has fewer than W events so far

    def __len__(self) -> int:
        return len(self.events)


@dataclass
class Decision:
    event: Event
    record: RawRecord
    score: float
    threshold: float
    alert: dict[str, Any] | None


@dataclass
class DetectorStats:
    consumed: int = 0
    invalid: Counter = field(default_factory=Counter)
    scored: int = 0
    warming_up: int = 0
    alerts: int = 0
    evicted: Counter = field(default_factory=Counter)


class FeatureWindows:
    """Profile features appended to per-key windows: the one path from an event to model input."""

    def __init__(self, profile: Profile, window: int, max_keys: int = 100_000, key_ttl_s: float = float("inf"),
                 on_evict: Callable[[str, int], None] | None = None):
        self.profile = profile
        self.window = window
        self.store = WindowStore(window, profile.n_features, profile.state_size, max_keys, key_ttl_s,
                                 on_evict=on_evict)

    def add(self, event: Event, now: float) -> int | None:
        """Appends the event's features; returns the key's slot once its window is full."""
        store = self.store
        slot = store.slot(event.key, now)
        self.profile.featurize(event.values, event.timestamp, store.state(slot), store.next_row(slot))
        return slot if store.commit(slot) >= self.window else None

    def evict_idle(self, now: float) -> int:
        return self.store.evict_idle(now)

    def __len__(self) -> int:
        return len(self.store)


class Detector:
    def __init__(
        self,
        artifact: ModelArtifact,
        scorer: Callable[[np.ndarray], Scores],
        threshold: ThresholdPolicy | None = None,
        key_field: str = "",
        max_keys: int = 100_000,
        key_ttl_s: float = float("inf"),
        max_message_bytes: int = 1_000_000,
        top_features: int = 3,
        max_batch: int = 1024,
        clock: Callable[[], float] = time.time,
    ):
        self.artifact = artifact
        self.scorer = scorer
        self.threshold = threshold or GlobalThreshold(artifact.threshold)
        self.profile = artifact.profile
        self.window = artifact.window
        self.top_features = top_features
        self.clock = clock
        self.stats = DetectorStats()
        self.decoder = EventDecoder(self.profile.fields, key_field=key_field, max_bytes=max_message_bytes)
        self.windows = FeatureWindows(self.profile, self.window, max_keys, key_ttl_s, self._count_eviction)
        self._batch = np.zeros((max_batch, self.window, self.profile.n_features), dtype=np.float32)
        self._next_idle_sweep = 0.0

    def _count_eviction(self, reason: str, n: int) -> None:
        self.stats.evicted[reason] += n

    def prepare(self, records: Sequence[RawRecord]) -> PreparedBatch:
        now = self.clock()
        if now >= self._next_idle_sweep:
            self.windows.evict_idle(now)
            self._next_idle_sweep = now + 1.0
        if len(records) > len(self._batch):
            self._batch = np.zeros((len(records),) + self._batch.shape[1:], dtype=np.float32)
        batch = PreparedBatch(windows=self._batch[:0], events=[], records=[])
        n = 0
        for record in records:
            decoded = self.decoder.decode(record.value)
            if isinstance(decoded, Invalid):
                batch.invalid.append((record, decoded))
                self.stats.invalid[decoded.reason] += 1
                continue
            n = self._add_event(decoded, record, batch, n, now)
        self.stats.consumed += len(records)
        batch.windows = self._batch[:n]
        return batch

    def prepare_events(self, events: Sequence[Event]) -> PreparedBatch:
        """Already-decoded events (the replay evaluator's path)."""
        now = self.clock()
        if len(events) > len(self._batch):
            self._batch = np.zeros((len(events),) + self._batch.shape[1:], dtype=np.float32)
        batch = PreparedBatch(windows=self._batch[:0], events=[], records=[])
        n = 0
        empty = RawRecord(None)
        for event in events:
            n = self._add_event(event, empty, batch, n, now)
        self.stats.consumed += len(events)
        batch.windows = self._batch[:n]
        return batch

    def _add_event(self, event: Event, record: RawRecord, batch: PreparedBatch, n: int, now: float) -> int:
        slot = self.windows.add(event, now)
        if slot is None:
            batch.warming_up += 1
            self.stats.warming_up += 1
            return n
        self.windows.store.copy_window(slot, self._batch[n])
        batch.events.append(event)
        batch.records.append(record)
        return n + 1

    def score(self, batch: PreparedBatch) -> Scores:
        return self.scorer(batch.windows)

    def finish(self, batch: PreparedBatch, scores: Scores) -> list[Decision]:
        keys = [e.key for e in batch.events]
        over = self.threshold.exceeds(keys, scores.scores)
        decisions: list[Decision] = []
        version, kind = self.artifact.version, self.artifact.kind
        names = self.profile.feature_names
        for i, event in enumerate(batch.events):
            score = float(scores.scores[i])
            limit = self.threshold.value_for(event.key)
            alert = None
            if over[i]:
                alert = build_alert(
                    event.key, event.event_id, event.timestamp, score, limit, version, kind,
                    names, scores.feature_errors[i], self.top_features, self.window,
                )
                self.stats.alerts += 1
            decisions.append(Decision(event, batch.records[i], score, limit, alert))
        self.stats.scored += len(batch.events)
        return decisions

    def process(self, records: Sequence[RawRecord]) -> tuple[list[Decision], PreparedBatch]:
        """All three steps in one call (tests, offline replay)."""
        batch = self.prepare(records)
        return self.finish(batch, self.score(batch)), batch
