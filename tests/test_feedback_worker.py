"""Integration: `stream-detector ack` on the real broker; the worker closes the open incident as
acknowledged, counts the verdict and dead-letters invalid feedback."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from confluent_kafka import Consumer, Producer

from stream_detector.kafka.local_broker import ensure_topics
from stream_detector.producer import iter_messages, produce_events
from stream_detector.synthetic import LabelledEvent, generate

from worker_harness import WorkerProcess

pytestmark = pytest.mark.integration


def _with_a_lasting_fault(events: list[LabelledEvent], key: str, last: int) -> list[LabelledEvent]:
    """The key's last ``last`` events far off (a fault that is still going on: its incident stays open)."""
    positions = [i for i, e in enumerate(events) if e.key == key][-last:]
    assert positions, f"no events of {key}"
    out = [LabelledEvent(e.key, e.event_id, e.timestamp, dict(e.fields), 0, None) for e in events]
    for i in positions:
        e = out[i]
        out[i] = LabelledEvent(e.key, e.event_id, e.timestamp, {**e.fields, "Pressure": e.fields["Pressure"] + 50.0},
                               1, "fault")
    return out


def test_ack_expected_change_closes_the_open_incident_as_acknowledged(kafka_broker, sensor_model_dir, tmp_path):
    bootstrap = kafka_broker.bootstrap_servers
    worker = WorkerProcess(bootstrap, sensor_model_dir, tmp_path / "worker.log")
    feedback_topic = f"{worker.alerts_topic}.feedback"
    ensure_topics(bootstrap, {worker.input_topic: 1, worker.alerts_topic: 1})
    worker.start()
    try:
        events = _with_a_lasting_fault(generate("sensors", 4, 200, anomaly_rate=0.0, seed=71), "device-0001", 40)
        produce_events(bootstrap, worker.input_topic, events, rate=0)
        worker.wait_for_metric("stream_detector_events_consumed_total", len(events))
        opened = None
        for alert in iter_messages(bootstrap, worker.alerts_topic, idle_timeout=10.0):
            if alert["key"] == "device-0001" and alert["state"] == "open":
                opened = alert
                break
        assert opened is not None, worker.log_tail()
        assert worker.metrics()["stream_detector_incidents_open"] >= 1

        # Invalid feedback first: dead-lettered with its reason, the worker goes on.
        producer = Producer({"bootstrap.servers": bootstrap})
        producer.produce(feedback_topic, key=b"junk", value=b'{"verdict": "maybe"}')
        producer.flush(10)
        worker.wait_for_metric("stream_detector_feedback_invalid_total", 1, timeout=60)

        env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_DETECTOR_")}
        env.update({"STREAM_DETECTOR_BOOTSTRAP_SERVERS": bootstrap, "STREAM_DETECTOR_ALERTS_TOPIC": worker.alerts_topic})
        # No --key: the command finds the incident's key on the alerts topic.
        result = subprocess.run([sys.executable, "-m", "stream_detector", "ack", opened["incident_id"],
                                 "--verdict", "expected_change", "--by", "test", "--search-timeout", "3"],
                                env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "device-0001" in result.stdout

        worker.wait_for_metric('stream_detector_incidents_closed_total{reason="acknowledged"}', 1, timeout=60)
        closes = [a for a in iter_messages(bootstrap, worker.alerts_topic, idle_timeout=5.0)
                  if a["incident_id"] == opened["incident_id"] and a["state"] == "close"]
        assert [c["incident"]["close_reason"] for c in closes] == ["acknowledged"]
        metrics = worker.metrics()
        assert metrics['stream_detector_feedback_total{verdict="expected_change"}'] == 1
        assert metrics["stream_detector_incidents_open"] == 0
        assert 'stream_detector_feature_drift{feature="Pressure"}' in metrics
        assert "stream_detector_keys_on_threshold_bounds" in metrics

        consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"check-{time.time_ns()}",
                             "auto.offset.reset": "earliest"})
        consumer.subscribe([worker.dead_letter_topic])
        letter, deadline = None, time.monotonic() + 30
        while letter is None and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and not msg.error():
                letter = msg
        consumer.close()
        assert letter is not None and letter.value() == b'{"verdict": "maybe"}'
        assert dict(letter.headers())["x-dlq-reason"] == b"invalid_feedback"
        worker.assert_alive()
    finally:
        worker.stop()
