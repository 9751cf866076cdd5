"""The Faust worker: Kafka in, :class:`~stream_detector.detector.Detector` in the middle, alerts out.

This is the one place where the pieces are wired together. Per micro-batch (adaptive, see
:mod:`~stream_detector.batching`; or Faust's ``stream.take_events(batch_max, within)``):

1. decode and window the batch on the event loop (fast, per event);
2. score it on a dedicated thread, so heartbeats and commits never stall: on CPU in parts of 256
   events, each scored while the loop windows the next, and judged while the last are scored;
   on CUDA in one model call;
3. judge it (thresholds, incidents) and send its alerts and dead letters (through
   :mod:`~stream_detector.kafka.output`'s producer, not Faust's);
4. hand it to the :class:`Settler`, which, on a task of its own and in batch order, waits until the
   broker has acknowledged them, writes the window state the batch changed to the changelog
   (below), and acks the batch's offsets (Faust commits them later) once that is written. The
   loop does not wait for the broker: it goes on with the next batch at once.

With ``batch_pipeline`` (the default), under a backlog (a full micro-batch or more already
waiting) batches are pipelined: batch k is windowed and queued for the model before batch k-1 is judged,
so the model thread scores k while the loop judges k-1 and sends its alerts. The window part of
batch k-1's snapshots is taken before batch k's events enter the windows, the incident and
threshold part once k-1 is judged, and both are sent once k-1's alerts are acknowledged. Below a
backlog a batch is finished at once: overlapping it with the next would hold its alerts back
while the next is windowed. (Two row buffers in the detector keep k-1's windows
intact while k is windowed; a model swap is never overlapped: k-1 is judged against its own model.)

Agent concurrency stays 1: with more, faust-streaming can commit offsets ahead of unfinished
events (faust-streaming issue #606). Faust's consumer itself is kept up by
:mod:`~stream_detector.kafka.faust_fastpath` (per-event delivery without tasks, a fetcher that
wakes when a paused partition resumes, a short broker fetch wait) and a stream buffer larger
than one fetch. :mod:`~stream_detector.kafka.faust_fixes` fixes a race in Faust's rebalance
recovery that dropped the first events fetched for a new assignment, and reads a changelog
partition again when its restore stalls.

Window state survives restarts and rebalances: at a batch boundary (sent after the alerts of every
event it covers are acknowledged), the keys that first changed ``state_flush_s`` ago or more (1 s
by default) are written to a compacted changelog (a Faust table's changelog topic, partitioned like
the input): one write per busy key per interval, not per batch, spread over the batches. Once the
broker has the snapshots covering a batch (every key changed up to its end), its input events are
acked; the next batches are handled while the writes are in flight, up to ``WRITES_IN_FLIGHT``.
A crash re-delivers the events not yet acked, which the restored windows take again. Faust
restores the changelog of newly assigned partitions before the agent resumes, and a key's window
is taken from it the first time the key is seen. Each snapshot records the offset of the key's
last event, so records redelivered after a crash are recognised and not appended twice; since
snapshots are written only after the alerts they follow, a recognised record has already been
scored and alerted.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import faust
import orjson

from .artifacts import ArtifactError, ModelArtifact, load_artifact, read_signing_key
from .registry import load_served, served_candidates
from .batching import ack_events, adaptive_batches, pending_events
from .detector import Detector, PreparedBatch, RawRecord
from .events import Invalid
from .kafka import faust_fastpath, faust_fixes
from .kafka.admin import ensure_topics, partition_count
from .kafka.output import Deliveries, OutputProducer
from .kafka.security import confluent_config, faust_credentials
from .metrics import WorkerMetrics, observe_many
from .scoring import ModelRunner, inference_executor, worker_threads
from .settings import Settings
from .incidents import AlertPolicy
from .thresholds import ThresholdConfig, build_threshold_policy
from .alerts import encode_alert

log = logging.getLogger("stream_detector.worker")
# Batches whose window snapshots may be on their way to the changelog while the next is handled
# (under a backlog): the worker does not wait a broker round trip per batch; offsets still wait.
WRITES_IN_FLIGHT = 4
# Judged batches waiting for their alerts to be acknowledged before the loop waits too.
SETTLING_MAX = 32


@dataclass(slots=True)
class Scoring:
    """A micro-batch windowed and being scored on the inference thread, in parts (in order)."""

    events: list[Any]  # Faust events, acked once the batch's snapshots are written
    parts: list[tuple[PreparedBatch, asyncio.Future | None]]  # each part's scores; None: none scored
    sent: Deliveries  # its dead letters, then its alerts


@dataclass(slots=True)
class Published:
    sent: Deliveries
    messages: list[tuple[dict[str, Any], RawRecord | None]]  # alert messages, with their records
    dead_letters: int


@dataclass(slots=True)
class Snapshots:
    """Changelog records (key, snapshot or None for a delete, partition) taken at a batch boundary."""

    items: list[tuple[bytes, bytes | None, int]]
    revocations: int  # revocations seen when they were taken
    keys: list[str]  # keys whose item is a window part still to be completed (the last items), in order
    covers: int | None  # once written, the events of micro-batches up to this one are covered


class Settler:
    """Finishes micro-batches in order on a task of its own, so the loop never waits for the broker.

    Per batch, in the order the batches were judged: its alerts and dead letters are awaited (the
    broker has them), then its window snapshots, if it carries any, are sent (so a snapshot never
    runs ahead of the alerts it follows, and a key's snapshots reach the changelog in order), and
    once the broker has those, the input events they cover are acked (Faust may commit them). The
    loop meanwhile takes, windows and judges the next batches: a slow acknowledgement (the broker
    occasionally takes 50 to 100 ms) delays commits, not the alerts of the events behind it.
    Bounded: the loop waits once ``SETTLING_MAX`` batches are waiting to be settled.
    """

    def __init__(self, publish: Callable[[Published], Awaitable[None]],
                 send_snapshots: Callable[[Snapshots], Awaitable[Any] | None],
                 ack: Callable[[list[Any]], Awaitable[None]], assignment: Callable[[], Any],
                 generation: Callable[[], Any] = lambda: None):
        self._publish, self._send_snapshots, self._ack, self._assignment = publish, send_snapshots, ack, assignment
        self._generation = generation
        self._queue: asyncio.Queue[tuple[Published | None, Snapshots | None, list[Any], int] | None] = \
            asyncio.Queue(maxsize=SETTLING_MAX)
        # Settled micro-batches (number, events) whose events no written snapshot covers yet.
        self._unacked: deque[tuple[int, list[Any]]] = deque()
        # Snapshot writes the broker has not acknowledged yet, oldest first, each with the events it
        # covers: under a backlog up to WRITES_IN_FLIGHT stay out while the next batches settle.
        self._writing: deque[tuple[Awaitable[Any] | None, list[Any]]] = deque()
        self._task = asyncio.ensure_future(self._run())

    def check(self) -> None:
        """Raises what stopped the settler (an undeliverable alert or snapshot), if anything did."""
        if self._task.done() and not self._task.cancelled():
            self._task.result()

    async def put(self, published: Published | None, snapshots: Snapshots | None, events: list[Any],
                  batch: int = -1) -> None:
        """Hands over a judged micro-batch (its alerts sent) numbered ``batch``, with its events, and
        the snapshots collected at its end (if any)."""
        self.check()
        if self._queue.full():  # the broker is behind: wait, but not past the settler's failure
            put = asyncio.ensure_future(self._queue.put((published, snapshots, events, batch)))
            await asyncio.wait({put, self._task}, return_when=asyncio.FIRST_COMPLETED)
            if not put.done():
                put.cancel()
                self.check()
            return
        self._queue.put_nowait((published, snapshots, events, batch))

    def unsettled(self) -> int:
        """Events handed over and not acked yet."""
        return (sum(len(item[2]) for item in self._queue._queue if item is not None)  # type: ignore[attr-defined]
                + sum(len(events) for _, events in self._unacked)
                + sum(len(covered) for _, covered in self._writing))

    async def close(self) -> None:
        """Settles everything handed over (raises if that fails) and stops."""
        self.check()
        await self._queue.put(None)
        await self._task

    def cancel(self) -> None:
        self._task.cancel()

    async def _run(self) -> None:
        queue = self._queue
        while True:
            item = await queue.get()
            if item is None:
                await self._settle_writes(wait=True)
                return
            published, snapshots, events, batch = item
            unacked = self._unacked
            if events:
                unacked.append((batch, events))
            if published is not None:
                await self._publish(published)
            if snapshots is not None:
                sent = self._send_snapshots(snapshots)
                covered: list[Any] = []
                while unacked and snapshots.covers is not None and unacked[0][0] <= snapshots.covers:
                    covered.extend(unacked.popleft()[1])
                if sent is not None or covered:
                    self._writing.append((sent, covered))
            # Nothing behind: wait for the writes now, so that the offsets are committed soon.
            await self._settle_writes(wait=queue.empty())

    async def _settle_writes(self, wait: bool) -> None:
        """Acks, in order, the events of every write that is in the changelog (all of them when
        ``wait``; else at most ``WRITES_IN_FLIGHT`` writes stay out)."""
        writing = self._writing
        while writing:
            written, covered = writing[0]
            if written is not None:
                if not written.done() and not wait and len(writing) <= WRITES_IN_FLIGHT:
                    break
                await written  # in the changelog before the offsets may be committed (raises if not)
            writing.popleft()
            if covered:
                # Not events of partitions revoked since: Faust forgot their acks at the revocation,
                # and a late ack would bring back a stale committable offset for them.
                # Nor events fetched before a rebalance whose partition came back to this worker: Faust
                # forgot their partition's acks and committed offset at the revocation, re-delivers
                # them from the committed offset, and an ack from the old generation would be booked
                # into the new one's (seen as commits stuck for good on the two-worker rebalance test).
                assigned, generation = self._assignment(), self._generation()
                await self._ack([e for e in covered if e.message.tp in assigned
                                 and getattr(e.message, "generation_id", generation) == generation])


def _broker_url(bootstrap_servers: str) -> str:
    return ";".join(f"kafka://{server.strip()}" for server in bootstrap_servers.split(",") if server.strip())


class DetectorService:
    """Loads the model, owns the detector, and records metrics: everything except Kafka."""

    def __init__(self, settings: Settings, metrics: WorkerMetrics | None = None):
        self.settings = settings
        self.metrics = metrics or WorkerMetrics()
        worker_threads(settings.torch_threads)
        self.signing_key = (read_signing_key(settings.model_signing_key_file)
                            if settings.model_signing_key_file else None)
        # The champion (a champion that fails to load is an error); without aliases the newest
        # version by creation time that loads.
        artifact = load_served(settings.model_path, signing_key=self.signing_key)
        self.runner = ModelRunner(artifact, device=settings.device, max_batch=settings.batch_max)
        self._refused: set[str] = set()
        self.threshold_config = ThresholdConfig.from_settings(settings)
        threshold = build_threshold_policy(artifact, self.threshold_config, settings.max_keys)
        self.detector = Detector(
            artifact,
            scorer=self._scorer_for(self.runner),
            threshold=threshold,
            key_field=settings.key_field,
            max_keys=settings.max_keys,
            key_ttl_s=settings.key_ttl_s,
            max_message_bytes=settings.max_message_bytes,
            top_features=settings.top_features,
            max_batch=settings.batch_max,
            max_future_s=settings.max_future_s,
            alerting=AlertPolicy.from_settings(settings),
            score_stride=settings.score_stride,
            hot_key_rate=settings.hot_key_rate,
        )
        self.detector.windows.store.on_evict = self._on_evict
        self.suppressed_seen = 0  # incidents_suppressed already counted in metrics
        self.executor = inference_executor(settings.torch_threads)
        self._announce(artifact, threshold.value)

    def _announce(self, artifact: ModelArtifact, threshold: float) -> None:
        self.metrics.model_info.info({
            "version": artifact.version,
            "kind": artifact.kind,
            "profile": artifact.profile.name,
            "window": str(artifact.window),
            "features": ",".join(artifact.feature_names),
            "device": str(self.runner.device),
        })
        self.metrics.model_threshold.set(threshold)
        log.info("serving model %s (%s, profile %s, window %d) on %s, threshold %.4g",
                 artifact.version, artifact.kind, artifact.profile.name, artifact.window, self.runner.device,
                 threshold)

    def _load_runner(self, path) -> ModelRunner:
        return ModelRunner(load_artifact(path, signing_key=self.signing_key), device=self.settings.device,
                           max_batch=self.settings.batch_max)

    def _reload_target(self):
        """The version to serve now: the champion, or (no aliases) the newest not yet refused."""
        try:
            candidates = served_candidates(self.settings.model_path)
        except ArtifactError:
            return None
        for path in candidates:
            if path == self.runner.artifact.path:
                return None  # already serving the preferred version
            if str(path) not in self._refused:
                return path
        return None

    async def maybe_reload(self) -> bool:
        """Hot reload: serve the champion (or, without aliases, a newer version) from the next
        micro-batch on, once the alias moves or the version appears.

        Loading and checking happen on the inference thread; a version that fails (checksum,
        signature, format, shape) is refused once, logged and counted, and the running model keeps serving.
        """
        newest = self._reload_target()
        if newest is None:
            return False
        loop = asyncio.get_running_loop()
        try:
            runner = await loop.run_in_executor(self.executor, self._load_runner, newest)
            artifact = runner.artifact
            threshold = build_threshold_policy(artifact, self.threshold_config, self.settings.max_keys)
            self.detector.swap_model(artifact, self._scorer_for(runner), threshold)
        except Exception as exc:  # a bad artifact must never take the worker down
            self._refused.add(str(newest))
            self.metrics.model_reload_failures.inc()
            log.error("model %s refused, still serving %s: %s", newest, self.runner.version, exc)
            return False
        self.runner = runner
        self.metrics.model_reloads.inc()
        self._announce(artifact, threshold.value)
        return True

    def _on_evict(self, reason: str, n: int) -> None:
        self.detector.stats.evicted[reason] += n
        self.metrics.keys_evicted.labels(reason=reason).inc(n)

    def _scorer_for(self, runner: ModelRunner):
        def timed_score(windows):
            started = time.perf_counter()
            scores = runner.score(windows)
            self.metrics.inference_seconds.observe(time.perf_counter() - started)
            return scores

        return timed_score


def create_app(settings: Settings, service: DetectorService, input_partitions: int = 1) -> faust.App:
    """The Faust app; its ``output`` attribute is the producer to close once the worker stops."""
    faust_fixes.install()  # a rebalance race that loses events (always: it is a fix, not a speed-up)
    if settings.consumer_fast_path:
        faust_fastpath.install()
    else:
        faust_fastpath.uninstall()
    app = faust.App(
        settings.consumer_group,
        broker=_broker_url(settings.bootstrap_servers),
        broker_credentials=faust_credentials(settings),
        autodiscover=False,
        store="memory://",
        web_enabled=False,
        value_serializer="raw",
        key_serializer="raw",
        consumer_auto_offset_reset=settings.auto_offset_reset,
        producer_acks=-1,  # Faust's producer is not used for output (see `out` below)
        broker_commit_interval=1.0,
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=min(3.0, settings.session_timeout_s / 3),
        topic_allow_declare=True,  # the window-state changelog topic is created by Faust
        # No standby replicas of the window table: with an in-memory store a newly assigned partition
        # is read from the start of its changelog anyway (a standby copy would be read and held for
        # nothing), and Faust's standby-to-active hand-over can leave a recovery waiting forever.
        table_standby_replicas=0,
        stream_buffer_maxsize=settings.stream_buffer_max,
        loghandlers=[],
    )
    faust_fastpath.set_fetch_max_wait(app, settings.fetch_max_wait_ms)
    if settings.consumer_fast_path:
        faust_fastpath.skip_unused_per_event_work(app)
    # The worker reads each event's message bytes itself; with the fast path Faust does not decode them.
    source = app.topic(settings.input_topic, key_serializer="raw", value_serializer="raw",
                       schema=faust_fastpath.RawEvents() if settings.consumer_fast_path else None)
    # Everything the worker writes (alerts, dead letters, scores, snapshots) goes through `out`.
    out = app.output = OutputProducer(settings.bootstrap_servers, confluent_config(settings))
    alerts_topic, dead_letter_topic, scores_topic = (settings.alerts_topic, settings.dead_letter_topic,
                                                     settings.scores_topic)
    detector, metrics = service.detector, service.metrics
    # Window state, changelog-backed. Written with explicit partitions (the input record's), read
    # back lazily per key; never modified through the table API, which would pick partitions itself.
    # Faust declares the changelog topic and restores from it; the writes go through `out`.
    state = app.Table("windows", partitions=input_partitions, key_type=bytes, value_type=bytes,
                      help="per-key window snapshots")
    changelog_topic = state.changelog_topic.get_topic_name()
    store = detector.windows.store

    def restore(key: str) -> bytes | None:
        blob = state.data.pop(key.encode(), None)  # the live copy is the window store from now on
        if blob is not None:
            metrics.keys_restored.inc()
        return blob

    # Changelog deletes of evicted keys, sent with the next snapshots (first), so that a key's
    # snapshot collected before its eviction can never land after its tombstone.
    tombstones: list[tuple[bytes, int]] = []
    revocations: list[set[int]] = []  # partitions revoked, in order: snapshots of those are not sent

    def tombstone(key: str, slot: int) -> None:
        if store.is_persisted(slot):  # nothing to delete for a key never written
            tombstones.append((key.encode(), store.position(slot)[0]))

    detector.windows.restore = restore
    store.on_evict_key = tombstone

    def collect_windows(sealed_by: float | None = None) -> Snapshots | None:
        """The window part of the snapshots of the changed keys that are due (those first changed by
        micro-batches sealed by ``sealed_by``; all with None), as they stand now: at a batch boundary,
        before the next batch's events enter the windows. :func:`complete` adds each key's incident
        and threshold state once the batch is judged. None when nothing is due."""
        windows = detector.windows
        if sealed_by is None:
            covers = windows.newest_sealed
            touched = windows.drain_touched()
        else:
            touched, covers = windows.drain_sealed(sealed_by)
        if not touched and covers is None and not tombstones:
            return None
        items: list[tuple[bytes, bytes | None, int]] = [(key, None, partition) for key, partition in tombstones]
        tombstones.clear()
        keys: list[str] = []
        min_events = settings.state_min_events
        window_snapshot, position = store.snapshot, store.position
        for key, slot in touched.items():
            # Not evicted since; and a key's very first event is not worth a changelog write (a flood
            # of one-off keys would double the traffic): at worst one event is missing from its window.
            if store.slot_of(key) == slot and store.count(slot) >= min_events:
                keys.append(key)
                items.append((key.encode(), window_snapshot(slot), position(slot)[0]))
                store.mark_persisted(slot)
        return Snapshots(items, len(revocations), keys, covers)

    def complete(snapshots: Snapshots | None) -> Snapshots | None:
        """Adds the key state (after the batch's thresholds and incidents) to collected windows."""
        if snapshots is None:
            return None
        key_state = detector.key_state
        items = snapshots.items
        first = len(items) - len(snapshots.keys)  # the tombstones come first
        for i, key in enumerate(snapshots.keys, first):
            name, body, partition = items[i]
            items[i] = (name, body + key_state(key), partition)  # type: ignore[operator]
        snapshots.keys = []
        return snapshots

    def collect_snapshots() -> Snapshots | None:
        """Whole snapshots of every changed key (at a batch boundary: after the batch's thresholds and
        incidents, before the next batch's events)."""
        return complete(collect_windows())

    def send_snapshots(snapshots: Snapshots | None) -> Awaitable[Any] | None:
        """Sends snapshots once the alerts they follow are acknowledged; None if there were none."""
        if snapshots is None:
            return None
        revoked = set().union(*revocations[snapshots.revocations:])
        sent = out.group()
        for key, value, partition in snapshots.items:
            if partition not in revoked:  # its new owner has restored the key already
                sent.send(changelog_topic, key, value, partition)
        metrics.state_writes.inc(len(sent))
        return sent.wait() if len(sent) else None

    @app.on_partitions_revoked.connect
    async def forget_revoked(_app: faust.App, revoked: set, **_: Any) -> None:
        partitions = {tp.partition for tp in revoked if tp.topic == settings.input_topic}
        if partitions:
            revocations.append(partitions)
            dropped = store.drop_partitions(partitions)
            log.info("partitions %s revoked: %d key windows handed over", sorted(partitions), dropped)
            # Snapshots already sent reach the changelog before the partitions' new owner reads it.
            deadline = time.monotonic() + 5.0
            while out.in_flight() and time.monotonic() < deadline:
                await asyncio.sleep(0.005)

    watching_recoveries: list[asyncio.Future] = []

    async def watch_recoveries() -> None:
        while not app.should_stop:
            await app.sleep(5.0)
            await faust_fixes.reread_stalled_changelogs(app, time.monotonic())

    @app.on_partitions_assigned.connect
    async def start_watching_recoveries(_app: faust.App, assigned: set, **_: Any) -> None:
        # A recovery stall in Faust (see faust_fixes), from the first assignment on: timers would start
        # only once the first recovery has completed.
        if not watching_recoveries:
            watching_recoveries.append(app.add_future(watch_recoveries()))

    if settings.model_poll_s > 0:
        @app.timer(interval=settings.model_poll_s)
        async def reload_model() -> None:
            await service.maybe_reload()

    @app.agent(source, concurrency=1)
    async def detect(stream: faust.StreamT) -> None:
        """Micro-batches; with ``batch_pipeline``, pipelined under a backlog (a full batch or more
        waiting): while batch k is scored on the inference thread, the loop judges batch k-1 and
        sends its alerts.

        Per batch: the due keys' windows are snapshotted (before the next batch's events enter
        them); the next batch, if one is already there, is windowed and queued for the model; this
        batch's scores are awaited and judged (thresholds, incidents), its snapshots completed with
        the keys' incident and threshold state, and its alerts sent. The settler then awaits them,
        sends the snapshots and acks the events, while the loop goes on with the next batch. Below a
        backlog the batch is finished at once, so a lone event never waits for another.
        """
        loop = asyncio.get_running_loop()
        # Adaptive batches leave acks to us: a batch is acked once the snapshots covering it are
        # written (its keys `state_flush_s` after they first changed). Faust's take_events acks each
        # batch itself, so with it snapshots are written after every batch and batches are not pipelined.
        deferred = settings.batch_adaptive
        pipelined = deferred and settings.batch_pipeline
        # After 0.1 s without events every changed key is written and every event acked. A rebalance
        # suspends the flow: Faust then waits for the events taken to be acked and commits them before
        # it gives the partitions up. Acks that came later (after a 1 s flush wait) were committed by
        # Faust's next periodic commit, over the new owner's (it commits whatever it has acks for):
        # the two-worker rebalance test saw commits stuck in 4 of 10 runs at 1 s, none in 5 at 0.1 s.
        batches = (adaptive_batches(stream, settings.batch_max, settings.batch_within_s, defer_acks=True,
                                    idle_s=0.1) if deferred
                   else stream.take_events(settings.batch_max, within=settings.batch_within_s))
        # Events of batches whose alerts and snapshots are settled in order on the settler's task, off
        # the loop's path (see `Settler`); the loop counts those not covered by a snapshot yet.
        settler = Settler(publish, send_snapshots, lambda events: ack_events(stream, events),
                          lambda: app.consumer.assignment(), lambda: app.consumer_generation_id)
        concluded = 0  # micro-batches concluded so far: each one's number
        # (number, events) of concluded batches no collected snapshot covers yet, and their events.
        uncovered: deque[tuple[int, int]] = deque()
        unflushed = 0
        flush_at_most = max(50_000, 8 * settings.batch_max)  # events held unacked

        def covered(snapshots: Snapshots | None) -> Snapshots | None:
            nonlocal unflushed
            if snapshots is not None and snapshots.covers is not None:
                while uncovered and uncovered[0][0] <= snapshots.covers:
                    unflushed -= uncovered.popleft()[1]
            return snapshots
        # Windowing the next batch before this one is judged could evict a key of this batch (least
        # recently used) only when the key limit is within two batches of keys.
        overlap_keys = settings.max_keys >= 4 * settings.batch_max

        async def conclude(scoring: Scoring, next_events: list[Any] | None) -> Scoring | None:
            """Finishes ``scoring`` and hands it to the settler; starts ``next_events`` (if any) before
            waiting for the model. Returns the started batch."""
            nonlocal concluded, unflushed
            concluded += 1
            number = concluded
            now = loop.time()
            detector.windows.seal(number, now)  # the keys this batch changed first
            uncovered.append((number, len(scoring.events)))
            unflushed += len(scoring.events)
            # The windows as this batch left them, before the next batch enters them: those of the keys
            # first changed `state_flush_s` ago or more (each changed key is written once per interval,
            # and the writes are spread over the batches; see `FeatureWindows.drain_sealed`), or of
            # every changed key.
            if not deferred or settings.state_flush_s == 0 or unflushed >= flush_at_most:
                snapshots = covered(collect_windows())
            else:
                snapshots = covered(collect_windows(now - settings.state_flush_s))
            started = None
            if next_events and not detector.model_swap_pending and overlap_keys:
                # The next batch is windowed and queued for the model now, so the model thread goes on
                # scoring while this batch is judged. Not across a model swap: this batch is judged
                # against its own model's thresholds.
                started = start(next_events)
            published = await judge(scoring)
            if snapshots is not None:
                complete(snapshots)
            if next_events and started is None:
                started = start(next_events)
            if not deferred:
                await publish(published)
                send_snapshots(snapshots)  # after the alerts: a snapshot never runs ahead of them
                return started
            await settler.put(published, snapshots, scoring.events, number)
            return started

        scoring: Scoring | None = None
        try:
            async for events in batches:
                if scoring is not None:
                    scoring = await conclude(scoring, events)  # and starts this batch
                elif events:
                    scoring = start(events)
                elif deferred and unflushed:  # gone quiet: write every changed key, ack what it covers
                    await settler.put(None, covered(collect_snapshots()), [])
                elif deferred:
                    settler.check()
                # Kept in flight only when pipelining under a backlog: a full batch already there to overlap
                # it with (and only with deferred acks: take_events acks a batch once the next is asked
                # for). Below that the batch is finished first: pipelining would hold its alerts back for
                # as long as the next batch takes to window.
                while scoring is not None and not (pipelined and pending_events(stream) >= settings.batch_max):
                    scoring = await conclude(scoring, None)
        finally:
            async def wind_down() -> None:
                nonlocal scoring
                while scoring is not None:
                    scoring = await conclude(scoring, None)
                if deferred and unflushed:
                    await settler.put(None, covered(collect_snapshots()), [])
                await settler.close()

            try:  # a clean stop: leave nothing to re-deliver
                await asyncio.wait_for(wind_down(), timeout=5.0)
            except Exception as exc:  # stopping anyway; the events are re-delivered and re-applied
                log.info("window state not flushed at stop (%s): %d events will be re-delivered", exc,
                         settler.unsettled() + (len(scoring.events) if scoring is not None else 0))
            finally:
                settler.cancel()

    # A micro-batch is windowed and scored in parts of this many events: the inference thread scores
    # one part while the loop windows the next, and the loop judges the first parts while it scores
    # the last (on CPU the model takes 256 windows per call anyway; on CUDA a micro-batch stays one
    # host-to-device copy and one call).
    part_size = service.runner.chunk or max(settings.batch_max, 1)

    def start(events: list[Any]) -> Scoring:
        """Decodes and windows a batch, sends its dead letters, and starts scoring it off the loop."""
        records = [
            RawRecord(e.message.value, e.message.key, e.message.timestamp, e.message.partition,
                      e.message.offset, tuple(e.message.headers or ()))
            for e in events
        ]
        metrics.events_consumed.inc(len(records))
        loop = asyncio.get_running_loop()
        parts: list[tuple[PreparedBatch, asyncio.Future | None]] = []
        sent = out.group()
        scored = 0
        for first in range(0, len(records), part_size):
            batch = detector.prepare(records[first:first + part_size], first_row=scored)
            scored += len(batch)
            parts.append((batch, loop.run_in_executor(service.executor, detector.score, batch) if len(batch) else None))
            for record, invalid in batch.invalid:
                dead_letter(sent, record, invalid)
        warming_up = sum(batch.warming_up for batch, _ in parts)
        replayed = sum(batch.replayed for batch, _ in parts)
        unscored = sum(batch.unscored for batch, _ in parts)
        if scored:
            metrics.batch_size.observe(scored)
        if warming_up:
            metrics.events_warming_up.inc(warming_up)
        if replayed:
            metrics.events_replayed.inc(replayed)
        if unscored:
            metrics.events_unscored.inc(unscored)
        return Scoring(events, parts, sent)

    def dead_letter(sent: Deliveries, record: RawRecord, invalid: Invalid) -> None:
        metrics.events_invalid.labels(reason=invalid.reason).inc()
        log.warning("invalid event at %s[%d]@%d: %s (%s)", settings.input_topic, record.partition,
                    record.offset, invalid.reason, invalid.detail)
        headers = list(record.headers) + [
            ("x-dlq-reason", invalid.reason.encode()),
            ("x-dlq-detail", invalid.detail.encode("utf-8", "replace")),
            ("x-dlq-source", f"{settings.input_topic}:{record.partition}:{record.offset}".encode()),
        ]
        sent.send(dead_letter_topic, record.key, record.value or b"", headers=headers)

    async def judge(scoring: Scoring) -> Published:
        """Thresholds and incidents for a scored batch; its alerts (and scores) are sent."""
        sent = scoring.sent
        decisions = []
        for batch, scores in scoring.parts:  # judging the first parts while the last are scored
            if scores is not None:
                decisions.extend(detector.finish(batch, await scores))
        metrics.windows_scored.inc(len(decisions))
        # Incident closes of evicted keys and idle incidents go first: a key's old incident is
        # closed before a new one of the same key opens.
        messages: list[tuple[dict[str, Any], RawRecord | None]] = [(m, None) for m in detector.drain_closed()]
        over = 0
        ratios = []
        for d in decisions:
            ratios.append(d.severity if d.severity is not None else d.score)  # score / threshold
            over += d.over
            if d.alert is not None:
                messages.append((d.alert, d.record))
        observe_many(metrics.score_ratio, ratios)
        for message, _ in messages:
            sent.send(alerts_topic, message["key"].encode(), encode_alert(message))
        if scores_topic:
            version = detector.artifact.version
            for d in decisions:
                sent.send(scores_topic, d.event.key.encode(), orjson.dumps({
                    "key": d.event.key, "event_id": d.event.event_id, "event_timestamp": d.event.timestamp,
                    "score": d.score, "threshold": d.threshold, "model_version": version}))
        if over:
            metrics.windows_over_threshold.inc(over)
        lifecycle = detector.incidents
        metrics.incidents_suppressed.inc(lifecycle.stats.suppressed - service.suppressed_seen)
        service.suppressed_seen = lifecycle.stats.suppressed
        metrics.incidents_open.set(lifecycle.open_count)
        metrics.keys_calibrated.set(getattr(detector.threshold, "calibrated_keys", 0))
        metrics.active_keys.set(len(detector.windows))
        return Published(sent, messages, sum(len(batch.invalid) for batch, _ in scoring.parts))

    async def publish(published: Published) -> None:
        """Waits for the broker to acknowledge a batch's alerts and dead letters."""
        if not len(published.sent):
            return
        await published.sent.wait()  # broker acks before the input offsets are acked
        if published.dead_letters:
            metrics.dead_lettered.inc(published.dead_letters)
        done = time.time()
        for message, record in published.messages:
            metrics.alerts_published.inc()
            metrics.alert_messages.labels(state=message["state"]).inc()
            if message["state"] == "close":
                metrics.incidents_closed.labels(reason=message["incident"]["close_reason"]).inc()
            if record is not None and record.timestamp:
                metrics.event_to_alert_seconds.observe(max(done - record.timestamp, 0.0))

    return app


def run_worker(settings: Settings) -> None:
    """Blocks until SIGINT/SIGTERM."""
    from .kafka.security import confluent_config
    from .lag import ConsumerLagMonitor
    from .logs import setup_logging

    # Idempotent; makes the log format right also when run_worker is called without the CLI.
    setup_logging(settings.log_level, json_logs=settings.log_json)
    client_config = confluent_config(settings)
    topics = {settings.input_topic: 1, settings.alerts_topic: 1, settings.dead_letter_topic: 1}
    if settings.scores_topic:
        topics[settings.scores_topic] = 1
    ensure_topics(settings.bootstrap_servers, topics, client_config=client_config)
    partitions = partition_count(settings.bootstrap_servers, settings.input_topic, client_config)
    service = DetectorService(settings)
    service.metrics.serve(settings.metrics_host, settings.metrics_port)
    if settings.metrics_port:
        log.info("metrics at http://%s:%d/metrics", settings.metrics_host, settings.metrics_port)
    app = create_app(settings, service, input_partitions=partitions)
    lag = ConsumerLagMonitor(settings.bootstrap_servers, app.conf.id, settings.input_topic, service.metrics,
                             interval_s=settings.lag_interval_s, auto_offset_reset=settings.auto_offset_reset,
                             client_config=client_config)
    # override_logging=False: Faust keeps the root handler set up above instead of installing its own
    # (colored, stdout) one, so its records share the worker's format (text or JSON lines).
    worker = faust.Worker(app, loglevel=settings.log_level.upper(), quiet=True, redirect_stdouts=False,
                          override_logging=False)
    worker.spinner = None  # its terminal escapes (cursor hide/show) would land in non-tty logs too
    lag.start()
    # The objects made so far (imports, model, app: about 190,000) live as long as the process. A full
    # collection would walk them all each time (90 to 125 ms measured on the 2-core box, a pause every
    # event behind it waits for); frozen, later collections skip them.
    gc.collect()
    gc.freeze()
    # Events stay referenced until their snapshots are written (`state_flush_s`): thousands of them,
    # each a few tracked objects, survive every young collection at the default thresholds and are
    # walked again in the older ones. Measured at 12,000 events/s (20 s): 145 collections over 3 ms,
    # about 1.0 s of the loop in total (gen-2 ones 15 to 52 ms each) at (700, 10, 10); 2 at these.
    gc.set_threshold(50_000, 20, 100)
    # The inference thread takes the GIL back after each model call and each array step around it,
    # and Faust's consumer thread for every fetch; while the event loop runs Python each waits up to
    # the switch interval (5 ms by default) every time. The interval applies only while a thread
    # waits. Measured: the model beside a busy Python thread, batches of 1,024: 14,835 windows/s at
    # 5 ms, 39,550 at 0.5 ms (47,110 alone). End to end under a backlog (benchmark, 2 runs each): at
    # 0.5 ms the inference thread spent 29 us of wall time per window for 17 us of CPU, and the loop
    # waited on it 37 % of the time; at 0.1 ms 23 us, and (b) went from 34,252 to 39,259 events/s.
    sys.setswitchinterval(settings.gil_switch_interval_s)
    try:
        worker.execute_from_commandline()
    finally:
        lag.stop()
        app.output.close()
