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

import logging
import struct
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import orjson

from .alerts import top_features_of_rows
from .artifacts import ArtifactError, ModelArtifact
from .calibration import KeyNormal, KeyNormalConfig, build_key_normal
from .errors import DECODE_FAILED, KEY_PARTITION_MISMATCH, WINDOW_FAILED, KeyPartitionMismatch, RegistryUnavailable
from .events import Envelope, Event, EventDecoder, Invalid
from .drift import FeatureDrift
from .incidents import ACKNOWLEDGED, EVICTED, REVOKED, STOPPED, AlertPolicy, IncidentTracker, WindowInfo, severity
from .profiles import Profile
from .scoring import Scores
from .shadow import Challenger, ShadowCounts
from .thresholds import ThresholdConfig, ThresholdPolicy, build_threshold_policy
from .repartition import KeyRouter
from .windows import DROPPED_REVOKED, SnapshotError, WindowStore


log = logging.getLogger(__name__)
# A key's alert state after its window in a snapshot: format version, incident JSON length,
# threshold calibration length (version 2: and the length of the key's learned normal); then each.
_KEY_STATE_V1 = struct.Struct("<BII")
_KEY_STATE = struct.Struct("<BIII")
_KEY_STATE_VERSION = 2


@dataclass(slots=True)
class RawRecord:
    """One consumed message, as the worker hands it over."""

    value: bytes | None
    key: bytes | None = None
    timestamp: float | None = None  # broker/producer timestamp, seconds
    partition: int = -1
    offset: int = -1
    headers: Sequence[tuple[str, bytes]] = ()
    # Read from the repartition topic (``key_partition_check=repartition``): ``partition`` and
    # ``offset`` are that topic's; ``origin`` names the input record it was forwarded from
    # (topic:partition:offset, from its header), which record-position event ids use.
    repartitioned: bool = False
    origin: str | None = None
    origin_partition: int = -1  # the input record's partition and offset (-1: not known)
    origin_offset: int = -1


@dataclass
class PreparedBatch:
    windows: np.ndarray  # (n, W, F), one row per scored event
    events: list[Event]
    records: list[RawRecord]  # the record of each scored event
    invalid: list[tuple[RawRecord, Invalid]] = field(default_factory=list)
    warming_up: int = 0  # valid events whose key has fewer than W events so far
    replayed: int = 0  # redelivered records whose event the restored window already holds
    unscored: int = 0  # events of hot keys skipped by the scoring stride (still in their windows)
    # Events to forward to the repartition topic (record, window key): not windowed here.
    forward: list[tuple[RawRecord, str]] = field(default_factory=list)
    # Each window's key normal (offset and inverse scale per feature), applied by Detector.score
    # in the scoring thread; None when the model has no per-key normal or once applied.
    offsets: np.ndarray | None = None
    inv_scales: np.ndarray | None = None
    # The newest event's (scaled) values per window, copied by Detector.score for the threshold policy.
    newest: np.ndarray | None = None
    # The challenger shadowing the champion when the batch was prepared (see stream_detector.shadow),
    # and its scores (set by Detector.score; None when there is no challenger or its call raised).
    challenger: Challenger | None = None
    shadow: Scores | None = None

    def __len__(self) -> int:
        return len(self.events)


@dataclass(slots=True)
class Decision:
    event: Event
    record: RawRecord
    score: float
    threshold: float  # the key's threshold this window was judged against
    alert: dict[str, Any] | None  # the alert message (open, update or close) this window triggered
    over: bool = False  # score > threshold (whether or not a message was published for it)
    severity: float | None = None  # score / threshold: comparable across keys, > 1 when over


@dataclass
class DetectorStats:
    consumed: int = 0
    invalid: Counter = field(default_factory=Counter)
    scored: int = 0
    warming_up: int = 0
    replayed: int = 0
    unscored: int = 0  # skipped by the scoring stride
    repartitioned: int = 0  # events handed back for the repartition topic (not windowed here)
    over_threshold: int = 0  # scored windows over their key's threshold
    alerts: int = 0  # alert messages (open, update, close)
    evicted: Counter = field(default_factory=Counter)


REPLAYED = -1  # FeatureWindows.add's answer for a record the key's window already holds
FORWARD = -2  # FeatureWindows.add's answer for a record to forward to its key's home partition


class FeatureWindows:
    """Profile features appended to per-key windows: the one path from an event to model input.

    With a ``restore`` source (the worker's changelog-backed state), a key seen for the first time
    since a restart or rebalance gets its window back instead of starting cold. Keys touched by
    Kafka records are remembered until :meth:`drain_touched`, so the worker can persist them.
    """

    def __init__(self, profile: Profile, window: int, max_keys: int = 100_000, key_ttl_s: float = float("inf"),
                 on_evict: Callable[[str, int], None] | None = None,
                 restore: Callable[[str], bytes | None] | None = None, key_normal: KeyNormal | None = None):
        self.profile = profile
        self.window = window
        # Each key's own normal (per-feature centre and spread from its first events), when the
        # model was trained with one: learned here, block by block, as the key's windows fill.
        self.key_normal = key_normal
        self.store = WindowStore(window, profile.n_features, profile.state_size, max_keys, key_ttl_s,
                                 on_evict=on_evict)
        self.restore = restore
        # Refuse events that would split a key's window across partitions (see `add`).
        self.check_partitions = False
        # Or forward them to their key's home partition (key_partition_check=repartition; see `add`).
        self.router: KeyRouter | None = None
        self.restore_failures = 0
        self.out_of_order = 0  # events older than their key's newest: still windowed, in arrival order
        # Keys changed since their last snapshot (-> slot). Each becomes due to be written a while
        # after it first changed: the keys first changed by one micro-batch are sealed into that batch's
        # generation, and generations are drained oldest first (see :meth:`drain_sealed`).
        self.touched: dict[str, int] = {}
        self._fresh: list[str] = []  # keys first changed since the last seal, in order
        self._generations: deque[tuple[float, Any, list[str]]] = deque()  # (sealed at, tag, keys)
        # Given the trailing bytes of a restored snapshot (the owner's per-key state), if any.
        self.restore_extra: Callable[[str, bytes], None] | None = None

    def _restore_if_known(self, key: str, now: float) -> bool:
        """Takes the key's window (and per-key state) from its snapshot, if it has one and is not
        held yet; whether it did."""
        if self.restore is None or key in self.store:
            return False
        blob = self.restore(key)
        if blob is None:
            return False
        try:
            self.store.restore(key, blob, now)
        except SnapshotError as exc:
            self.restore_failures += 1
            log.warning("state of key %r not restored (%s); it starts a new window", key, exc)
            return False
        extra = blob[self.store.body_size_of(blob):]
        if extra and self.restore_extra is not None:
            self.restore_extra(key, extra)
        return True

    def restore_now(self, key: str, now: float) -> bool:
        """Restores a key before its next event (a key with an open incident after a restart or a
        rebalance: the idle sweep must see it even if no event of it ever comes again)."""
        return self._restore_if_known(key, now)

    def mark_touched(self, key: str) -> None:
        """The key's state changed without an event (e.g. its incident closed idle): persist it again."""
        slot = self.store.slot_of(key)
        if slot is not None:
            if key not in self.touched:
                self._fresh.append(key)
            self.touched[key] = slot

    def add(self, event: Event, now: float, partition: int = -1, offset: int = -1,
            record_key: bytes | None = None, repartitioned: bool = False, origin_partition: int = -1,
            origin_offset: int = -1) -> int | None:
        """Appends the event's features; returns the key's slot once its window is full, else None.

        For a Kafka record (``offset >= 0``) that the key's (restored) window already holds, a
        redelivery after a crash or a rebalance, nothing is appended and :data:`REPLAYED` is
        returned: the check and the append share one lookup of the key.

        With ``check_partitions``, a record would split its key's window across partitions (and
        workers) when its record key is not the window key (wherever it lands: the same key's
        other such records land elsewhere) or when it comes from another partition than the key's
        last event (checked with the replay check's read): it raises
        :class:`KeyPartitionMismatch` and nothing is appended.
        Partitioner-agnostic: librdkafka
        (CRC32) and Java clients (murmur2) place a key's records on one partition all the same.

        With a ``router`` (repartitioning), an input record (``offset >= 0``, not ``repartitioned``)
        is windowed here only when its record key is its window key and it is on the key's
        partition: the one the key's window was last on, or else the key's home partition (a hash,
        computed only for a key seen on another partition or not seen yet). Any other is left
        alone and :data:`FORWARD` returned: the worker forwards it to the repartition topic, whose
        partition of the same number is read by the same worker. A ``repartitioned`` record (read
        back from that topic) is windowed, its replay check against the key's repartition offset;
        one whose input record (``origin_partition``, ``origin_offset``) is at or before the last
        forwarded event the key took from that input partition is a duplicate forward (the input
        record forwarded again after a crash before its offset was committed): :data:`REPLAYED`.
        """
        store = self.store
        key = event.key
        router = self.router if offset >= 0 and not repartitioned else None
        if router is not None:
            if record_key != key.encode():
                return FORWARD
            # A key not held (nor restored) is placed by its hash; a held one by its last event's
            # partition (below), hashed only when that differs.
            if key not in store and not self._restore_if_known(key, now) and router.home(key) != partition:
                return FORWARD
        elif self.check_partitions and offset >= 0 and record_key != key.encode():
            raise KeyPartitionMismatch(f"record key {record_key!r:.60} is not the window key {key!r:.60}")
        if key not in store:
            self._restore_if_known(key, now)
        slot = store.slot(key, now)
        placed = 0
        if offset >= 0:
            if repartitioned:
                placed = store.placed_repartitioned(slot, partition, offset)
                if placed == 1 or (origin_offset >= 0
                                   and store.forwarded_before(slot, origin_partition, origin_offset)):
                    return REPLAYED
            else:
                placed = store.placed(slot, partition, offset)
                if placed == 1:
                    return REPLAYED
            if placed < 0:
                if router is not None and router.home(key) != partition:
                    return FORWARD
                if self.check_partitions:
                    raise KeyPartitionMismatch(f"key {key!r:.60} is on partition {store.position(slot)[0]}, "
                                               f"this record on {partition}")
        if not store.observe_time(slot, event.timestamp):
            self.out_of_order += 1
        self.profile.featurize(event.values, event.timestamp, store.state(slot), store.next_row(slot))
        count = store.commit(slot)
        full = count >= self.window
        normal = self.key_normal
        if full and normal is not None and (count % self.window == 0 or event.key not in normal.rows):
            # Exactly the last W events; or, for a key restored without its normal, the window it has.
            normal.learn_block(event.key, store.ring(slot))
        if offset >= 0:
            if repartitioned:
                store.set_repartitioned_position(slot, partition, offset)
                if origin_offset >= 0:
                    store.set_origin(slot, origin_partition, origin_offset)
            else:
                if placed < 0:  # moved to another partition: its repartition offset named the old one's
                    store.forget_repartitioned(slot)
                store.set_position(slot, partition, offset)
            touched = self.touched
            if event.key not in touched:
                self._fresh.append(event.key)
            touched[event.key] = slot
        return slot if full else None

    def copy_scaled(self, key: str, slot: int, out: np.ndarray) -> None:
        """The key's window, oldest first, scaled by the key's own normal when there is one: what the
        model sees (the trainer's path; the detector scales learned keys in bulk)."""
        self.store.copy_window(slot, out)
        if self.key_normal is not None:
            self.key_normal.scale_window(key, out)

    def seal(self, tag: Any, now: float) -> None:
        """Closes a generation: the keys first changed since the last seal (by the micro-batch
        ``tag``) become due together, once the generation is old enough."""
        self._generations.append((now, tag, self._fresh))
        self._fresh = []

    @property
    def newest_sealed(self) -> Any:
        """The tag of the newest generation sealed and not drained yet (None if there is none)."""
        return self._generations[-1][1] if self._generations else None

    def drain_touched(self) -> dict[str, int]:
        """Every changed key (-> slot), sealed or not."""
        touched, self.touched, self._fresh = self.touched, {}, []
        self._generations.clear()
        return touched

    def drain_sealed(self, sealed_by: float) -> tuple[dict[str, int], Any]:
        """The keys (-> slot) of the generations sealed at or before ``sealed_by``, oldest first, and
        the tag of the newest of those generations (None if none was).

        So a key is written once in a while however often it changes, and the writes of a steady
        flow are spread over the batches instead of coming in one burst. Each key is written in the
        state it has now, so every event of the drained generations' micro-batches is covered: a key
        of a later generation was first changed later, after its last write.
        """
        touched, generations = self.touched, self._generations
        drained: dict[str, int] = {}
        tag = None
        pop = touched.pop
        while generations and generations[0][0] <= sealed_by:
            _, tag, keys = generations.popleft()
            for key in keys:
                slot = pop(key, None)
                if slot is not None:
                    drained[key] = slot
        return drained, tag

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
        restore: Callable[[str], bytes | None] | None = None,
        thresholds: ThresholdConfig | None = None,
        alerting: AlertPolicy | None = None,
        max_future_s: float | None = None,
        score_stride: int = 1,
        hot_key_rate: float = 0.0,
        key_clock: Callable[[], float] | None = None,
        envelope: Envelope | None = None,
        topic: str = "",
        drift_halflife: float = 10_000,
        key_partition_check: bool = False,
        router: KeyRouter | None = None,
    ):
        if score_stride < 1 or not hot_key_rate >= 0:
            raise ValueError("score_stride must be at least 1 and hot_key_rate not negative")
        self.artifact = artifact
        # Hot keys (event-time rate above hot_key_rate) have only every score_stride-th window scored.
        self.score_stride = score_stride
        self.hot_key_rate = hot_key_rate
        self.scorer = scorer
        # Per-key adaptive thresholds by default (global during a key's warm-up), as in the worker.
        self.threshold = threshold if threshold is not None else build_threshold_policy(artifact, thresholds, max_keys)
        self._thresholds, self._max_keys = thresholds, max_keys
        self.incidents = IncidentTracker(alerting)
        self._closed: list[dict[str, Any]] = []  # close messages not triggered by a scored window
        self.profile = artifact.profile
        self.window = artifact.window
        self.top_features = top_features
        self.clock = clock
        # The clock of the key TTL (windows idle that long are dropped) and of incidents' idle close:
        # the worker passes a monotonic one, so that a step of the wall clock never evicts every key
        # nor closes every open incident. ``clock`` by default.
        self.key_clock = key_clock or clock
        self.stats = DetectorStats()
        # Per-feature shift of the scored windows from the model's training data (stream_detector.drift).
        self.drift = FeatureDrift.for_artifact(artifact, drift_halflife)
        self.key_normal = build_key_normal(artifact.metadata, self.profile.n_features, self.window, max_keys)
        # `envelope`: where a record's key, time, id and fields are; `topic` names record positions.
        self.decoder = EventDecoder(self.profile.fields, key_field=key_field, max_bytes=max_message_bytes,
                                    max_future_s=max_future_s, clock=clock, envelope=envelope, topic=topic)
        self.windows = FeatureWindows(self.profile, self.window, max_keys, key_ttl_s, self._count_eviction,
                                      restore=restore, key_normal=self.key_normal)
        self.windows.restore_extra = self._restore_key_state
        self.windows.check_partitions = key_partition_check
        self.windows.router = router  # key_partition_check=repartition
        self._pending_model: tuple[ModelArtifact, Callable[[np.ndarray], Scores], ThresholdPolicy | None] | None = None
        # Two row buffers, a micro-batch's windows in one, the next batch's in the other: a pipelined
        # worker prepares batch k+1 while the model still reads batch k's rows.
        self._buffers = [np.zeros((max_batch, self.window, self.profile.n_features), dtype=np.float32)
                         for _ in range(2)]
        # With per-key normals: each buffer's windows' offsets and inverse scales (flipped with it).
        self._normal_buffers = [(np.zeros((max_batch, self.profile.n_features), dtype=np.float32),
                                 np.ones((max_batch, self.profile.n_features), dtype=np.float32)) for _ in range(2)]
        self._next_idle_sweep = 0.0
        self.windows.store.drop_listeners.append(self._drop_key_state)
        # Shadow scoring (stream_detector.shadow): the challenger, a change of it waiting for the next
        # micro-batch ((new challenger or None,)), its alert messages not drained yet and its counts.
        self.challenger: Challenger | None = None
        self._pending_challenger: tuple[Challenger | None] | None = None
        self._shadow_out: list[dict[str, Any]] = []
        self.shadow_counts = ShadowCounts()

    def snapshot(self, key: str, slot: int) -> bytes:
        """The key's window plus its incident and threshold calibration, for its changelog.

        Written only at a batch boundary, after the alerts of the events it covers are acked: a
        restarted worker then resumes the key's open incident (publishing the over-threshold windows
        it had not published yet, under the same incident id) and keeps its calibrated threshold.
        It is ``windows.store.snapshot(slot) + key_state(key)``: a pipelined worker takes the window
        part before the next batch enters the windows and adds the key state once this batch is judged.
        """
        return self.windows.store.snapshot(slot, self.key_state(key))

    def key_state(self, key: str) -> bytes:
        """The key's incident and threshold calibration as the trailing bytes of its snapshot."""
        incident = self.incidents.export_key(key)
        export = getattr(self.threshold, "export_key", None)
        calibration = export(key) if export is not None else None
        normal = self.key_normal.export_key(key) if self.key_normal is not None else None
        if incident is None and calibration is None and normal is None:
            return b""
        incident_bytes = orjson.dumps(incident) if incident is not None else b""
        calibration = calibration or b""
        normal = normal or b""
        return (_KEY_STATE.pack(_KEY_STATE_VERSION, len(incident_bytes), len(calibration), len(normal))
                + incident_bytes + calibration + normal)

    @property
    def model_swap_pending(self) -> bool:
        """A model swap waits for the next micro-batch (which must not be prepared before the last is
        judged: that one is judged against its own model's thresholds)."""
        return self._pending_model is not None

    def snapshot_has_open_incident(self, blob: bytes) -> bool:
        """Whether a changelog snapshot holds an incident that was opened (published) and not closed:
        read at recovery, once per restored key, to restore such keys at once."""
        extra = blob[self.windows.store.body_size_of(blob):]
        try:
            version = extra[0] if extra else 0
            if version == 1:
                _, n_incident, _ = _KEY_STATE_V1.unpack_from(extra)
                start = _KEY_STATE_V1.size
            elif version == _KEY_STATE_VERSION:
                _, n_incident, _, _ = _KEY_STATE.unpack_from(extra)
                start = _KEY_STATE.size
            else:
                return False
            if not n_incident:
                return False
            incident = orjson.loads(extra[start:start + n_incident])
            return isinstance(incident, dict) and bool(incident.get("opened"))
        except (ValueError, struct.error):  # not restorable anyway: counted when its key comes back
            return False

    def sweep_idle(self) -> int:
        """Closes the incidents of keys silent for their idle limit (close messages for
        :meth:`drain_closed`); how many. Each such key is marked for a new snapshot, which no longer
        holds the incident."""
        now = self.key_clock()
        idle = self.incidents.sweep_idle(now, self._alert_context())
        self._closed.extend(idle)
        for message in idle:
            self.windows.mark_touched(message["key"])  # its snapshot still holds the open incident
        self.stats.alerts += len(idle)
        challenger = self.challenger
        if challenger is not None and len(challenger.incidents):
            self._shadow_out.extend(challenger.incidents.sweep_idle(now, self._shadow_context(challenger)))
        return len(idle)

    def _restore_key_state(self, key: str, extra: bytes) -> None:
        try:
            version = extra[0] if extra else 0
            if version == 1:  # written before keys had their own normal
                _, n_incident, n_calibration = _KEY_STATE_V1.unpack_from(extra)
                n_normal, start = 0, _KEY_STATE_V1.size
            else:
                version, n_incident, n_calibration, n_normal = _KEY_STATE.unpack_from(extra)
                start = _KEY_STATE.size
            if version not in (1, _KEY_STATE_VERSION) or len(extra) != start + n_incident + n_calibration + n_normal:
                raise ValueError(f"key state version {version} of {len(extra)} bytes not understood")
            if n_incident:
                self.incidents.adopt_key(key, orjson.loads(extra[start:start + n_incident]), self.key_clock())
            adopt = getattr(self.threshold, "adopt_key", None)
            if n_calibration and adopt is not None:
                adopt(key, extra[start + n_incident:start + n_incident + n_calibration])
            if n_normal and self.key_normal is not None:
                self.key_normal.adopt_key(key, extra[start + n_incident + n_calibration:])
        except (ValueError, struct.error) as exc:  # orjson.JSONDecodeError is a ValueError
            self.windows.restore_failures += 1
            log.warning("alert state of key %r not restored (%s); its window was", key, exc)

    def _count_eviction(self, reason: str, n: int) -> None:
        self.stats.evicted[reason] += n

    def _alert_context(self) -> dict[str, Any]:
        return {"model_version": self.artifact.version, "model_kind": self.artifact.kind, "window_size": self.window}

    def _shadow_context(self, challenger: Challenger) -> dict[str, Any]:
        return {"model_version": challenger.version, "model_kind": challenger.artifact.kind, "window_size": self.window}

    def _drop_key_state(self, key: str, reason: str) -> None:
        """A key's window was dropped: its threshold state goes too, and an open incident is closed."""
        evict = getattr(self.threshold, "evict", None)
        if evict is not None:
            evict(key)
        if self.key_normal is not None:
            self.key_normal.evict(key)
        challenger = self.challenger
        if challenger is not None:  # in memory only: a handed-over key's shadow incident ends here too
            evict = getattr(challenger.threshold, "evict", None)
            if evict is not None:
                evict(key)
            shadow = challenger.incidents.drop(key, REVOKED if reason == DROPPED_REVOKED else EVICTED,
                                               self._shadow_context(challenger))
            if shadow is not None:
                self._shadow_out.append(shadow)
        if reason == DROPPED_REVOKED and self.windows.restore is not None:
            # Handed over, not ended: the new owner restores the incident with the key's snapshot.
            self.incidents.forget(key)
            return
        msg = self.incidents.drop(key, REVOKED if reason == DROPPED_REVOKED else EVICTED, self._alert_context())
        if msg is not None:
            self._closed.append(msg)
            self.stats.alerts += 1

    def acknowledge(self, key: str, incident_id: str) -> dict[str, Any] | None:
        """An ``expected_change`` verdict: when ``incident_id`` is the key's open incident here, closes
        it (reason ``acknowledged``) and restarts the key's threshold warm-up; returns the close
        message to publish (None when the incident is not open here: closed already, or another
        worker's key). The key's snapshot is written again with its next batch."""
        inc = self.incidents.get(key)
        if inc is None or not inc.opened or inc.id != incident_id:
            return None
        message = self.incidents.drop(key, ACKNOWLEDGED, self._alert_context())
        restart = getattr(self.threshold, "restart_warmup", None)
        if restart is not None:
            restart(key)
        challenger = self.challenger
        if challenger is not None:  # an expected change of the key, whichever model judges it
            shadow = challenger.incidents.drop(key, ACKNOWLEDGED, self._shadow_context(challenger))
            if shadow is not None:
                self._shadow_out.append(shadow)
            restart = getattr(challenger.threshold, "restart_warmup", None)
            if restart is not None:
                restart(key)
        self.windows.mark_touched(key)
        self.stats.alerts += 1
        return message

    def drain_closed(self) -> list[dict[str, Any]]:
        """Close messages not tied to a scored window (key evicted or revoked, incident idle).

        Publish them before the alerts of the batch just finished: a key evicted and seen again in
        one batch has its old incident closed before a new one opens.
        """
        closed, self._closed = self._closed, []
        return closed

    def swap_model(self, artifact: ModelArtifact, scorer: Callable[[np.ndarray], Scores],
                   threshold: ThresholdPolicy | None = None) -> None:
        """Serves another model from the next micro-batch on; its windows must fit the ones held."""
        self._check_fits(artifact)
        self._pending_model = (artifact, scorer, threshold)

    def set_challenger(self, artifact: ModelArtifact, scorer: Callable[[np.ndarray], Scores],
                       threshold: ThresholdPolicy | None = None) -> None:
        """Shadows the champion with ``artifact`` from the next micro-batch on (its windows must fit
        the ones held): scored on the same windows, judged with its own threshold policy (a new one
        by default) and incident tracker (the champion's alert policy)."""
        self._check_fits(artifact)
        if threshold is None:
            threshold = build_threshold_policy(artifact, self._thresholds, self._max_keys)
        self._pending_challenger = (Challenger.build(artifact, scorer, threshold, self.incidents.policy),)

    def drop_challenger(self) -> None:
        """No challenger from the next micro-batch on (its open shadow incidents close as ``stopped``)."""
        self._pending_challenger = (None,)

    def promote_challenger(self) -> None:
        """The challenger serves as the champion from the next micro-batch on, with its threshold
        policy as it stands (its keys' warm-up is not restarted) and the champion's incidents (the
        threads published on the alerts topic go on); its shadow incidents close as ``stopped``."""
        challenger = self._pending_challenger[0] if self._pending_challenger is not None else self.challenger
        if challenger is None:
            raise ArtifactError("no challenger to promote")
        self._pending_model = (challenger.artifact, challenger.scorer, challenger.threshold)
        self._pending_challenger = (None,)

    def _apply_pending_challenger(self) -> None:
        new, = self._pending_challenger  # type: ignore[misc]
        self._pending_challenger = None
        old = self.challenger
        if old is not None and old is not new:
            self._shadow_out.extend(old.incidents.close_all(STOPPED, self._shadow_context(old)))
        self.challenger = new

    @property
    def shadow_pending(self) -> bool:
        """Whether :meth:`drain_shadow` has anything (never, without a challenger)."""
        return bool(self._shadow_out) or self.shadow_counts.judged > 0

    def drain_shadow(self) -> tuple[list[dict[str, Any]], ShadowCounts]:
        """The challenger's alert messages (for the shadow topic, in order) and the verdict counts
        since the last drain."""
        out, self._shadow_out = self._shadow_out, []
        counts, self.shadow_counts = self.shadow_counts, ShadowCounts()
        return out, counts

    def _check_fits(self, artifact: ModelArtifact) -> None:
        if (artifact.window != self.window or artifact.profile.to_config() != self.profile.to_config()
                or artifact.feature_names != self.profile.feature_names
                or KeyNormalConfig.from_metadata(artifact.metadata) != KeyNormalConfig.from_metadata(self.artifact.metadata)):
            raise ArtifactError(
                f"model {artifact.version} does not fit the windows being served (profile, features or window "
                f"(or per-key normal) differ from {self.artifact.version}); restart the worker to switch to it")

    def _apply_pending_model(self) -> None:
        artifact, scorer, threshold = self._pending_model  # type: ignore[misc]
        self._pending_model = None
        self.artifact, self.scorer = artifact, scorer
        if threshold is not None:
            self.threshold = threshold
        self.drift = FeatureDrift.for_artifact(artifact, self.drift.halflife)  # against the new model's training

    def prepare(self, records: Sequence[RawRecord], first_row: int = 0) -> PreparedBatch:
        """Decodes, validates and windows ``records``; their ready windows are copied into the batch
        buffer from row ``first_row`` on.

        A micro-batch may be prepared in parts (each from the row where the previous one ended) so
        that one part is scored while the next is prepared; a model swap is applied only at the
        first part, never between the parts of one micro-batch.
        """
        if first_row == 0:
            if self._pending_model is not None:
                self._apply_pending_model()
            if self._pending_challenger is not None:
                self._apply_pending_challenger()
            self._flip_buffer()
        now = self.key_clock()
        if now >= self._next_idle_sweep:
            self.windows.evict_idle(now)
            self._next_idle_sweep = now + 1.0
        if first_row + len(records) > len(self._batch):
            # Earlier parts keep their views of the old buffer (still being scored, maybe).
            self._grow_buffer(first_row + len(records))
        rows = self._batch
        if self.key_normal is not None:
            self.key_normal.target = self._normal_buffers[0]
        batch = PreparedBatch(windows=rows[:0], events=[], records=[], challenger=self.challenger)
        n = first_row
        for record in records:
            # Nothing one message holds may escape its batch: whatever a decoder or a profile raises
            # on it, it is refused with a reason like any invalid message (a try costs nothing
            # while nothing is raised).
            try:
                decoded = self.decoder.decode(record.value, record)
            except RegistryUnavailable:
                raise  # the message may be valid: its batch fails and is redelivered, never dead-lettered
            except Exception as exc:
                decoded = Invalid(DECODE_FAILED, f"{type(exc).__name__}: {exc}"[:200])
            if isinstance(decoded, Invalid):
                batch.invalid.append((record, decoded))
                self.stats.invalid[decoded.reason] += 1
                continue
            try:
                n = self._add_event(decoded, record, batch, rows, n, now)
            except KeyPartitionMismatch as exc:
                invalid = Invalid(KEY_PARTITION_MISMATCH, str(exc)[:200])
                batch.invalid.append((record, invalid))
                self.stats.invalid[invalid.reason] += 1
            except Exception as exc:
                invalid = Invalid(WINDOW_FAILED, f"{type(exc).__name__}: {exc}"[:200])
                batch.invalid.append((record, invalid))
                self.stats.invalid[invalid.reason] += 1
        self.stats.consumed += len(records)
        batch.windows = rows[first_row:n]
        self._attach_normals(batch, first_row, n)
        return batch

    def prepare_events(self, events: Sequence[Event]) -> PreparedBatch:
        """Already-decoded events (the replay evaluator's path)."""
        now = self.key_clock()
        if self._pending_model is not None:
            self._apply_pending_model()
        if self._pending_challenger is not None:
            self._apply_pending_challenger()
        self._flip_buffer()
        if len(events) > len(self._batch):
            self._grow_buffer(len(events))
        rows = self._batch
        if self.key_normal is not None:
            self.key_normal.target = self._normal_buffers[0]
        batch = PreparedBatch(windows=rows[:0], events=[], records=[], challenger=self.challenger)
        n = 0
        empty = RawRecord(None)
        for event in events:
            n = self._add_event(event, empty, batch, rows, n, now)
        self.stats.consumed += len(events)
        batch.windows = rows[:n]
        self._attach_normals(batch, 0, n)
        return batch

    def _grow_buffer(self, rows: int) -> None:
        self._buffers[0] = np.zeros((rows,) + self._batch.shape[1:], dtype=np.float32)
        features = self.profile.n_features
        self._normal_buffers[0] = (np.zeros((rows, features), dtype=np.float32),
                                   np.ones((rows, features), dtype=np.float32))

    def _attach_normals(self, batch: PreparedBatch, first_row: int, n: int) -> None:
        """Gives the batch its windows' key normals (applied in :meth:`score`, off the event loop)."""
        if self.key_normal is None:
            return
        self.key_normal.flush()
        offsets, inv_scales = self._normal_buffers[0]
        batch.offsets, batch.inv_scales = offsets[first_row:n], inv_scales[first_row:n]

    @property
    def _batch(self) -> np.ndarray:
        """The row buffer of the micro-batch being prepared."""
        return self._buffers[0]

    def _flip_buffer(self) -> None:
        """A new micro-batch takes the other row buffer (the previous batch's may still be scored)."""
        self._buffers.reverse()
        self._normal_buffers.reverse()

    def _add_event(self, event: Event, record: RawRecord, batch: PreparedBatch, rows: np.ndarray, n: int,
                   now: float) -> int:
        slot = self.windows.add(event, now, record.partition, record.offset, record.key, record.repartitioned,
                                record.origin_partition, record.origin_offset)
        if slot is None:
            batch.warming_up += 1
            self.stats.warming_up += 1
            return n
        if slot == REPLAYED:
            batch.replayed += 1
            self.stats.replayed += 1
            return n
        if slot == FORWARD:
            batch.forward.append((record, event.key))
            self.stats.repartitioned += 1
            return n
        store = self.windows.store
        if (self.score_stride > 1 and (store.count(slot) - self.window) % self.score_stride
                and store.events_per_s(slot) > self.hot_key_rate):
            batch.unscored += 1
            self.stats.unscored += 1
            return n
        store.copy_window(slot, rows[n])
        normal = self.key_normal
        if normal is not None:  # scaled in bulk, before the key's normal next changes (KeyNormal.defer, inlined)
            pending = normal.pending
            pending.append(n)
            pending.append(normal.rows[event.key])
            normal.pending_keys.add(event.key)
        batch.events.append(event)
        batch.records.append(record)
        return n + 1

    def score(self, batch: PreparedBatch) -> Scores:
        """The model call (the worker runs it in its inference thread); windows of a model with
        per-key normals are scaled by them first, here, off the event loop."""
        if batch.offsets is not None:
            KeyNormal.apply(batch.windows, batch.offsets, batch.inv_scales)  # type: ignore[arg-type]
            batch.offsets = batch.inv_scales = None
        # The newest event of each window, kept for the threshold policy: the buffer is reused for
        # a later batch while this one is judged.
        batch.newest = batch.windows[:len(batch.events), -1, :].copy()
        scores = self.scorer(batch.windows)
        challenger = batch.challenger
        if challenger is not None:  # the same windows, one more model call in the same step
            try:
                batch.shadow = challenger.scorer(batch.windows)
            except Exception as exc:  # the challenger never fails a batch: the champion judges it alone
                batch.shadow = None
                challenger.score_failures += 1
                log.warning("challenger %s failed to score a batch (%s: %s); the champion's verdicts stand",
                            challenger.version, type(exc).__name__, exc)
        return scores

    def finish(self, batch: PreparedBatch, scores: Scores) -> list[Decision]:
        """Thresholds, then the alert lifecycle; each decision carries the message its window triggered.

        Out-of-band close messages (idle incidents, evicted keys) are collected for :meth:`drain_closed`.
        With a challenger's scores, its verdicts and messages are collected for :meth:`drain_shadow`.
        """
        now = self.key_clock()  # an incident's silence, like a key's idle time, is not measured by the wall clock
        context = self._alert_context()
        self.sweep_idle()
        keys = [e.key for e in batch.events]
        # The newest rows copied at scoring time: the row buffer may hold the next batch by now.
        newest = batch.newest
        self.drift.observe(newest[:, None, :] if newest is not None else batch.windows[: len(keys)])
        values = np.asarray(scores.scores[: len(keys)], dtype=np.float64)
        decisions, over, alerts = self._decide(self.threshold, self.incidents, context, batch.events, batch.records,
                                               keys, values, scores.feature_errors, newest, now)
        self.stats.alerts += alerts
        self.stats.over_threshold += int(over.sum())
        self.stats.scored += len(batch.events)
        if batch.challenger is not None and batch.shadow is not None:
            self._judge_shadow(batch.challenger, batch, batch.shadow, keys, over, now)
        return decisions

    def _judge_shadow(self, challenger: Challenger, batch: PreparedBatch, shadow: Scores, keys: list[str],
                      champion_over: np.ndarray, now: float) -> None:
        """The challenger's verdicts on the windows the champion judged; a window whose challenger score is
        NaN or infinite is not judged by it (nor counted)."""
        values = np.asarray(shadow.scores[: len(keys)], dtype=np.float64)
        errors = np.asarray(shadow.feature_errors[: len(keys)])
        events, records, newest = batch.events, batch.records, batch.newest
        finite = np.isfinite(values)
        if not finite.all():
            keep = np.flatnonzero(finite)
            rows = keep.tolist()
            events, records = [events[i] for i in rows], [records[i] for i in rows]
            keys = [keys[i] for i in rows]
            values, errors, champion_over = values[keep], errors[keep], champion_over[keep]
            newest = newest[keep] if newest is not None else None
            if not rows:
                return
        decisions, over, alerts = self._decide(challenger.threshold, challenger.incidents,
                                               self._shadow_context(challenger), events, records, keys, values,
                                               errors, newest, now)
        self.shadow_counts.add(np.asarray(champion_over, dtype=bool), np.asarray(over, dtype=bool))
        if alerts:
            self._shadow_out.extend(d.alert for d in decisions if d.alert is not None)

    def _decide(self, threshold: ThresholdPolicy, incidents: IncidentTracker, context: dict[str, Any],
                events: list[Event], records: list[RawRecord], keys: list[str], values: np.ndarray,
                feature_errors: np.ndarray, newest: np.ndarray | None,
                now: float) -> tuple[list[Decision], np.ndarray, int]:
        """One model's verdicts on scored windows: its threshold policy, then its incidents; the
        decisions, whether each window was over, and how many alert messages they carry."""
        judge = getattr(threshold, "judge", None)
        assess = getattr(threshold, "assess", None)
        if judge is not None:  # a policy that reads the newest event's values too (tail calibration)
            limits = judge(keys, values, newest)
            over = values > limits
        elif assess is not None:
            limits = assess(keys, values)
            over = values > limits
        else:  # a policy with only the minimal protocol
            over = np.asarray(threshold.exceeds(keys, values), dtype=bool)
            limits = np.array([threshold.value_for(k) for k in keys], dtype=np.float64)
        decisions: list[Decision] = []
        over_rows = np.flatnonzero(over)
        tops = dict(zip(over_rows.tolist(), top_features_of_rows(
            self.profile.feature_names, feature_errors[over_rows], self.top_features)))
        observe = incidents.observe
        store = self.windows.store
        tracked = incidents.tracking  # keys with an incident (open or pending)
        # Hysteresis: with a policy that has it, an open incident closes only after windows clearly
        # back to normal (severity under calm_below), not after windows just under the threshold.
        calm_below = float(getattr(threshold, "calm_below", 1.0))
        append = decisions.append
        alerts = 0
        # Plain floats and bools, converted once for the batch (a numpy scalar per event costs more).
        for i, (event, score, limit, is_over) in enumerate(zip(events, values.tolist(), limits.tolist(),
                                                              over.tolist())):
            ratio = severity(score, limit)
            if not is_over and event.key not in tracked:  # the common case: nothing going on for the key
                append(Decision(event, records[i], score, limit, None, False, ratio))
                continue
            info = WindowInfo(event.event_id, event.timestamp, score, limit, tops[i]) if is_over else None
            calm = is_over or ratio is None or ratio <= calm_below
            alert = observe(event.key, is_over, info, now, context, store.gap_of(event.key), calm)
            if alert is not None:
                alerts += 1
            append(Decision(event, records[i], score, limit, alert, is_over, ratio))
        return decisions, over, alerts

    def process(self, records: Sequence[RawRecord]) -> tuple[list[Decision], PreparedBatch]:
        """All three steps in one call (tests, offline replay)."""
        batch = self.prepare(records)
        return self.finish(batch, self.score(batch)), batch
