"""The product's core path on a real broker: events in, the worker, alerts out, metrics served."""

from __future__ import annotations

import json
from importlib import resources

import jsonschema
import orjson
import pytest
from confluent_kafka import Consumer, Producer

from stream_detector.kafka.local_broker import ensure_topics
from stream_detector.producer import iter_messages, produce_events
from stream_detector.synthetic import generate

from worker_harness import WorkerProcess

pytestmark = pytest.mark.integration

WINDOW = 32  # the window of conftest's sensor_model_dir


@pytest.fixture
def worker(kafka_broker, sensor_model_dir, tmp_path):
    proc = WorkerProcess(kafka_broker.bootstrap_servers, sensor_model_dir, tmp_path / "worker.log")
    ensure_topics(kafka_broker.bootstrap_servers, {proc.input_topic: 4, proc.alerts_topic: 1,
                                                   proc.dead_letter_topic: 1})
    proc.start()
    yield proc
    proc.stop()


def _alert_validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(resources.files("stream_detector").joinpath("schemas/alert.schema.json").read_text())
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


def test_labelled_stream_through_the_broker_catches_injected_anomalies(worker, kafka_broker):
    events = generate("sensors", 20, 520, anomaly_rate=0.02, seed=7)  # the demo's default rate
    assert len(events) >= 10_000
    produce_events(kafka_broker.bootstrap_servers, worker.input_topic, events, rate=0)

    consumed = worker.wait_for_metric("stream_detector_events_consumed_total", len(events), timeout=300)
    assert consumed == len(events)
    metrics = worker.metrics()
    keys = {e.key for e in events}
    expected_scored = len(events) - len(keys) * (WINDOW - 1)  # the first W-1 events of a key fill its window
    worker.wait_for_metric("stream_detector_windows_scored_total", expected_scored)

    alerts = list(iter_messages(kafka_broker.bootstrap_servers, worker.alerts_topic, idle_timeout=5.0))
    validator = _alert_validator()
    for alert in alerts:
        validator.validate(alert)
    assert len(alerts) == worker.metrics()["stream_detector_alerts_published_total"]

    labels = {e.event_id: e.label for e in events}
    # Alerts come in incidents (open, update, close); each over-threshold window is listed in the
    # event_ids of exactly one message, so their union is every event reported as anomalous.
    alerted = {event_id for a in alerts for event_id in a["event_ids"]}
    anomalous = {eid for eid, lab in labels.items() if lab}
    normal_scored = expected_scored - len(anomalous)  # anomalies are injected after every key's warm-up
    recall = len(alerted & anomalous) / len(anomalous)
    false_alarm_rate = len(alerted - anomalous) / normal_scored
    print(f"anomalous events {len(anomalous)}, recall {recall:.3f}, false alarms {len(alerted - anomalous)} "
          f"of {normal_scored} normal windows ({false_alarm_rate:.4f})")
    assert recall >= 0.9
    assert false_alarm_rate <= 0.01
    assert metrics["stream_detector_events_invalid_total{reason=\"malformed_json\"}"] == 0


def test_bad_input_is_counted_dead_lettered_and_never_stops_the_worker(worker, kafka_broker):
    bootstrap = kafka_broker.bootstrap_servers
    good = generate("sensors", 2, 40, anomaly_rate=0.0, seed=3)
    valid = orjson.loads(orjson.dumps(good[0].to_message()))
    bad: list[tuple[bytes, str]] = [
        (b"{not json", "malformed_json"),
        (b"[1, 2, 3]", "not_an_object"),
        (orjson.dumps({**valid, "fields": {k: v for k, v in valid["fields"].items() if k != "Pressure"}}),
         "missing_field"),
        (orjson.dumps({**valid, "fields": {**valid["fields"], "Pressure": "high"}}), "non_numeric"),
        (b'{"key": "k", "event_id": "e", "timestamp": 1, "fields": {"Pressure": 1e999}}', "missing_field"),
        (orjson.dumps({**valid, "fields": {**valid["fields"], "Pressure": 1e999}}).replace(b"null", b"1e999"),
         "non_finite"),
        (orjson.dumps({k: v for k, v in valid.items() if k != "key"}), "missing_key"),
        (orjson.dumps({**valid, "timestamp": "yesterday"}), "bad_timestamp"),
        (b'{"key": "k", "event_id": "e", "timestamp": 1, "fields": {"Pressure": NaN}}', "non_finite"),
        (b"", "empty"),
    ]
    producer = Producer({"bootstrap.servers": bootstrap})
    for raw, _ in bad:
        producer.produce(worker.input_topic, key=b"k", value=raw, headers=[("origin", b"test")])
    producer.flush(30)
    produce_events(bootstrap, worker.input_topic, good, rate=0)

    total = len(bad) + len(good)
    worker.wait_for_metric("stream_detector_events_consumed_total", total)
    worker.wait_for_metric("stream_detector_events_dead_lettered_total", len(bad))
    worker.assert_alive()
    metrics = worker.metrics()
    expected: dict[str, int] = {}
    for _, reason in bad:
        expected[reason] = expected.get(reason, 0) + 1
    for reason, count in expected.items():
        assert metrics[f'stream_detector_events_invalid_total{{reason="{reason}"}}'] == count, reason
    assert metrics["stream_detector_windows_scored_total"] == len(good) - 2 * (WINDOW - 1)

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "dlq-check", "auto.offset.reset": "earliest"})
    consumer.subscribe([worker.dead_letter_topic])
    dead: list[tuple[bytes, dict[str, bytes]]] = []
    for _ in range(200):
        msg = consumer.poll(0.2)
        if msg is not None and not msg.error():
            dead.append((msg.value() or b"", dict(msg.headers() or [])))
        if len(dead) == len(bad):
            break
    consumer.close()
    assert sorted(d[0] for d in dead) == sorted(raw for raw, _ in bad)  # original bytes, nothing lost
    for value, headers in dead:
        reason = dict((raw, r) for raw, r in bad)[value]
        assert headers["x-dlq-reason"].decode() == reason
        assert headers["origin"] == b"test"  # original headers travel with it


def test_metrics_endpoint_serves_prometheus_text(worker):
    text = worker.metrics_text()
    names = {
        "stream_detector_events_consumed_total",
        "stream_detector_events_invalid_total",
        "stream_detector_windows_scored_total",
        "stream_detector_alerts_published_total",
        "stream_detector_batch_windows_bucket",
        "stream_detector_inference_seconds_bucket",
        "stream_detector_event_to_alert_seconds_bucket",
        "stream_detector_active_keys",
        "stream_detector_model_info",
        "stream_detector_keys_evicted_total",
    }
    samples = set(worker.metrics())
    for name in names:
        assert any(s == name or s.startswith(name + "{") for s in samples), name
    assert "# TYPE stream_detector_inference_seconds histogram" in text
    info = next(s for s in samples if s.startswith("stream_detector_model_info{"))
    assert 'profile="sensors"' in info and 'kind="lstm_ae"' in info and 'device="cpu"' in info
