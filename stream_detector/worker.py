"""The Faust worker: Kafka in, :class:`~stream_detector.detector.Detector` in the middle, alerts out.

This is the one place where the pieces are wired together. Per micro-batch
(``stream.take_events(batch_max, within)``):

1. decode and window the batch on the event loop (fast, per event);
2. score it in one model call on a dedicated thread, so heartbeats and commits never stall;
3. publish alerts and dead letters, and wait until the broker has acknowledged them;
4. only then does the loop move on, and Faust acks (and later commits) the batch's offsets.

Agent concurrency stays 1: with more, faust-streaming can commit offsets ahead of unfinished
events (faust-streaming issue #606).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable

import faust

from .artifacts import load_artifact
from .detector import Detector, RawRecord
from .kafka.local_broker import ensure_topics
from .metrics import WorkerMetrics
from .scoring import ModelRunner, configure_threads
from .settings import Settings
from .thresholds import GlobalThreshold
from .alerts import encode_alert

log = logging.getLogger("stream_detector.worker")


def _broker_url(bootstrap_servers: str) -> str:
    return ";".join(f"kafka://{server.strip()}" for server in bootstrap_servers.split(",") if server.strip())


class DetectorService:
    """Loads the model, owns the detector, and records metrics: everything except Kafka."""

    def __init__(self, settings: Settings, metrics: WorkerMetrics | None = None):
        self.settings = settings
        self.metrics = metrics or WorkerMetrics()
        configure_threads(settings.torch_threads)
        artifact = load_artifact(settings.model_path)
        self.runner = ModelRunner(artifact, device=settings.device, max_batch=settings.batch_max)
        threshold = GlobalThreshold(settings.threshold if settings.threshold is not None else artifact.threshold)
        self.detector = Detector(
            artifact,
            scorer=self._timed_score,
            threshold=threshold,
            key_field=settings.key_field,
            max_keys=settings.max_keys,
            key_ttl_s=settings.key_ttl_s,
            max_message_bytes=settings.max_message_bytes,
            top_features=settings.top_features,
            max_batch=settings.batch_max,
        )
        self.detector.windows.store.on_evict = self._on_evict
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self.metrics.model_info.info({
            "version": artifact.version,
            "kind": artifact.kind,
            "profile": artifact.profile.name,
            "window": str(artifact.window),
            "features": ",".join(artifact.feature_names),
            "device": str(self.runner.device),
        })
        self.metrics.model_threshold.set(threshold.value)
        log.info("serving model %s (%s, profile %s, window %d) on %s, threshold %.4g",
                 artifact.version, artifact.kind, artifact.profile.name, artifact.window, self.runner.device,
                 threshold.value)

    def _on_evict(self, reason: str, n: int) -> None:
        self.detector.stats.evicted[reason] += n
        self.metrics.keys_evicted.labels(reason=reason).inc(n)

    def _timed_score(self, windows):
        started = time.perf_counter()
        scores = self.runner.score(windows)
        self.metrics.inference_seconds.observe(time.perf_counter() - started)
        self.metrics.batch_size.observe(len(windows))
        return scores


def create_app(settings: Settings, service: DetectorService) -> faust.App:
    app = faust.App(
        settings.consumer_group,
        broker=_broker_url(settings.bootstrap_servers),
        autodiscover=False,
        store="memory://",
        web_enabled=False,
        value_serializer="raw",
        key_serializer="raw",
        consumer_auto_offset_reset=settings.auto_offset_reset,
        producer_acks=-1,
        broker_commit_interval=1.0,
        topic_allow_declare=False,
        loghandlers=[],
    )
    source = app.topic(settings.input_topic, key_serializer="raw", value_serializer="raw")
    alerts = app.topic(settings.alerts_topic, key_serializer="raw", value_serializer="raw")
    dead_letters = app.topic(settings.dead_letter_topic, key_serializer="raw", value_serializer="raw")
    detector, metrics = service.detector, service.metrics

    @app.agent(source, concurrency=1)
    async def detect(stream: faust.StreamT) -> None:
        loop = asyncio.get_running_loop()
        async for events in stream.take_events(settings.batch_max, within=settings.batch_within_s):
            records = [
                RawRecord(e.message.value, e.message.key, e.message.timestamp, e.message.partition,
                          e.message.offset, tuple(e.message.headers or ()))
                for e in events
            ]
            batch = detector.prepare(records)
            metrics.events_consumed.inc(len(records))
            pending: list[Awaitable[Any]] = []
            for record, invalid in batch.invalid:
                metrics.events_invalid.labels(reason=invalid.reason).inc()
                log.warning("invalid event at %s[%d]@%d: %s (%s)", settings.input_topic, record.partition,
                            record.offset, invalid.reason, invalid.detail)
                headers = list(record.headers) + [
                    ("x-dlq-reason", invalid.reason.encode()),
                    ("x-dlq-detail", invalid.detail.encode("utf-8", "replace")),
                    ("x-dlq-source", f"{settings.input_topic}:{record.partition}:{record.offset}".encode()),
                ]
                pending.append(await dead_letters.send(key=record.key, value=record.value or b"", headers=headers,
                                                       force=True))
            if batch.warming_up:
                metrics.events_warming_up.inc(batch.warming_up)
            alert_records: list[RawRecord] = []
            if len(batch):
                scores = await loop.run_in_executor(service.executor, detector.score, batch)
                decisions = detector.finish(batch, scores)
                metrics.windows_scored.inc(len(decisions))
                for d in decisions:
                    metrics.score_ratio.observe(d.score / d.threshold if d.threshold > 0 else d.score)
                    if d.alert is not None:
                        pending.append(await alerts.send(key=d.event.key.encode(), value=encode_alert(d.alert),
                                                         force=True))
                        alert_records.append(d.record)
            if pending:
                await asyncio.gather(*pending)  # broker acks before the input offsets are acked
                if batch.invalid:
                    metrics.dead_lettered.inc(len(batch.invalid))
                done = time.time()
                for record in alert_records:
                    metrics.alerts_published.inc()
                    if record.timestamp:
                        metrics.event_to_alert_seconds.observe(max(done - record.timestamp, 0.0))
            metrics.active_keys.set(len(detector.windows))

    return app


def run_worker(settings: Settings) -> None:
    """Blocks until SIGINT/SIGTERM."""
    ensure_topics(settings.bootstrap_servers, {
        settings.input_topic: 1, settings.alerts_topic: 1, settings.dead_letter_topic: 1,
    })
    service = DetectorService(settings)
    service.metrics.serve(settings.metrics_host, settings.metrics_port)
    if settings.metrics_port:
        log.info("metrics at http://%s:%d/metrics", settings.metrics_host, settings.metrics_port)
    app = create_app(settings, service)
    worker = faust.Worker(app, loglevel=settings.log_level.upper(), quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()
