"""Bad input against the running worker: thousands of generated bad messages and a flood of keys."""

from __future__ import annotations

import math
import time

import orjson
import pytest
from confluent_kafka import Producer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream_detector.kafka.local_broker import ensure_topics
from stream_detector.synthetic import SENSOR_CHANNELS, generate

from worker_harness import WorkerProcess

pytestmark = pytest.mark.integration

_json_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1),
                          st.floats(allow_nan=False),
                          st.text(max_size=12))
_json_values = st.recursive(_json_scalars, lambda inner: st.lists(inner, max_size=3)
                            | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)


def _bad_field_value():
    return st.one_of(st.none(), st.text(max_size=6), st.booleans(),
                     st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), max_size=2),
                     st.just("NaN"))


@st.composite
def bad_messages(draw) -> bytes:
    """Messages a real producer gets wrong: broken bytes, wrong shapes, wrong types, odd numbers."""
    good = {"key": "dev-x", "event_id": draw(st.text(min_size=1, max_size=8)), "timestamp": 1_767_225_600,
            "fields": {c: 0.5 for c in SENSOR_CHANNELS}}
    kind = draw(st.sampled_from(["bytes", "json", "field", "drop", "literal", "timestamp"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "json":
        return orjson.dumps(draw(_json_values), option=orjson.OPT_NON_STR_KEYS)
    if kind == "field":
        good["fields"][draw(st.sampled_from(SENSOR_CHANNELS))] = draw(_bad_field_value())
        return orjson.dumps(good)
    if kind == "drop":
        del good[draw(st.sampled_from(["key", "event_id", "timestamp", "fields"]))]
        return orjson.dumps(good)
    if kind == "literal":
        literal = draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e400"]))
        return orjson.dumps(good).replace(b"0.5", literal, 1)
    good["timestamp"] = draw(st.one_of(st.text(max_size=10), st.floats(allow_nan=False), st.just(4e18),
                                       st.just(time.time() + 10 * 86_400),
                                       st.integers(min_value=-(2**63), max_value=-1)))
    return orjson.dumps(good)


def _generate(n: int) -> list[bytes]:
    out: list[bytes] = []

    @settings(max_examples=n, database=None, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(bad_messages())
    def collect(message: bytes) -> None:
        out.append(message)

    collect()
    return out


@pytest.fixture
def worker(kafka_broker, sensor_model_dir, tmp_path):
    proc = WorkerProcess(kafka_broker.bootstrap_servers, sensor_model_dir, tmp_path / "worker.log",
                         extra_env={"STREAM_DETECTOR_MAX_MESSAGE_BYTES": "20000",
                                    "STREAM_DETECTOR_MAX_KEYS": "10000",
                                    "STREAM_DETECTOR_LOG_LEVEL": "error"})
    ensure_topics(kafka_broker.bootstrap_servers, {proc.input_topic: 2, proc.alerts_topic: 1,
                                                   proc.dead_letter_topic: 1})
    proc.start()
    yield proc
    proc.stop()


def _accounted(metrics: dict[str, float]) -> float:
    invalid = sum(v for k, v in metrics.items() if k.startswith("stream_detector_events_invalid_total"))
    return (metrics["stream_detector_windows_scored_total"] + metrics["stream_detector_events_warming_up_total"]
            + metrics.get("stream_detector_events_replayed_total", 0) + invalid)


def test_five_thousand_generated_bad_messages_are_all_accounted_for(worker, kafka_broker):
    bad = _generate(5000)
    assert len(bad) >= 5000
    bad.append(b"x" * 30_000)  # oversized
    good = generate("sensors", 3, 60, seed=71)
    producer = Producer({"bootstrap.servers": kafka_broker.bootstrap_servers, "linger.ms": 5})
    for i, raw in enumerate(bad):
        producer.produce(worker.input_topic, key=f"k{i % 7}".encode(), value=raw)
        if i % 1000 == 0:
            producer.poll(0)
    for e in good:
        producer.produce(worker.input_topic, key=e.key.encode(), value=orjson.dumps(e.to_message()))
    producer.flush(60)

    total = len(bad) + len(good)
    worker.wait_for_metric("stream_detector_events_consumed_total", total, timeout=240)
    worker.assert_alive()
    metrics = worker.metrics()
    invalid = sum(v for k, v in metrics.items() if k.startswith("stream_detector_events_invalid_total"))
    # Every message is either scored, filling a window, or dead-lettered: none vanished.
    assert _accounted(metrics) == total
    worker.wait_for_metric("stream_detector_events_dead_lettered_total", invalid, timeout=60)
    assert metrics['stream_detector_events_invalid_total{reason="oversized"}'] >= 1
    assert metrics['stream_detector_events_invalid_total{reason="non_finite"}'] >= 1
    assert metrics['stream_detector_events_invalid_total{reason="future_timestamp"}'] >= 1
    assert invalid >= len(bad) - 50  # a generated message may by chance be a valid event
    assert metrics["stream_detector_windows_scored_total"] == len(good) - 3 * 31


def test_a_flood_of_a_million_distinct_keys_stays_within_the_key_bound(worker, kafka_broker):
    n = 1_000_000
    template = orjson.dumps({"key": "KEY", "event_id": "ID", "timestamp": 1_767_225_600,
                             "fields": {c: 0.25 for c in SENSOR_CHANNELS}})
    producer = Producer({"bootstrap.servers": kafka_broker.bootstrap_servers, "linger.ms": 20,
                         "batch.num.messages": 10000, "queue.buffering.max.messages": 500000})
    for i in range(n):
        value = template.replace(b"KEY", f"flood-{i}".encode()).replace(b"ID", str(i).encode())
        while True:
            try:
                producer.produce(worker.input_topic, value=value, partition=i % 2)
                break
            except BufferError:
                producer.poll(0.05)
        if i % 20000 == 0:
            producer.poll(0)
    producer.flush(120)

    worker.wait_for_metric("stream_detector_events_consumed_total", n, timeout=900)
    metrics = worker.metrics()
    assert metrics["stream_detector_active_keys"] <= 10_000
    evicted = metrics['stream_detector_keys_evicted_total{reason="capacity"}']
    assert evicted == n - metrics["stream_detector_active_keys"]
    assert metrics["stream_detector_events_warming_up_total"] == n  # one event per key: none is scored
    rss_kib = int(next(line.split()[1] for line in open(f"/proc/{worker.process.pid}/status")
                       if line.startswith("VmRSS")))
    print(f"1,000,000 keys flooded: {int(evicted)} evicted, RSS {rss_kib / 1024:.0f} MiB")
    assert rss_kib < 2 * 1024 * 1024  # bounded: far from what a million live windows would take
    assert math.isfinite(rss_kib)
