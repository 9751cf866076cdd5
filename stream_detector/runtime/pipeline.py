"""The batch lifecycle: window, score, judge, publish, then hand over to the checkpoint (settler).

Per micro-batch (adaptive, see :mod:`~stream_detector.batching`; or Faust's ``take_events``):

1. :meth:`BatchPipeline.start` decodes and windows it on the event loop (per event; a message
   that cannot be decoded or windowed, whatever the exception, is dead-lettered) and starts
   scoring it on the inference thread, in parts of ``part_size`` events;
2. :meth:`BatchPipeline.judge` awaits the scores (a model call that raises is retried), judges
   them (thresholds, incidents; a NaN or infinite score is dead-lettered, never judged) and sends
   the alerts (and scores) through the output producer;
3. the :class:`~stream_detector.runtime.checkpoint.Settler` then awaits the alerts, writes the
   window snapshots and acks the offsets, in batch order, off the loop's path.

Each batch is judged exactly once: it leaves the queue of started batches before it is judged.
A batch-level failure goes to the :class:`~stream_detector.runtime.failures.FailurePolicy`, which
stops the process; nothing after the failed batch is acked. The pipeline knows nothing of Faust:
it takes an async iterator of batches of events (objects with a ``message`` carrying ``value``,
``key``, ``timestamp``, ``partition``, ``offset``, ``headers`` and ``tp``), a function giving
how many events are waiting, and an ``ack`` coroutine.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, AsyncIterable, Awaitable, Callable

import numpy as np
import orjson

from ..alerts import encode_alert
from ..detector import Decision, Detector, PreparedBatch, RawRecord
from ..errors import NON_FINITE_SCORE, BatchFailed
from ..events import Invalid
from ..kafka.output import Deliveries, OutputProducer
from ..logs import RateLimitedLog
from ..repartition import SOURCE_HEADER
from ..metrics import WorkerMetrics, observe_many
from ..scoring import Scores
from ..shadow import CHALLENGER_MODEL, CHAMPION_MODEL, OVER, UNDER
from .checkpoint import (ACK, CONSUME, JUDGE, SCORE, SEND_ALERTS, SEND_SNAPSHOTS, WINDOW, Published, Scoring, Settler,
                         Snapshots)
from .dead_letters import dead_letter
from .failures import MODEL_ATTEMPTS, FailurePolicy
from .fencing import ZombieFence
from .state import ChangelogState

log = logging.getLogger("stream_detector.worker")


@dataclass(frozen=True)
class PipelineConfig:
    """The settings the batch lifecycle reads (see :class:`~stream_detector.settings.Settings`)."""

    input_topic: str
    alerts_topic: str
    dead_letter_topic: str
    scores_topic: str = ""
    batch_max: int = 1024
    batch_adaptive: bool = True
    batch_pipeline: bool = True
    state_flush_s: float = 1.0
    max_keys: int = 100_000
    invalid_log_interval_s: float = 10.0
    shadow_topic: str = ""  # the challenger's alerts (stream_detector.shadow); empty: `<alerts_topic>.shadow`
    # Where events whose record is not on their window key's partition are forwarded to (and read
    # back from): key_partition_check=repartition; empty: not repartitioning.
    repartition_topic: str = ""

    @classmethod
    def from_settings(cls, settings: Any) -> "PipelineConfig":
        return cls(settings.input_topic, settings.alerts_topic, settings.dead_letter_topic, settings.scores_topic,
                   settings.batch_max, settings.batch_adaptive, settings.batch_pipeline, settings.state_flush_s,
                   settings.max_keys, shadow_topic=settings.shadow_topic_name,
                   repartition_topic=(settings.repartition_topic_name
                                      if settings.key_partition_check == "repartition" else ""))

    @property
    def shadow_topic_name(self) -> str:
        return self.shadow_topic or f"{self.alerts_topic}.shadow"


class BatchPipeline:
    """Windows, scores, judges and publishes micro-batches; hands them to the settler in order."""

    def __init__(self, config: PipelineConfig, detector: Detector, metrics: WorkerMetrics, executor: Executor | None,
                 out: OutputProducer, state: ChangelogState, failures: FailurePolicy | None = None, part_size: int = 0,
                 fence: ZombieFence | None = None):
        self.config = config
        self.fence = fence  # the zombie check before snapshots after the broker was out of reach
        self.detector = detector
        self.metrics = metrics
        self.executor = executor
        self.out = out
        self.state = state
        self.failures = failures or FailurePolicy()
        # A micro-batch is windowed and scored in parts of this many events: the inference thread scores
        # one part while the loop windows the next, and the loop judges the first parts while it scores
        # the last (on CPU the model takes 256 windows per call anyway; on CUDA a micro-batch stays one
        # host-to-device copy and one call).
        self.part_size = part_size or max(config.batch_max, 1)
        self.invalid_log = RateLimitedLog(log, config.invalid_log_interval_s)
        self.suppressed_seen = 0  # incidents_suppressed already counted in metrics
        # Started (windowed, being scored) and not judged yet, oldest first: at most two.
        self.unjudged: deque[Scoring] = deque()
        self.concluded = 0  # micro-batches concluded so far: each one's number
        # (number, events) of concluded batches no collected snapshot covers yet, and their events.
        self._uncovered: deque[tuple[int, int]] = deque()
        self._unflushed = 0
        self._flush_at_most = max(50_000, 8 * config.batch_max)  # events held unacked
        # Windowing the next batch before this one is judged could evict a key of this batch (least
        # recently used) only when the key limit is within two batches of keys.
        self._overlap_keys = config.max_keys >= 4 * config.batch_max
        self._interrupted = False  # a batch was left half judged (the task was cancelled meanwhile)
        self.settler: Settler | None = None
        self._stage = CONSUME

    # -- the loop -------------------------------------------------------------------------------

    async def run(self, batches: AsyncIterable[list[Any]], pending: Callable[[], int],
                  ack: Callable[[list[Any]], Awaitable[None]], assignment: Callable[[], Any],
                  generation: Callable[[], Any] = lambda: None) -> None:
        """Consumes ``batches`` until they end or the task is cancelled (a clean stop: everything
        started is finished and settled); a batch-level failure goes to the failure policy."""
        config = self.config
        deferred = config.batch_adaptive
        pipelined = deferred and config.batch_pipeline
        self.settler = settler = Settler(self.publish, self.state.send, ack, assignment, generation, self.failures,
                                              self.fence)
        unjudged = self.unjudged
        failed = False
        try:
            async for events in batches:
                if unjudged:
                    await self.conclude(events)  # and starts this batch
                elif events:
                    self.start(events)
                elif deferred and len(self.detector.incidents) and await self.close_idle():
                    pass  # gone quiet, and incidents closed idle: their closes and every changed key written
                elif deferred and self._unflushed:  # gone quiet: write every changed key, ack what it covers
                    self._stage = SEND_SNAPSHOTS
                    await settler.put(None, self._covered(self.state.collect_snapshots()), [])
                elif deferred and (floors := self.state.collect_floors()) is not None:
                    await settler.put(None, floors, [])  # quiet: the committed offsets moved on
                elif deferred:
                    settler.check()
                # Kept in flight only when pipelining under a backlog: a full batch already there to overlap
                # it with (and only with deferred acks: take_events acks a batch once the next is asked
                # for). Below that the batch is finished first: pipelining would hold its alerts back for
                # as long as the next batch takes to window.
                while unjudged and not (pipelined and pending() >= config.batch_max):
                    await self.conclude(None)
                self._stage = CONSUME
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failed = True
            self.failures.fail(self._stage, exc)
            raise
        finally:
            if not failed and not self.failures.failed:
                await self._stop_cleanly(deferred)

    async def _stop_cleanly(self, deferred: bool) -> None:
        settler = self.settler
        assert settler is not None

        async def wind_down() -> None:
            if self._interrupted:  # its events are redelivered: no snapshot may cover them now
                await settler.close()
                return
            while self.unjudged:
                await self.conclude(None)
            if deferred and self._unflushed:
                await settler.put(None, self._covered(self.state.collect_snapshots()), [])
            await settler.close()

        try:  # a clean stop: leave nothing to re-deliver
            await asyncio.wait_for(wind_down(), timeout=5.0)
        except Exception as exc:  # stopping anyway; the events are re-delivered and re-applied
            log.info("window state not flushed at stop (%s): %d events will be re-delivered", exc,
                     settler.unsettled() + sum(len(s.events) for s in self.unjudged))
        finally:
            settler.cancel()

    async def close_idle(self) -> bool:
        """With the input quiet (no batch to judge): closes the incidents of keys silent for their
        idle limit, which otherwise only the next judged batch would (and, with every key silent,
        never). Their closes are sent, then every changed key's snapshot; whether any closed."""
        detector = self.detector
        self._stage = JUDGE
        if not detector.sweep_idle():
            return False
        sent = self.out.group()
        messages: list[tuple[dict[str, Any], RawRecord | None]] = [(m, None) for m in detector.drain_closed()]
        self._stage = SEND_ALERTS
        for message, _ in messages:
            sent.send(self.config.alerts_topic, message["key"].encode(), encode_alert(message))
        shadow = self._send_shadow(sent) if detector.shadow_pending else []
        self.metrics.incidents_open.set(detector.incidents.open_count)
        self._stage = SEND_SNAPSHOTS
        assert self.settler is not None
        await self.settler.put(Published(sent, messages, 0, shadow), self._covered(self.state.collect_snapshots()),
                               [])
        return True

    def _covered(self, snapshots: Snapshots | None) -> Snapshots | None:
        if snapshots is not None and snapshots.covers is not None:
            uncovered = self._uncovered
            while uncovered and uncovered[0][0] <= snapshots.covers:
                self._unflushed -= uncovered.popleft()[1]
        return snapshots

    async def conclude(self, next_events: list[Any] | None) -> None:
        """Finishes the oldest started batch and hands it to the settler; starts ``next_events`` (if
        any) before waiting for the model."""
        scoring = self.unjudged.popleft()  # off the queue first: whatever happens, never judged twice
        config, detector, state, settler = self.config, self.detector, self.state, self.settler
        deferred = config.batch_adaptive
        self.concluded += 1
        number = self.concluded
        now = asyncio.get_running_loop().time()
        detector.windows.seal(number, now)  # the keys this batch changed first
        self._uncovered.append((number, len(scoring.events)))
        self._unflushed += len(scoring.events)
        # The windows as this batch left them, before the next batch enters them: those of the keys
        # first changed `state_flush_s` ago or more (each changed key is written once per interval,
        # and the writes are spread over the batches; see `FeatureWindows.drain_sealed`), or of
        # every changed key.
        if not deferred or config.state_flush_s == 0 or self._unflushed >= self._flush_at_most:
            snapshots = self._covered(state.collect_windows())
        else:
            snapshots = self._covered(state.collect_windows(now - config.state_flush_s))
        started = False
        if next_events and not detector.model_swap_pending and self._overlap_keys:
            # The next batch is windowed and queued for the model now, so the model thread goes on
            # scoring while this batch is judged. Not across a model swap: this batch is judged
            # against its own model's thresholds.
            self.start(next_events)
            started = True
        self._interrupted = True
        published = await self.judge(scoring)
        self._interrupted = False
        if snapshots is not None:
            state.complete(snapshots)
        if next_events and not started:
            self.start(next_events)
        if not deferred:
            self._stage = SEND_ALERTS
            await self.publish(published)
            self._stage = SEND_SNAPSHOTS
            written = state.send(snapshots)  # after the alerts: a snapshot never runs ahead of them
            if written is not None:
                await written  # durable before take_events acks the batch (when the next is asked for)
            return
        self._stage = ACK
        assert settler is not None
        await settler.put(published, snapshots, scoring.events, number)

    # -- the stages -----------------------------------------------------------------------------

    def start(self, events: list[Any]) -> Scoring:
        """Decodes and windows a batch, sends its dead letters, and starts scoring it off the loop."""
        self._stage = WINDOW
        detector, metrics = self.detector, self.metrics
        if self.config.repartition_topic:
            records = [self._record(e.message) for e in events]
        else:
            records = [
                RawRecord(e.message.value, e.message.key, e.message.timestamp, e.message.partition,
                          e.message.offset, tuple(e.message.headers or ()))
                for e in events
            ]
        metrics.events_consumed.inc(len(records))
        loop = asyncio.get_running_loop()
        parts: list[tuple[PreparedBatch, asyncio.Future | None]] = []
        sent = self.out.group()
        scored = 0
        part_size, executor, score = self.part_size, self.executor, detector.score
        for first in range(0, len(records), part_size):
            batch = detector.prepare(records[first:first + part_size], first_row=scored)
            scored += len(batch)
            parts.append((batch, loop.run_in_executor(executor, score, batch) if len(batch) else None))
            for record, invalid in batch.invalid:
                self.dead_letter(sent, record, invalid)
            for record, key in batch.forward:
                self.forward(sent, record, key)
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
        scoring = Scoring(events, parts, sent)
        self.unjudged.append(scoring)
        return scoring

    def _record(self, message: Any) -> RawRecord:
        """The record of a message of the input or (repartitioning) the repartition topic."""
        headers = tuple(message.headers or ())
        if message.topic != self.config.repartition_topic:
            return RawRecord(message.value, message.key, message.timestamp, message.partition, message.offset, headers)
        origin = next((value.decode("utf-8", "replace") for name, value in headers
                       if name == SOURCE_HEADER and isinstance(value, bytes)), None)
        origin_partition = origin_offset = -1
        if origin is not None:
            try:
                _, partition, offset = origin.rsplit(":", 2)
                origin_partition, origin_offset = int(partition), int(offset)
            except ValueError:
                pass  # not one of ours: windowed, never taken for a duplicate
        return RawRecord(message.value, message.key, message.timestamp, message.partition, message.offset, headers,
                         repartitioned=True, origin=origin, origin_partition=origin_partition,
                         origin_offset=origin_offset)

    def forward(self, sent: Deliveries, record: RawRecord, key: str) -> None:
        """Forwards an input event to its window key's partition of the repartition topic: its value,
        headers and timestamp unchanged, keyed by its window key, with its input position in a
        header. In the batch's deliveries, so its offset is acked only once the broker has it."""
        router = self.detector.windows.router
        assert router is not None
        headers = [*record.headers, (SOURCE_HEADER, f"{self.config.input_topic}:{record.partition}:"
                                                    f"{record.offset}".encode())]
        sent.send(self.config.repartition_topic, key.encode(), record.value, router.home(key), headers,
                  int(record.timestamp * 1000) if record.timestamp else None)

    def dead_letter(self, sent: Deliveries, record: RawRecord, invalid: Invalid) -> None:
        """Counts, logs (at most once per reason every ``invalid_log_interval_s``) and sends one
        refused message to the dead-letter topic, cut to fit the producer's size limit if need be."""
        config = self.config
        self.metrics.events_invalid.labels(reason=invalid.reason).inc()
        self.invalid_log.log(invalid.reason, "invalid event at %s[%d]@%d: %s (%s)", config.input_topic,
                             record.partition, record.offset, invalid.reason, invalid.detail)
        source = (f"{config.repartition_topic}:{record.partition}:{record.offset}" if record.repartitioned
                  else f"{config.input_topic}:{record.partition}:{record.offset}")
        letter = dead_letter(record.value, record.key, record.headers, invalid.reason, invalid.detail,
                             source, self.out.max_message_bytes)
        if letter.truncated:
            self.metrics.dead_letters_truncated.inc()
        sent.send(config.dead_letter_topic, letter.key, letter.value, headers=letter.headers)

    async def _scores(self, batch: PreparedBatch, future: asyncio.Future) -> Scores:
        """The part's scores; a model call that raises is made again, ``MODEL_ATTEMPTS`` in all."""
        self._stage = SCORE
        for attempt in range(1, MODEL_ATTEMPTS + 1):
            try:
                return await future
            except Exception as exc:
                if attempt == MODEL_ATTEMPTS:
                    raise BatchFailed(SCORE, exc) from exc
                self.metrics.model_call_retries.inc()
                log.warning("model call failed (%s: %s); retrying (%d of %d)", type(exc).__name__, exc, attempt + 1,
                            MODEL_ATTEMPTS)
                future = asyncio.get_running_loop().run_in_executor(self.executor, self.detector.score, batch)
        raise AssertionError("unreachable")

    def _finish(self, batch: PreparedBatch, scores: Scores, sent: Deliveries) -> list[Decision]:
        """Judges a scored part; a window whose score is NaN or infinite is not judged (it is neither
        calm nor over) and its event is dead-lettered."""
        n = len(batch)
        values = np.asarray(scores.scores[:n])
        finite = np.isfinite(values)
        if not finite.all():
            for i in np.flatnonzero(~finite).tolist():
                self.dead_letter(sent, batch.records[i], Invalid(NON_FINITE_SCORE, f"model score {values[i]!r}"))
            keep = np.flatnonzero(finite)
            shadow = batch.shadow
            batch = PreparedBatch(windows=batch.windows[keep], events=[batch.events[i] for i in keep.tolist()],
                                  records=[batch.records[i] for i in keep.tolist()],
                                  newest=batch.newest[keep] if batch.newest is not None else None,
                                  challenger=batch.challenger,
                                  shadow=None if shadow is None else Scores(np.asarray(shadow.scores[:n])[keep],
                                                                            np.asarray(shadow.feature_errors[:n])[keep]))
            scores = Scores(np.asarray(scores.scores[:n])[keep], np.asarray(scores.feature_errors[:n])[keep])
            if not len(batch):
                return []
        return self.detector.finish(batch, scores)

    async def judge(self, scoring: Scoring) -> Published:
        """Thresholds and incidents for a scored batch; its alerts (and scores) are sent."""
        detector, metrics, config = self.detector, self.metrics, self.config
        sent = scoring.sent
        decisions = []
        invalid_before = sum(len(batch.invalid) for batch, _ in scoring.parts)
        non_finite = 0
        for batch, scores in scoring.parts:  # judging the first parts while the last are scored
            if scores is not None:
                result = await self._scores(batch, scores)
                self._stage = JUDGE
                judged = self._finish(batch, result, sent)
                non_finite += len(batch) - len(judged)
                decisions.extend(judged)
        self._stage = JUDGE
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
        self._stage = SEND_ALERTS
        alerts_topic, scores_topic = config.alerts_topic, config.scores_topic
        for message, _ in messages:
            sent.send(alerts_topic, message["key"].encode(), encode_alert(message))
        shadow = self._send_shadow(sent) if detector.shadow_pending else []  # nothing to do without a challenger
        if scores_topic:
            version = detector.artifact.version
            for d in decisions:
                sent.send(scores_topic, d.event.key.encode(), orjson.dumps({
                    "key": d.event.key, "event_id": d.event.event_id, "event_timestamp": d.event.timestamp,
                    "score": d.score, "threshold": d.threshold, "model_version": version}))
        self._stage = JUDGE
        if over:
            metrics.windows_over_threshold.inc(over)
        lifecycle = detector.incidents
        metrics.incidents_suppressed.inc(lifecycle.stats.suppressed - self.suppressed_seen)
        self.suppressed_seen = lifecycle.stats.suppressed
        metrics.incidents_open.set(lifecycle.open_count)
        metrics.keys_calibrated.set(getattr(detector.threshold, "calibrated_keys", 0))
        metrics.active_keys.set(len(detector.windows))
        return Published(sent, messages, invalid_before + non_finite, shadow,
                         sum(len(batch.forward) for batch, _ in scoring.parts))

    def _send_shadow(self, sent: Deliveries) -> list[dict[str, Any]]:
        """Sends the challenger's alert messages to the shadow topic (never the alerts topic) and
        counts both models' verdicts on the windows they both judged."""
        messages, counts = self.detector.drain_shadow()
        topic = self.config.shadow_topic_name
        for message in messages:
            sent.send(topic, message["key"].encode(), encode_alert(message))
        if counts.judged:
            windows, agreement = self.metrics.shadow_windows, self.metrics.shadow_agreement
            windows.labels(model=CHAMPION_MODEL, outcome=OVER).inc(counts.champion_over)
            windows.labels(model=CHAMPION_MODEL, outcome=UNDER).inc(counts.judged - counts.champion_over)
            windows.labels(model=CHALLENGER_MODEL, outcome=OVER).inc(counts.challenger_over)
            windows.labels(model=CHALLENGER_MODEL, outcome=UNDER).inc(counts.judged - counts.challenger_over)
            for name, n in counts.agreement().items():
                agreement.labels(agreement=name).inc(n)
        return messages

    async def publish(self, published: Published) -> None:
        """Waits for the broker to acknowledge a batch's alerts and dead letters."""
        if not len(published.sent):
            return
        await published.sent.wait()  # broker acks before the input offsets are acked
        metrics = self.metrics
        if published.dead_letters:
            metrics.dead_lettered.inc(published.dead_letters)
        if published.forwarded:
            metrics.events_repartitioned.inc(published.forwarded)
        done = time.time()
        for message, record in published.messages:
            metrics.alerts_published.inc()
            metrics.alert_messages.labels(state=message["state"]).inc()
            if message["state"] == "close":
                metrics.incidents_closed.labels(reason=message["incident"]["close_reason"]).inc()
            if record is not None and record.timestamp:
                metrics.event_to_alert_seconds.observe(max(done - record.timestamp, 0.0))
        for message in published.shadow:
            metrics.shadow_alert_messages.labels(state=message["state"]).inc()
