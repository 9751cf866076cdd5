"""The worker on a topic shaped as Kafka shops have them: flat events keyed by the record key,
event time and id from the record; client properties and topic configs passed through; the lag
exporter off; readiness on /readyz. Against the real broker, the real worker as a subprocess."""

from __future__ import annotations

import json
from datetime import datetime
import urllib.error
import urllib.request

import orjson
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, ConfigResource

from stream_detector.producer import iter_messages
from stream_detector.synthetic import generate

from worker_harness import WorkerProcess

pytestmark = pytest.mark.integration


def _status(url: str) -> tuple[int, dict | bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            body = response.read()
            return response.status, json.loads(body) if body.startswith(b"{") else body
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _topic_config(bootstrap: str, topic: str) -> dict[str, str]:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
    entries = admin.describe_configs([resource])[resource].result(timeout=30)
    return {name: entry.value for name, entry in entries.items()}


def test_flat_events_keyed_by_the_record_key_are_scored_and_alerted_with_record_positions(
        kafka_broker, sensor_model_dir, tmp_path):
    worker = WorkerProcess(kafka_broker.bootstrap_servers, sensor_model_dir, tmp_path / "worker.log", extra_env={
        "STREAM_DETECTOR_EVENT_KEY_FROM": "record_key",
        "STREAM_DETECTOR_EVENT_FIELDS_PATH": "",
        "STREAM_DETECTOR_EVENT_TIME_FROM": "record_timestamp",
        "STREAM_DETECTOR_EVENT_ID_FROM": "record_position",
        "STREAM_DETECTOR_LAG_EXPORTER": "false",
        "STREAM_DETECTOR_TOPIC_REPLICATION_FACTOR": "1",
        "STREAM_DETECTOR_ALERTS_TOPIC_CONFIG__RETENTION_MS": "604800000",
        "STREAM_DETECTOR_DEAD_LETTER_TOPIC_CONFIG__MAX_MESSAGE_BYTES": "2000000",
        "STREAM_DETECTOR_CHANGELOG_TOPIC_CONFIG__MIN_CLEANABLE_DIRTY_RATIO": "0.2",
        "STREAM_DETECTOR_KAFKA_PRODUCER__COMPRESSION_TYPE": "zstd",
        "STREAM_DETECTOR_KAFKA_COMMON__CLIENT_ID": "detector-under-test",
        "STREAM_DETECTOR_ALERT_MIN_WINDOWS": "1",
    })
    worker.start()
    try:
        base = f"http://127.0.0.1:{worker.metrics_port}"
        assert _status(base + "/healthz") == (200, b"alive\n")
        events = generate("sensors", 3, 120, anomaly_rate=0.05, seed=5)
        producer = Producer({"bootstrap.servers": kafka_broker.bootstrap_servers})
        for e in events:  # the body is only the channels: key and time are the record's
            producer.produce(worker.input_topic, key=e.key.encode(), value=orjson.dumps(e.fields),
                             timestamp=int(e.timestamp * 1000))
        producer.produce(worker.input_topic, key=None, value=orjson.dumps(events[0].fields))  # no key: dead letter
        producer.flush(30)
        scored = len(events) - 3 * 31  # the model's window is 32
        worker.wait_for_metric("stream_detector_windows_scored_total", scored, timeout=180)
        metrics = worker.metrics()
        assert metrics['stream_detector_events_invalid_total{reason="missing_key"}'] == 1
        assert sum(v for k, v in metrics.items() if k.startswith("stream_detector_events_invalid_total")) == 1
        assert not [k for k in metrics if k.startswith("stream_detector_consumer_lag{")]  # the exporter is off
        status, ready = _status(base + "/readyz")
        assert status == 200 and ready["checks"] == {"model_loaded": True, "partitions_assigned": True,
                                                     "recovery_done": True}

        alerts = list(iter_messages(kafka_broker.bootstrap_servers, worker.alerts_topic, idle_timeout=5))
        assert alerts, "injected anomalies raised no alert"
        by_position = {f"{worker.input_topic}:0:{offset}": e for offset, e in enumerate(events)}
        for alert in alerts:
            event = by_position[alert["event_id"]]  # ids are topic:partition:offset of the record
            assert alert["key"] == event.key
            assert datetime.fromisoformat(alert["event_timestamp"]).timestamp() == pytest.approx(event.timestamp,
                                                                                                  abs=0.001)
        reported = {i for a in alerts for i in a["event_ids"]}
        assert any(by_position[i].label for i in reported)

        bootstrap = kafka_broker.bootstrap_servers
        assert _topic_config(bootstrap, worker.alerts_topic)["retention.ms"] == "604800000"
        assert _topic_config(bootstrap, worker.dead_letter_topic)["max.message.bytes"] == "2000000"
        changelog = _topic_config(bootstrap, f"{worker.consumer_group}-windows-changelog")
        assert changelog["cleanup.policy"] == "compact" and changelog["min.cleanable.dirty.ratio"] == "0.2"
        worker.assert_alive()
    finally:
        worker.stop()
    assert "client properties not passed to the Faust consumer" not in worker.log_tail(400)
