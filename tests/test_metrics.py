"""Metrics helpers: what is exported must not depend on how it was counted."""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Histogram

from stream_detector.metrics import observe_many


def _exported(histogram: Histogram) -> dict[str, float]:
    return {f"{s.name}{sorted(s.labels.items())}": s.value for metric in histogram.collect() for s in metric.samples
            if not s.name.endswith("_created")}


def test_observing_a_batch_at_once_exports_exactly_what_observing_each_value_does():
    values = [0.1, 0.25, 0.2500001, 1.0, 3.0, 49.9, 50.0, 1e9, -2.0, math.inf, 0.75, 0.75]
    registry = CollectorRegistry()
    buckets = (0.25, 0.5, 0.75, 1.0, 5.0, 50.0)
    one_by_one = Histogram("one", "d", buckets=buckets, registry=registry)
    at_once = Histogram("many", "d", buckets=buckets, registry=registry)
    for value in values:
        one_by_one.observe(value)
    observe_many(at_once, values[:5])
    observe_many(at_once, values[5:])
    observe_many(at_once, [])
    expected = {k.replace("one", "many", 1): v for k, v in _exported(one_by_one).items()}
    assert _exported(at_once) == expected


def test_a_nan_score_is_summed_and_lands_in_no_bucket_as_with_observe():
    registry = CollectorRegistry()
    one_by_one = Histogram("one", "d", buckets=(1.0,), registry=registry)
    at_once = Histogram("many", "d", buckets=(1.0,), registry=registry)
    for value in (0.5, math.nan):
        one_by_one.observe(value)
    observe_many(at_once, [0.5, math.nan])
    a, b = _exported(one_by_one), _exported(at_once)
    assert [v for k, v in sorted(a.items()) if "bucket" in k] == [v for k, v in sorted(b.items()) if "bucket" in k]
    assert math.isnan(a["one_sum[]"]) and math.isnan(b["many_sum[]"])


def _get(url: str) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_metrics_endpoint_has_process_and_python_series_and_separate_health_endpoints():
    import json
    import socket

    from stream_detector.metrics import WorkerMetrics

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    metrics = WorkerMetrics()
    metrics.serve("127.0.0.1", port)
    try:
        base = f"http://127.0.0.1:{port}"
        status, body = _get(base + "/metrics")
        text = body.decode()
        assert status == 200
        for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds",
                     "python_info", "python_gc_collections_total", "stream_detector_events_consumed_total"):
            assert f"\n{name}" in text, name
        assert _get(base + "/healthz") == (200, b"alive\n")
        status, body = _get(base + "/readyz")
        assert status == 503 and json.loads(body)["ready"] is False  # nothing said it is ready yet
        metrics.readiness = lambda: {"model_loaded": True, "partitions_assigned": False, "recovery_done": True}
        status, body = _get(base + "/readyz")
        assert status == 503 and json.loads(body)["checks"]["partitions_assigned"] is False
        metrics.readiness = lambda: {"model_loaded": True, "partitions_assigned": True, "recovery_done": True}
        assert _get(base + "/readyz")[0] == 200
        metrics.readiness = lambda: 1 / 0
        assert _get(base + "/readyz")[0] == 503  # a failing check answers not ready, never crashes the server
        assert _get(base + "/other")[0] == 404
    finally:
        metrics.close()
