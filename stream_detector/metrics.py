"""Prometheus metrics of the worker: base units, no per-key labels (keys are unbounded).

The endpoint also answers ``/healthz`` (the process is alive) and ``/readyz`` (partitions
assigned, model loaded, changelog recovery done), each with its own status code, for probes.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Sequence

import numpy as np
from prometheus_client import (CollectorRegistry, Counter, Gauge, GCCollector, Histogram, Info, PlatformCollector, ProcessCollector)
from prometheus_client import disable_created_metrics
from prometheus_client.exposition import choose_encoder

from .errors import PROCESSING_REASONS
from .events import REASONS

# `_created` series double the exposition size and no dashboard uses them.
disable_created_metrics()

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
_INFERENCE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_SCORE_BUCKETS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0)


def observe_many(histogram: Histogram, values: Sequence[float]) -> None:
    """``histogram.observe`` of every value, counted bucket by bucket rather than value by value.

    Per scored window ``observe`` takes the bucket's lock and the sum's once each (about 1 us), a
    cost per event on the event loop; here each bucket a micro-batch reaches is incremented once.
    Reads the histogram's bucket bounds and counters (``_upper_bounds``, ``_buckets``, ``_sum``):
    where a prometheus-client version lacks them it falls back to ``observe``.
    """
    if not len(values):
        return
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or len(buckets) != len(bounds):
        for value in values:
            histogram.observe(value)
        return
    array = np.asarray(values, dtype=np.float64)
    # The first bound >= the value: the bucket `observe` picks (`value <= bound`; +Inf is the last).
    index = np.searchsorted(np.asarray(bounds, dtype=np.float64), array, side="left")
    counts = np.bincount(index[index < len(bounds)], minlength=len(bounds))  # NaN: in no bucket, as there
    total.inc(float(array.sum()))
    for index in np.flatnonzero(counts).tolist():
        buckets[index].inc(int(counts[index]))


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # process_* (memory, CPU, open files) and python_* (version, GC) series, as on the default registry.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        # /readyz: a callable naming each readiness check and whether it holds (set by the worker).
        self.readiness: Callable[[], dict[str, bool]] = lambda: {"started": False}
        self._server: ThreadingHTTPServer | None = None
        p = "stream_detector_"
        self.events_consumed = Counter(p + "events_consumed", "Messages consumed from the input topic.", registry=r)
        self.events_invalid = Counter(p + "events_invalid", "Messages rejected by validation, by reason.",
                                      ["reason"], registry=r)
        self.dead_lettered = Counter(p + "events_dead_lettered", "Invalid messages published to the dead-letter topic.",
                                     registry=r)
        self.events_warming_up = Counter(p + "events_warming_up",
                                         "Valid events of keys whose window is not full yet (not scored).", registry=r)
        self.windows_scored = Counter(p + "windows_scored", "Windows scored by the model.", registry=r)
        self.events_unscored = Counter(p + "events_unscored",
                                       "Events of hot keys not scored because of score_stride (still windowed).",
                                       registry=r)
        self.alerts_published = Counter(p + "alerts_published", "Alerts acknowledged by the broker.", registry=r)
        self.batch_size = Histogram(p + "batch_windows", "Windows scored per micro-batch.",
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.inference_seconds = Histogram(
            p + "inference_seconds", "Model call duration (a micro-batch; on CPU, a part of one of up to 256 windows).",
            buckets=_INFERENCE_BUCKETS, registry=r)
        self.event_to_alert_seconds = Histogram(
            p + "event_to_alert_seconds",
            "From the input message's broker timestamp to the alert's acknowledgement.",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.score_ratio = Histogram(p + "score_threshold_ratio", "Scored windows' score divided by their threshold.",
                                     buckets=_SCORE_BUCKETS, registry=r)
        self.active_keys = Gauge(p + "active_keys", "Keys with a live window.", registry=r)
        self.keys_evicted = Counter(p + "keys_evicted", "Keys whose window was dropped, by reason.", ["reason"],
                                    registry=r)
        self.events_replayed = Counter(p + "events_replayed",
                                       "Redelivered events already held by a restored window (not applied twice).",
                                       registry=r)
        self.events_repartitioned = Counter(
            p + "events_repartitioned", "Events forwarded to the repartition topic, keyed by their window key "
            "(key_partition_check=repartition), acknowledged by the broker: windowed where that topic is read.",
            registry=r)
        self.keys_restored = Counter(p + "keys_restored", "Key windows restored from the state changelog.",
                                     registry=r)
        self.positions_dropped = Counter(
            p + "state_positions_dropped", "Restored key windows whose input position was dropped: their partition's "
            "committed offset went back (a group reset or the input topic recreated), or it named an offset past the "
            "partition's end.", registry=r)
        self.state_writes = Counter(p + "state_writes", "Key window snapshots written to the state changelog.",
                                    registry=r)
        self.model_reloads = Counter(p + "model_reloads", "Newer model versions hot-swapped in.", registry=r)
        self.model_reload_failures = Counter(p + "model_reload_failures",
                                             "Model versions refused (checksum, format or shape).", registry=r)
        self.model_info = Info(p + "model", "The model being served.", registry=r)
        self.model_threshold = Gauge(p + "model_threshold", "Alert threshold of the served model.", registry=r)
        # Consumer lag of the worker's group on the input topic, set by stream_detector.lag (labels are
        # bounded by the partition count).
        self.consumer_lag = Gauge(p + "consumer_lag",
                                  "Messages behind: high watermark minus committed offset, per input partition.",
                                  ["topic", "partition"], registry=r)
        self.consumer_committed_offset = Gauge(p + "consumer_committed_offset",
                                               "Offset committed by the worker's consumer group, per input partition.",
                                               ["topic", "partition"], registry=r)
        self.consumer_high_watermark = Gauge(p + "consumer_high_watermark",
                                             "High watermark (next offset to be written), per input partition.",
                                             ["topic", "partition"], registry=r)
        self.consumer_lag_errors = Counter(p + "consumer_lag_errors",
                                           "Failed consumer lag reads (broker unreachable, timeouts).", registry=r)
        # Thresholds and the alert lifecycle (stream_detector.thresholds, stream_detector.incidents).
        # alert_messages_total{state} sums to alerts_published_total.
        self.alert_messages = Counter(p + "alert_messages",
                                      "Alert messages acknowledged by the broker, by state (open, update, close).",
                                      ["state"], registry=r)
        self.incidents_closed = Counter(p + "incidents_closed", "Incidents closed, by reason.", ["reason"],
                                        registry=r)
        self.incidents_open = Gauge(p + "incidents_open", "Incidents opened and not closed yet.", registry=r)
        self.incidents_suppressed = Counter(
            p + "incidents_suppressed",
            "Runs of over-threshold windows too short and too mild to open an incident (never published).",
            registry=r)
        self.windows_over_threshold = Counter(p + "windows_over_threshold",
                                              "Scored windows over their key's threshold.", registry=r)
        self.keys_calibrated = Gauge(p + "keys_calibrated",
                                     "Keys served with their own adaptive threshold (warm-up over).", registry=r)
        # The model lifecycle: operators' verdicts (stream_detector.feedback) and input drift
        # (stream_detector.drift). The gauges are read when scraped (set_function), per feature, never per key.
        self.feedback = Counter(p + "feedback", "Operators' verdicts on incidents read from the feedback topic, by "
                                "verdict.", ["verdict"], registry=r)
        self.feedback_invalid = Counter(p + "feedback_invalid",
                                        "Feedback messages refused (dead-lettered with reason invalid_feedback).",
                                        registry=r)
        self.feature_drift = Gauge(p + "feature_drift",
                                   "Per feature: distance of the recent mean standardised value of scored windows "
                                   "from the training one, in training standard deviations.", ["feature"],
                                   registry=r)
        self.keys_on_threshold_bounds = Gauge(p + "keys_on_threshold_bounds",
                                              "Share of calibrated keys whose adaptive threshold sits at "
                                              "threshold_min_ratio or threshold_max_ratio.", registry=r)
        # Shadow scoring (stream_detector.shadow): counted only while a challenger is set.
        self.shadow_windows = Counter(p + "shadow_windows", "Windows judged by both the champion and the challenger, "
                                      "by model and verdict (over or under the model's alert level).",
                                      ["model", "outcome"], registry=r)
        self.shadow_agreement = Counter(p + "shadow_agreement", "Windows judged by both models, by which of them "
                                        "judged the window over its alert level.", ["agreement"], registry=r)
        self.shadow_alert_messages = Counter(p + "shadow_alert_messages", "The challenger's alert messages "
                                             "acknowledged on the shadow topic, by state.", ["state"], registry=r)
        self.challenger_info = Gauge(p + "challenger_info", "1 for the challenger version shadowing the champion; "
                                     "while none is, one series with an empty version at 0.", ["version"],
                                     registry=r)
        self.challenger_info.labels(version="").set(0)
        self.challenger_load_failures = Counter(p + "challenger_load_failures", "Challenger versions refused "
                                                "(checksum, format, shape or windows unlike the champion's).",
                                                registry=r)
        self.challenger_score_failures = Counter(p + "challenger_score_failures",
                                                 "Challenger model calls that raised (the champion judged alone).",
                                                 registry=r)
        # The batch lifecycle's failures (stream_detector.runtime).
        self.dead_letters_truncated = Counter(
            p + "dead_letters_truncated",
            "Dead letters cut to fit the producer's message.max.bytes (headers carry the original's length and SHA-256).",
            registry=r)
        self.model_call_retries = Counter(p + "model_call_retries", "Model calls that raised and were made again.",
                                          registry=r)
        self.batch_failures = Counter(p + "batch_failures",
                                      "Micro-batches that could not be finished, by stage (the worker then stops).",
                                      ["stage"], registry=r)
        for reason in REASONS + PROCESSING_REASONS:
            self.events_invalid.labels(reason=reason)
        for reason in ("capacity", "idle"):
            self.keys_evicted.labels(reason=reason)
        for state in ("open", "update", "close"):
            self.alert_messages.labels(state=state)
        for reason in ("recovered", "idle", "evicted", "revoked", "stopped", "acknowledged"):
            self.incidents_closed.labels(reason=reason)
        for verdict in ("true_positive", "false_positive", "expected_change"):
            self.feedback.labels(verdict=verdict)
        for model in ("champion", "challenger"):
            for outcome in ("over", "under"):
                self.shadow_windows.labels(model=model, outcome=outcome)
        for agreement in ("both", "champion_only", "challenger_only", "neither"):
            self.shadow_agreement.labels(agreement=agreement)
        for state in ("open", "update", "close"):
            self.shadow_alert_messages.labels(state=state)

    def serve(self, host: str, port: int) -> None:
        """Exposes /metrics, /healthz and /readyz on a daemon thread; binds to loopback unless told otherwise."""
        if port:
            self._server = ThreadingHTTPServer((host, port), _handler(self))
            self._server.daemon_threads = True
            threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True).start()

    @property
    def port(self) -> int | None:
        """The bound port (useful when serving on port 0 would pick one: tests)."""
        return self._server.server_address[1] if self._server is not None else None

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _handler(metrics: WorkerMetrics) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                self._send(200, encoder(metrics.registry), content_type)
            elif path == "/healthz":
                self._send(200, b"alive\n", "text/plain; charset=utf-8")
            elif path == "/readyz":
                try:
                    checks = metrics.readiness()
                except Exception as exc:  # noqa: BLE001 - a probe answers, whatever the worker's state
                    checks = {"readiness check": False, "error": str(exc)}  # type: ignore[dict-item]
                ready = all(value is True for value in checks.values())
                body = json.dumps({"ready": ready, "checks": checks}).encode() + b"\n"
                self._send(200 if ready else 503, body, "application/json")
            else:
                self._send(404, b"not found: /metrics, /healthz, /readyz\n", "text/plain; charset=utf-8")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - scrapes are not logged
            pass

    return Handler
