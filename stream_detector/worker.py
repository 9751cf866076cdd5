"""The Faust worker: Kafka in, :class:`~stream_detector.detector.Detector` in the middle, alerts out.

This is the one place where the pieces are wired together: Faust's stream, consumer and table on
one side, the batch lifecycle of :mod:`stream_detector.runtime` on the other (the
:class:`~stream_detector.runtime.pipeline.BatchPipeline`, its
:class:`~stream_detector.runtime.checkpoint.Settler`, the changelog state and the failure policy,
each unit-tested without Faust). Per micro-batch (adaptive, see :mod:`~stream_detector.batching`;
or Faust's ``stream.take_events(batch_max, within)``):

1. decode and window the batch on the event loop (fast, per event);
2. score it on a dedicated thread, so heartbeats and commits never stall: on CPU in parts of 256
   events, each scored while the loop windows the next, and judged while the last are scored;
   on CUDA in one model call;
3. judge it (thresholds, incidents) and send its alerts and dead letters (through
   :mod:`~stream_detector.kafka.output`'s producer, not Faust's);
4. hand it to the :class:`~stream_detector.runtime.checkpoint.Settler`, which, on a task of its own and in batch order, waits until the
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

With a challenger named in the model directory (:mod:`~stream_detector.shadow`), step 2 scores each
part with it too and step 3 judges it with its own thresholds and incidents; its alerts go to the
shadow topic only. Without one, nothing more is done.

Agent concurrency stays 1: with more, faust-streaming can commit offsets ahead of unfinished
events (faust-streaming issue #606). The app is a :class:`~stream_detector.kafka.faust_app.DetectorApp`,
Faust's app given the project's classes through Faust's extension points: its consumer is kept up
by :mod:`~stream_detector.kafka.faust_fastpath`'s transport (per-event delivery without tasks, a
fetcher that wakes when a paused partition resumes, a short broker fetch wait) and a stream buffer
larger than one fetch; its flow control (:mod:`~stream_detector.kafka.faust_fixes`) fixes a race in
Faust's rebalance recovery that dropped the first events fetched for a new assignment; and the
worker reads a changelog partition again when its restore stalls.

With ``key_partition_check=repartition``, an event not on its window key's partition is forwarded
(in step 1, with the batch's dead letters, so its offset is acked only once the broker has it) to
the repartition topic, keyed by its window key, on the key's home partition
(:mod:`~stream_detector.repartition`); the agent reads that topic too, and Faust's assignor gives
its partition p to the owner of input partition p.

Window state survives restarts and rebalances: at a batch boundary (sent after the alerts of every
event it covers are acknowledged), the keys that first changed ``state_flush_s`` ago or more (1 s
by default) are written to a compacted changelog (a Faust table's changelog topic, partitioned like
the input): one write per busy key per interval, not per batch, spread over the batches. Once the
broker has the snapshots covering a batch (every key changed up to its end), its input events are
acked; the next batches are handled while the writes are in flight, up to ``WRITES_IN_FLIGHT``.
A crash re-delivers the events not yet acked, which the restored windows take again. Faust
restores the changelog of newly assigned partitions before the agent resumes, and a key's window
is taken from it the first time the key is seen (a key whose snapshot holds an open incident at
once, so that the idle sweep closes it if the key stays silent). A partition whose committed offset
went back below the floor written with its snapshots (a group reset, a recreated topic) has its
snapshots' positions dropped at restore: its events are scored again, none taken for a replay. Each snapshot records the offset of the key's
last event, so records redelivered after a crash are recognised and not appended twice; since
snapshots are written only after the alerts they follow, a recognised record has already been
scored and alerted. A worker whose deliveries stalled (the broker out of reach) writes no window
state again before the group coordinator confirms it still holds its partitions; evicted meanwhile
(a zombie), it exits (:mod:`~stream_detector.runtime.fencing`).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import time
from pathlib import Path
from typing import Any

import faust
from faust.types import TP

from .artifacts import ArtifactError, ModelArtifact, load_artifact, read_signing_key
from .registry import CHALLENGER, is_version_dir, load_served, read_aliases, served_candidates
from .batching import ack_events, adaptive_batches, pending_events
from .detector import Detector, RawRecord
from .kafka import faust_fixes
from .kafka.faust_app import DetectorApp, DetectorWorker, check_versions
from .kafka.faust_fastpath import RawEvents
from .kafka.admin import (TopicError, committed_offsets, ensure_topics, grow_partitions, member_partitions,
                          partition_count)
from .kafka.output import OutputProducer
from .kafka.security import client_config, faust_credentials, faust_options
from .metrics import WorkerMetrics
from .scoring import ModelRunner, inference_executor, worker_threads
from .settings import Settings
from .incidents import AlertPolicy
from .thresholds import ThresholdConfig, build_threshold_policy
from .runtime.checkpoint import Published, Scoring, Settler, Snapshots  # noqa: F401 (the worker's API)
from .runtime.failures import FailurePolicy
from .runtime.fencing import STALL_S, ZombieFence
from .runtime.feedback import FeedbackHandler
from .runtime.pipeline import BatchPipeline, PipelineConfig
from .runtime.state import ChangelogState
from .repartition import KeyRouter

log = logging.getLogger("stream_detector.worker")


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
            key_clock=time.monotonic,  # a wall-clock step must not evict every key (and tombstone it)
            envelope=settings.envelope(),
            topic=settings.input_topic,
            drift_halflife=settings.drift_halflife_windows,
            key_partition_check=settings.key_partition_check == "dead_letter",
        )
        if settings.schema_registry_url:  # framed values through the registry, the rest as JSON (unchanged)
            from .schema_registry import RegistryValueDecoder, registry_client

            self.detector.decoder = RegistryValueDecoder(self.detector.decoder, registry_client(settings),
                                                         settings.input_topic, proto_client=registry_client(settings))
        self.detector.windows.store.on_evict = self._on_evict
        self._export_drift(artifact)
        self.executor = inference_executor(settings.torch_threads)
        self._announce(artifact, threshold.value)
        # The challenger shadowing the champion (stream_detector.shadow), if the directory names one.
        self.challenger_runner: ModelRunner | None = None
        self._refused_challengers: set[str] = set()
        target = self._challenger_target()
        if target is not None:
            try:
                self._set_challenger(self._load_runner(target))
            except Exception as exc:  # a challenger never keeps the worker from serving the champion
                self._refuse_challenger(target, exc)

    def _export_drift(self, artifact: ModelArtifact) -> None:
        """Drift gauges read when scraped, from whichever model and threshold policy serve by then
        (a swapped-in model has the same features)."""
        detector = self.detector
        for index, name in enumerate(artifact.feature_names):
            self.metrics.feature_drift.labels(feature=name).set_function(
                lambda index=index: detector.drift.value(index))
        self.metrics.keys_on_threshold_bounds.set_function(
            lambda: getattr(detector.threshold, "share_at_bounds", lambda: 0.0)())

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
        challenger = self.challenger_runner
        if challenger is not None and challenger.artifact.path == newest:
            # The version shadowing is promoted: its warm threshold policy serves on.
            self.detector.promote_challenger()
            self.runner, self.challenger_runner = challenger, None
            self._show_challenger(None)
            self.metrics.model_reloads.inc()
            self._announce(challenger.artifact, self.challenger_threshold.value)
            return True
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

    def _challenger_target(self) -> Path | None:
        """The version the ``challenger`` alias names, unless it is the champion; the one shadowing
        now when the aliases cannot be read (a bad file is the champion poll's to report)."""
        root = self.settings.model_path
        current = self.challenger_runner.artifact.path if self.challenger_runner is not None else None
        if is_version_dir(root) or not root.is_dir():
            return None
        try:
            version = read_aliases(root)["aliases"].get(CHALLENGER)
        except ArtifactError:
            return current
        if not isinstance(version, str) or not version:
            return None
        path = root / version
        return None if path == self.runner.artifact.path else path

    def _set_challenger(self, runner: ModelRunner) -> None:
        threshold = build_threshold_policy(runner.artifact, self.threshold_config, self.settings.max_keys)
        self.detector.set_challenger(runner.artifact, self._challenger_scorer(runner), threshold)
        self.challenger_runner, self.challenger_threshold = runner, threshold
        self._show_challenger(runner.version)
        log.info("challenger %s (%s) shadows the champion %s: its alerts go to %s", runner.version,
                 runner.artifact.kind, self.runner.version, self.settings.shadow_topic_name)

    def _refuse_challenger(self, path: Path, exc: Exception) -> None:
        self._refused_challengers.add(str(path))
        self.metrics.challenger_load_failures.inc()
        log.error("challenger %s refused, not shadowing: %s", path, exc)

    def _drop_challenger(self) -> None:
        if self.challenger_runner is None:
            return
        log.info("challenger %s no longer shadows the champion", self.challenger_runner.version)
        self.detector.drop_challenger()
        self.challenger_runner = None
        self._show_challenger(None)

    def _show_challenger(self, version: str | None) -> None:
        """``challenger_info``: the version shadowing at 1, or (none) an empty version at 0, so a
        dashboard always has a series to show."""
        info = self.metrics.challenger_info
        info.clear()
        if version is None:
            info.labels(version="").set(0)
        else:
            info.labels(version=version).set(1)

    async def maybe_reload_challenger(self) -> bool:
        """Follows the ``challenger`` alias on the same poll as the champion: loads a newly named
        version (on the inference thread), drops the challenger when the alias goes or names the
        champion. A version that fails to load or does not fit the windows is refused once, logged
        and counted; the champion serves on either way. Whether the challenger changed."""
        target = self._challenger_target()
        current = self.challenger_runner.artifact.path if self.challenger_runner is not None else None
        if target == current:
            return False
        if target is None or str(target) in self._refused_challengers:
            changed = current is not None
            self._drop_challenger()
            return changed
        loop = asyncio.get_running_loop()
        try:
            runner = await loop.run_in_executor(self.executor, self._load_runner, target)
            self._set_challenger(runner)
        except Exception as exc:
            self._refuse_challenger(target, exc)
            self._drop_challenger()  # the alias moved away from the one shadowing
            return False
        return True

    def _on_evict(self, reason: str, n: int) -> None:
        self.detector.stats.evicted[reason] += n
        self.metrics.keys_evicted.labels(reason=reason).inc(n)

    def _challenger_scorer(self, runner: ModelRunner):
        """The challenger's model call; its time counts in the same histogram (one more call per batch part)."""
        scorer = self._scorer_for(runner)

        def counted(windows):
            try:
                return scorer(windows)
            except Exception:
                self.metrics.challenger_score_failures.inc()
                raise

        return counted

    def _scorer_for(self, runner: ModelRunner):
        def timed_score(windows):
            started = time.perf_counter()
            scores = runner.score(windows)
            self.metrics.inference_seconds.observe(time.perf_counter() - started)
            return scores

        return timed_score


def create_app(settings: Settings, service: DetectorService, input_partitions: int = 1) -> faust.App:
    """The Faust app; its ``output`` and ``state_output`` attributes are the producers to close once
    the worker stops.

    Raises :class:`~stream_detector.errors.UnsupportedDependency` on an untested faust-streaming or
    mode-streaming (:func:`~stream_detector.kafka.faust_app.check_versions`).
    """
    # Passthrough client properties aiokafka has an equivalent of; the rest reach only the librdkafka clients.
    passthrough, not_passed = faust_options(settings)
    if not_passed:
        log.info("client properties not passed to the Faust consumer (aiokafka has no equivalent): %s",
                 ", ".join(not_passed))
    heartbeat_s = passthrough.pop("broker_heartbeat_interval", min(3.0, settings.session_timeout_s / 3))
    app = DetectorApp(
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
        broker_heartbeat_interval=heartbeat_s,
        topic_allow_declare=True,  # the window-state changelog topic is created by Faust
        # No standby replicas of the window table: with an in-memory store a newly assigned partition
        # is read from the start of its changelog anyway (a standby copy would be read and held for
        # nothing), and Faust's standby-to-active hand-over can leave a recovery waiting forever.
        table_standby_replicas=0,
        stream_buffer_maxsize=settings.stream_buffer_max,
        loghandlers=[],
        # The project's transport, producer buffer and sensors with the fast path; Faust's without.
        consumer_fast_path=settings.consumer_fast_path,
        consumer_fetch_max_wait_ms=settings.fetch_max_wait_ms,
        **passthrough,
    )
    # Repartitioning (key_partition_check=repartition): events not on their window key's partition
    # are forwarded to the repartition topic and read back by the same agent. Faust's assignor gives
    # partition p of every topic the app subscribes to with as many partitions (the input, this one,
    # the changelog) to one worker (faust.assignor.PartitionAssignor: co-subscribed topics with
    # equal partition counts are co-partitioned), so a key's window stays whole.
    repartition_topic = settings.repartition_topic_name if settings.key_partition_check == "repartition" else ""
    router = KeyRouter(repartition_topic, input_partitions, settings.repartition_partitioner) \
        if repartition_topic else None
    service.detector.windows.router = router
    # The worker reads each event's message bytes itself; with the fast path Faust does not decode them.
    source = app.topic(settings.input_topic, *([repartition_topic] if repartition_topic else []),
                       key_serializer="raw", value_serializer="raw",
                       schema=RawEvents() if settings.consumer_fast_path else None)
    # Everything the worker writes (alerts, dead letters, scores, snapshots) goes through `out`.
    out = app.output = OutputProducer(settings.bootstrap_servers, client_config(settings, "producer"), stall_s=STALL_S)
    # Except snapshots: they have a producer of their own, which drops what it holds once the broker
    # has been out of reach for half the session timeout (before the group can evict this worker),
    # so that a worker cut off and evicted never has an old snapshot sent when it is back (the
    # settler sends the purged ones again once the group confirms it still holds their partitions).
    state_out = app.state_output = OutputProducer(settings.bootstrap_servers, client_config(settings, "producer"),
                                                  stall_s=STALL_S, purge_after_s=settings.session_timeout_s / 2)
    detector, metrics = service.detector, service.metrics
    # Window state, changelog-backed. Written with explicit partitions (the input record's), read
    # back lazily per key; never modified through the table API, which would pick partitions itself.
    # Faust declares the changelog topic and restores from it; the writes go through `out`.
    state = app.Table("windows", partitions=input_partitions, key_type=bytes, value_type=bytes,
                      help="per-key window snapshots")
    changelog = ChangelogState(detector, state_out, state.changelog_topic.get_topic_name(), metrics,
                               settings.state_min_events,
                               # the live copy is the window store from now on
                               restore_source=lambda key: state.data.pop(key, None),
                               committed=lambda partition: _faust_committed(app, settings.input_topic, partition))
    # A worker cut off long enough to be evicted (a zombie) writes no snapshot after its successor's.
    fence = ZombieFence(lambda: out.stalled() | state_out.stalled(), lambda: out.reachable() and state_out.reachable(),
                        lambda: _held_partitions(app, settings),
                        lambda: {tp.partition for tp in app.consumer.assignment() if tp.topic == settings.input_topic})
    pipeline = BatchPipeline(PipelineConfig.from_settings(settings), detector, metrics, service.executor, out,
                             changelog, FailurePolicy(on_failure=lambda stage: metrics.batch_failures.labels(
                                 stage=stage).inc()), part_size=service.runner.chunk or max(settings.batch_max, 1),
                             fence=fence)
    app.pipeline = pipeline
    feedback = FeedbackHandler(detector, metrics, out, settings.feedback_topic_name, settings.alerts_topic,
                               settings.dead_letter_topic)
    feedback_source = app.topic(settings.feedback_topic_name, key_serializer="raw", value_serializer="raw")

    @app.agent(feedback_source, concurrency=1)
    async def take_feedback(stream: faust.StreamT) -> None:
        """Operators' verdicts (`stream-detector ack`): counted; an expected change closes its incident."""
        async for event in stream.events():
            m = event.message
            await feedback.handle(RawRecord(m.value, m.key, m.timestamp, m.partition, m.offset,
                                            tuple(m.headers or ())))

    changelog_width = [input_partitions]  # partitions the changelog is known to have

    async def widen_changelog(needed: int) -> None:
        """The input topic grew (a partition this wide is assigned): the changelog grows to match
        before any event of the new partitions is taken (a snapshot goes to its input record's
        partition number), and the output producer learns of the new partitions."""
        loop = asyncio.get_running_loop()
        topic = changelog.changelog_topic
        try:
            width = await loop.run_in_executor(None, grow_partitions, settings.bootstrap_servers, topic, needed,
                                               client_config(settings, "admin"))
            await loop.run_in_executor(None, state_out.partitions, topic)
        except Exception as exc:  # the first snapshot to a new partition then stops the worker (exit 70)
            log.error("input topic grown to %d partitions, changelog %s not grown: %s: %s", needed, topic,
                      type(exc).__name__, exc)
            return
        log.warning("input topic grown to %d partitions: changelog %s grown from %d to %d", needed, topic,
                    changelog_width[0], width)
        changelog_width[0] = width

    async def follow_input_width() -> None:
        """Keys' home partitions are among the input's partitions: when the input grew (every member
        recovers after the rebalance that follows), the repartition topic grows to match and homes
        are taken among the new count, on every worker, whichever partitions it holds."""
        assert router is not None
        loop = asyncio.get_running_loop()
        try:
            width = await loop.run_in_executor(None, out.partitions, settings.input_topic)
            if width != router.partitions:
                await loop.run_in_executor(None, grow_partitions, settings.bootstrap_servers, router.topic, width,
                                           client_config(settings, "admin"))
                await loop.run_in_executor(None, out.partitions, router.topic)
                log.warning("input topic %s has %d partitions: repartition topic %s grown from %d",
                            settings.input_topic, width, router.topic, router.partitions)
                router.partitions = width
        except Exception as exc:  # forwards keep the old homes until the next recovery
            log.error("repartition topic %s not grown with the input: %s: %s", router.topic, type(exc).__name__, exc)

    async def seek_repartition_start(partitions: list[int]) -> None:
        """The repartition topic's partitions without a committed offset are read from their start,
        whatever ``auto_offset_reset`` says: every record there is an event forwarded and acked on
        the input, to be windowed (as Kafka Streams reads its repartition topics)."""
        assert router is not None
        try:
            committed = await asyncio.get_running_loop().run_in_executor(
                None, committed_offsets, settings.bootstrap_servers, settings.consumer_group, router.topic,
                partitions, client_config(settings, "consumer"))
            sought = await faust_fixes.seek_uncommitted(app, router.topic, committed, "earliest")
        except Exception as exc:
            log.warning("repartition partitions without a committed offset not sought (%s: %s)",
                        type(exc).__name__, exc)
        else:
            if sought:
                log.info("repartition partitions without a committed offset read from %s", sought)

    @state.on_recover
    async def restore_open_incidents() -> None:
        # Awaited by Faust's recovery before the input partitions resume.
        partitions = sorted(tp.partition for tp in app.consumer.assignment() if tp.topic == settings.input_topic)
        if partitions and partitions[-1] >= changelog_width[0]:
            await widen_changelog(partitions[-1] + 1)
        # A group reset or a recreated topic: the restored positions would take every event for a replay.
        if partitions:
            try:
                committed_now = await asyncio.get_running_loop().run_in_executor(
                    None, committed_offsets, settings.bootstrap_servers, settings.consumer_group,
                    settings.input_topic, partitions, client_config(settings, "consumer"))
                ends = await app.consumer.highwaters(*(TP(settings.input_topic, p) for p in partitions))
                await changelog.recover(state.data, committed_now,
                                        {tp.partition: end for tp, end in ends.items() if end is not None})
            except Exception as exc:  # the positions are kept: at worst a reset's events count as replayed
                log.warning("committed offsets not read at recovery (%s: %s); snapshot positions kept",
                            type(exc).__name__, exc)
            else:
                # Faust reads a partition without a committed offset past 0 from wherever the
                # consumer stands: maybe past records fetched and dropped while it was paused.
                try:
                    sought = await faust_fixes.seek_uncommitted(app, settings.input_topic, committed_now,
                                                                settings.auto_offset_reset)
                except Exception as exc:
                    log.warning("input partitions without a committed offset not sought (%s: %s)",
                                type(exc).__name__, exc)
                else:
                    if sought:
                        log.info("input partitions without a committed offset read from %s", sought)
            if router is not None:
                await follow_input_width()
                await seek_repartition_start(partitions)
        # Keys come back lazily, at their next event; one with an open incident may never send
        # again, and only a key held in memory has its incident closed by the idle sweep.
        restored = changelog.restore_open_incidents(state.data.items())
        if restored:
            log.info("%d keys with an open incident restored at recovery (closed idle if they stay silent)",
                     restored)

    @app.on_partitions_revoked.connect
    async def forget_revoked(_app: faust.App, revoked: set, **_: Any) -> None:
        partitions = {tp.partition for tp in revoked if tp.topic == settings.input_topic}
        if partitions:
            dropped = changelog.revoke(partitions)
            log.info("partitions %s revoked: %d key windows handed over", sorted(partitions), dropped)
            # Every revoked partition's changelog is read again from its start if it comes back: a
            # key's snapshot leaves the table when the key is restored, and Faust, which keeps a
            # partition it assigns again to the same worker, would read only what was written since,
            # so a key restored and not written again would start cold (its window lost).
            for partition in partitions:
                app.tables.recovery.revoke(TP(changelog.changelog_topic, partition))
            # Snapshots already sent reach the changelog before the partitions' new owner reads it.
            deadline = time.monotonic() + 5.0
            while state_out.in_flight() and time.monotonic() < deadline:
                await asyncio.sleep(0.005)

    watching_recoveries: list[asyncio.Future] = []
    reread_at: dict = {}  # per changelog partition, when it was last read again

    async def watch_recoveries() -> None:
        while not app.should_stop:
            await app.sleep(5.0)
            await faust_fixes.reread_stalled_changelogs(app, time.monotonic(), reread_at)

    @app.on_partitions_assigned.connect
    async def start_watching_recoveries(_app: faust.App, assigned: set, **_: Any) -> None:
        # A recovery stall in Faust (see faust_fixes), from the first assignment on: timers would start
        # only once the first recovery has completed.
        if not watching_recoveries:
            watching_recoveries.append(app.add_future(watch_recoveries()))

    if settings.model_poll_s > 0:
        @app.timer(interval=settings.model_poll_s)
        async def reload_model() -> None:
            await service.maybe_reload()  # first: a promoted challenger becomes the champion
            await service.maybe_reload_challenger()

    @app.agent(source, concurrency=1)
    async def detect(stream: faust.StreamT) -> None:
        """Micro-batches through the :class:`~stream_detector.runtime.pipeline.BatchPipeline`; with
        ``batch_pipeline``, pipelined under a backlog (a full batch or more waiting): while batch k is
        scored on the inference thread, the loop judges batch k-1 and sends its alerts.

        A batch-level failure stops the process (see :mod:`stream_detector.runtime.failures`): the
        agent never raises into Faust's supervisor, which would restart it in this process and go on
        consuming past the failed batch.
        """
        # Adaptive batches leave acks to us: a batch is acked once the snapshots covering it are
        # written (its keys `state_flush_s` after they first changed). Faust's take_events acks each
        # batch itself, so with it snapshots are written after every batch and batches are not pipelined.
        # After 0.1 s without events every changed key is written and every event acked. A rebalance
        # suspends the flow: Faust then waits for the events taken to be acked and commits them before
        # it gives the partitions up. Acks that came later (after a 1 s flush wait) were committed by
        # Faust's next periodic commit, over the new owner's (it commits whatever it has acks for):
        # the two-worker rebalance test saw commits stuck in 4 of 10 runs at 1 s, none in 5 at 0.1 s.
        batches = (adaptive_batches(stream, settings.batch_max, settings.batch_within_s, defer_acks=True,
                                    idle_s=0.1) if settings.batch_adaptive
                   else stream.take_events(settings.batch_max, within=settings.batch_within_s))
        await pipeline.run(batches, lambda: pending_events(stream), lambda events: ack_events(stream, events),
                           lambda: app.consumer.assignment(), lambda: app.consumer_generation_id)

    return app


def _faust_committed(app: faust.App, topic: str, partition: int) -> int | None:
    """The offset Faust's consumer last committed on an input partition (None if none, or 0): read,
    not changed (Faust keeps it in its consumer; there is no public accessor)."""
    return app.consumer._committed_offset.get(TP(topic, partition))


def _group_member_id(app: faust.App) -> str:
    """The member id the group coordinator gave this worker's consumer ("" while it has none): read,
    not changed (aiokafka keeps it in its group coordinator, where Faust reads the generation too)."""
    return app.consumer._thread._ensure_consumer()._coordinator.member_id or ""


async def _held_partitions(app: faust.App, settings: Settings) -> set[int] | None:
    """The input partitions this worker's member holds as the group coordinator sees them (None if
    the member is not in the group, or the consumer knows it has left it)."""
    member_id = _group_member_id(app)
    if not member_id:
        return None
    return await asyncio.get_running_loop().run_in_executor(
        None, member_partitions, settings.bootstrap_servers, settings.consumer_group, member_id,
        settings.input_topic, client_config(settings, "admin"))


async def _replace(target: set, items: Any) -> None:
    target.clear()
    target.update(items)


def run_worker(settings: Settings) -> None:
    """Blocks until SIGINT/SIGTERM."""
    from .lag import ConsumerLagMonitor
    from .logs import setup_logging

    # Idempotent; makes the log format right also when run_worker is called without the CLI.
    setup_logging(settings.log_level, json_logs=settings.log_json)
    check_versions()  # before anything is created: an untested Faust refuses to start
    admin_config = client_config(settings, "admin")
    # The shadow topic always: a challenger may be named while the worker runs.
    topics = {settings.input_topic: 1, settings.alerts_topic: 1, settings.dead_letter_topic: 1,
              settings.feedback_topic_name: 1, settings.shadow_topic_name: 1}
    if settings.scores_topic:
        topics[settings.scores_topic] = 1
    ensure_topics(settings.bootstrap_servers, topics, client_config=admin_config,
                  replication_factor=settings.topic_replication_factor,
                  topic_configs={settings.alerts_topic: settings.alerts_topic_config,
                                 settings.shadow_topic_name: settings.alerts_topic_config,
                                 settings.dead_letter_topic: settings.dead_letter_topic_config,
                                 # the latest verdict of each incident (keyed by incident id)
                                 settings.feedback_topic_name: {"cleanup.policy": "compact"}})
    partitions = partition_count(settings.bootstrap_servers, settings.input_topic, admin_config)
    if settings.alerts_schema_register:
        from .schema_registry import register_alert_schema, registry_client

        schema_id = register_alert_schema(registry_client(settings), settings.alerts_topic)
        log.info("alert schema registered as %s-value, schema id %d", settings.alerts_topic, schema_id)
    service = DetectorService(settings)
    service.metrics.serve(settings.metrics_host, settings.metrics_port)
    if settings.metrics_port:
        log.info("metrics at http://%s:%d/metrics", settings.metrics_host, settings.metrics_port)
    app = create_app(settings, service, input_partitions=partitions)
    # The changelog is created here (replication factor, configs), before Faust would create it with its own.
    changelog = app.tables["windows"].changelog_topic.get_topic_name()
    try:  # an existing changelog narrower than the input (the input grew while no worker ran) grows first
        grow_partitions(settings.bootstrap_servers, changelog, partitions, admin_config)
    except TopicError:
        pass  # none yet: created below
    ensure_topics(settings.bootstrap_servers, {changelog: partitions}, client_config=admin_config,
                  replication_factor=settings.topic_replication_factor,
                  topic_configs={changelog: {**settings.changelog_topic_config, "cleanup.policy": "compact"}})
    if settings.key_partition_check == "repartition":
        # As wide as the input (a partition per input partition, read by its owner), on the same broker.
        repartition = settings.repartition_topic_name
        try:
            grow_partitions(settings.bootstrap_servers, repartition, partitions, admin_config)
        except TopicError:
            pass  # none yet: created below
        ensure_topics(settings.bootstrap_servers, {repartition: partitions}, client_config=admin_config,
                      replication_factor=settings.topic_replication_factor)
    # /readyz, read on the metrics thread: flags set on the event loop (Faust's assignment signals).
    assigned: set = set()
    app.on_partitions_assigned.connect(lambda _app, assigned_now, **_: _replace(assigned, assigned_now))
    app.on_partitions_revoked.connect(lambda _app, revoked, **_: _replace(assigned, assigned - set(revoked)))
    recovery = app.tables.recovery
    service.metrics.readiness = lambda: {
        "model_loaded": service.runner is not None,
        "partitions_assigned": any(tp.topic == settings.input_topic for tp in list(assigned)),
        "recovery_done": recovery.completed.is_set() and not recovery.in_recovery,
    }
    lag = (ConsumerLagMonitor(settings.bootstrap_servers, app.conf.id, settings.input_topic, service.metrics,
                              interval_s=settings.lag_interval_s, auto_offset_reset=settings.auto_offset_reset,
                              client_config=client_config(settings, "consumer"))
           if settings.lag_exporter else None)
    # override_logging=False: Faust keeps the root handler set up above instead of installing its own
    # (colored, stdout) one, so its records share the worker's format (text or JSON lines).
    worker = DetectorWorker(app, loglevel=settings.log_level.upper(), quiet=True, redirect_stdouts=False,
                            override_logging=False)
    if lag is not None:
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
        if lag is not None:
            lag.stop()
        app.output.close()
        app.state_output.close()
