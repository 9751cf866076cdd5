"""A broker outage longer than the output producer's delivery timeout, against a real broker.

The worker's alerts, scores and snapshots in flight when the broker goes away cannot be delivered
in time: the batch fails at ``send_alerts`` (or ``send_snapshots``) and the worker stops with exit
status 70 without committing past it (``stream_detector.runtime.failures``). A worker started
again once the broker is back is redelivered what was not committed: every valid event is scored,
every injected anomaly alerted, no ``alert_id`` names two different alerts, and the committed
offsets reach the end. The delivery timeout is set short (5 s, through the producer's passthrough
properties) so that a 15 s outage is well past it.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import defaultdict

import orjson
import pytest

from stream_detector.kafka.admin import committed_offsets
from stream_detector.kafka.local_broker import LocalBroker, ensure_topics
from stream_detector.producer import iter_messages, produce_events
from stream_detector.runtime.failures import EXIT_BATCH_FAILED
from stream_detector.synthetic import generate

from test_delivery import (alerted_event_ids, anomaly_segments, collect_scores, expected_scored,
                           wait_for_group_lag_zero, with_obvious_anomalies)
from worker_harness import WorkerProcess, read_records

pytestmark = pytest.mark.integration

DELIVERY_TIMEOUT_MS = 5000
OUTAGE_S = 15.0


def _alerted_ids(bootstrap: str, topic: str) -> set[str]:
    alerts = list(iter_messages(bootstrap, topic, idle_timeout=3.0))
    return set().union(*(alerted_event_ids(a) for a in alerts)) if alerts else set()


def _positions(bootstrap: str, topic: str) -> dict[str, tuple[int, int]]:
    """Event id -> (partition, offset) of every record in the topic now."""
    return {orjson.loads(msg.value())["event_id"]: (msg.partition(), msg.offset())
            for msg in read_records(bootstrap, topic)}


def test_a_broker_outage_past_the_delivery_timeout_stops_the_worker_uncommitted_and_a_restart_alerts_everything(
        sensor_model_dir, tmp_path):
    broker = LocalBroker(data_dir=tmp_path / "kafka")
    broker.start(timeout=120)
    bootstrap = broker.bootstrap_servers
    worker = WorkerProcess(bootstrap, sensor_model_dir, tmp_path / "worker.log")
    scores_topic = f"scores-{uuid.uuid4().hex[:8]}"
    # A delivery test: anomalies from each key's 51st event on, some inside the tail calibration's
    # 100-window warm-up (where they enter the key's statistics, a limit the README states), are
    # judged by per-key adaptive thresholds, as in test_delivery's kill -9 test.
    worker.extra_env = {"STREAM_DETECTOR_SCORES_TOPIC": scores_topic, "STREAM_DETECTOR_LAG_INTERVAL_S": "1",
                        "STREAM_DETECTOR_TAIL_CALIBRATION": "false",
                        "STREAM_DETECTOR_KAFKA_PRODUCER__MESSAGE_TIMEOUT_MS": str(DELIVERY_TIMEOUT_MS)}
    events = with_obvious_anomalies(generate("sensors", 8, 750, anomaly_rate=0.02, seed=121))
    assert anomaly_segments(events)
    restarted: WorkerProcess | None = None
    try:
        ensure_topics(bootstrap, {worker.input_topic: 2, worker.alerts_topic: 1, scores_topic: 1})
        worker.start()
        # Events keep coming at 400/s (over 15 s): the worker has output in flight when the broker
        # goes; the test's producer holds its own events through the outage (a long timeout).
        producer = threading.Thread(target=produce_events, args=(bootstrap, worker.input_topic, events, 400.0),
                                    kwargs={"extra_config": {"message.timeout.ms": 300_000}})
        producer.start()
        worker.wait_for_metric("stream_detector_windows_scored_total", 1000, timeout=120)
        broker.kill()  # as a crash: nothing in flight is acknowledged
        assert worker.process is not None
        status = worker.process.wait(OUTAGE_S)  # the delivery timeout passes while the broker is down
        assert status == EXIT_BATCH_FAILED, worker.log_tail()
        log = worker.log_path.read_text()
        assert "micro-batch failed at send_" in log, worker.log_tail()
        time.sleep(max(0.0, OUTAGE_S - DELIVERY_TIMEOUT_MS / 1000))
        broker.start(timeout=120)
        # Nothing unalerted was committed: every anomaly the alerts topic does not name yet has an
        # event at or after its partition's committed offset (the group redelivers it).
        alerted_before = _alerted_ids(bootstrap, worker.alerts_topic)
        committed = committed_offsets(bootstrap, worker.consumer_group, worker.input_topic, [0, 1])
        where = _positions(bootstrap, worker.input_topic)
        pending = [seg for seg in anomaly_segments(events) if not alerted_before & seg]
        assert pending, "the outage left every anomaly alerted: the test must put some after it"
        committed_past = [seg for seg in pending
                          if all(i in where and where[i][1] < committed[where[i][0]] for i in seg)]
        assert not committed_past, f"committed {committed} past {len(committed_past)} unalerted anomalies"
        producer.join(120)
        assert not producer.is_alive()

        restarted = WorkerProcess(bootstrap, sensor_model_dir, tmp_path / "worker-2.log")
        for attr in ("input_topic", "alerts_topic", "dead_letter_topic", "consumer_group", "extra_env"):
            setattr(restarted, attr, getattr(worker, attr))
        restarted.start()
        want = expected_scored(events)
        counts = collect_scores(bootstrap, scores_topic, want, timeout=240)
        missing = want - counts.keys()
        assert not missing, f"{len(missing)} events never scored; log:\n{restarted.log_tail()}"
        alerts = list(iter_messages(bootstrap, worker.alerts_topic, idle_timeout=5.0))
        alerted = set().union(*(alerted_event_ids(a) for a in alerts)) if alerts else set()
        missed = [seg for seg in anomaly_segments(events) if not alerted & seg]
        assert not missed, f"{len(missed)} injected anomalies never alerted; log:\n{restarted.log_tail()}"
        by_id: dict[str, set[tuple]] = defaultdict(set)
        for a in alerts:  # a redelivered alert repeats its id and its content
            by_id[a["alert_id"]].add((a["key"], a["event_id"], a["state"], a["incident_id"]))
        assert all(len(v) == 1 for v in by_id.values()), {k: v for k, v in by_id.items() if len(v) > 1}
        opens = defaultdict(set)
        for a in alerts:
            if a["state"] == "open":
                opens[a["incident_id"]].add(a["alert_id"])
        assert all(len(ids) == 1 for ids in opens.values())  # one open per incident, however often sent
        wait_for_group_lag_zero(restarted, partitions=2, timeout=60)
        restarted.assert_alive()
    finally:
        worker.stop()
        if restarted is not None:
            restarted.stop()
        broker.stop()
