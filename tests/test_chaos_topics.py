"""Input topic reshaped under a running worker, against the real broker: nothing is lost.

- The input topic grows from 4 to 8 partitions mid-run (keys move to new partitions): every valid
  event is scored once, every injected anomaly alerted, and the committed offsets of all 8
  partitions reach the end.
- The input topic is deleted and recreated mid-run (its committed offsets go with it, the new
  topic's offsets start again at 0): every event of the new topic is scored, none taken for a
  replay of the old topic's (the snapshot positions are dropped, see
  :mod:`stream_detector.runtime.state`).
"""

from __future__ import annotations

import time

import orjson
import pytest
from confluent_kafka.admin import AdminClient, NewPartitions

from stream_detector.kafka.local_broker import ensure_topics
from stream_detector.producer import iter_messages, produce_events
from stream_detector.synthetic import generate

from test_chaos import _worker, wait_for_floor
from test_delivery import (alerted_event_ids, anomaly_segments, collect_scores, expected_scored, shifted,
                           wait_for_group_lag_zero, with_obvious_anomalies)
from worker_harness import read_records

pytestmark = pytest.mark.integration

# The consumer sees new partitions at its next metadata refresh (5 minutes by default): a deployment
# that grows topics sets it lower the same way.
FAST_METADATA = {"STREAM_DETECTOR_KAFKA_CONSUMER__METADATA_MAX_AGE_MS": "2000"}


def _grow(bootstrap: str, topic: str, partitions: int, timeout: float = 30.0) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_partitions([NewPartitions(topic, partitions)])[topic].result(timeout)
    deadline = time.monotonic() + timeout
    while len(admin.list_topics(topic, timeout=10).topics[topic].partitions) < partitions:
        assert time.monotonic() < deadline
        time.sleep(0.2)


def _partitions_of(bootstrap: str, topic: str, event_ids: set[str]) -> dict[int, int]:
    """How many of ``event_ids`` each input partition holds (to explain a failure)."""
    out: dict[int, int] = {}
    for msg in read_records(bootstrap, topic, idle_s=3.0):
        if orjson.loads(msg.value()).get("event_id") in event_ids:
            out[msg.partition()] = out.get(msg.partition(), 0) + 1
    return out


def _counters(worker) -> dict[str, float]:
    return {k: v for k, v in worker.metrics().items()
            if k.startswith(("stream_detector_events", "stream_detector_windows_scored", "stream_detector_consumer_lag"))}


def _alerted(bootstrap: str, topic: str) -> tuple[list[dict], set[str]]:
    alerts = list(iter_messages(bootstrap, topic, idle_timeout=5.0))
    return alerts, set().union(*(alerted_event_ids(a) for a in alerts)) if alerts else set()


def test_input_partitions_grown_from_4_to_8_mid_run_lose_no_event_and_commit_every_partition(
        kafka_broker, sensor_model_dir, tmp_path):
    bootstrap = kafka_broker.bootstrap_servers
    worker = _worker(kafka_broker, sensor_model_dir, tmp_path, partitions=4, **FAST_METADATA)
    scores_topic = worker.extra_env["STREAM_DETECTOR_SCORES_TOPIC"]
    phase1 = generate("sensors", 12, 150, anomaly_rate=0.0, seed=101)
    phase2 = with_obvious_anomalies(shifted(generate("sensors", 12, 150, anomaly_rate=0.03, seed=102),
                                            10_000.0, "p2"))
    assert anomaly_segments(phase2)
    worker.start()
    try:
        produce_events(bootstrap, worker.input_topic, phase1, rate=0)
        want1 = expected_scored(phase1)
        counts = collect_scores(bootstrap, scores_topic, want1, timeout=120)
        assert want1 <= counts.keys(), worker.log_tail()
        _grow(bootstrap, worker.input_topic, 8)
        produce_events(bootstrap, worker.input_topic, phase2, rate=0)  # keys hash over 8 partitions now

        want = expected_scored(phase1 + phase2)
        counts = collect_scores(bootstrap, scores_topic, want, timeout=120)
        missing = want - counts.keys()
        assert not missing, (f"{len(missing)} valid events never scored, from partitions "
                             f"{_partitions_of(bootstrap, worker.input_topic, missing)}; {_counters(worker)}; "
                             f"log:\n{worker.log_tail()}")
        alerts, alerted = _alerted(bootstrap, worker.alerts_topic)
        missed = [seg for seg in anomaly_segments(phase2) if not alerted & seg]
        assert not missed, f"{len(missed)} injected anomalies never alerted"
        wait_for_group_lag_zero(worker, partitions=8, timeout=90)
        worker.assert_alive()
        counts = collect_scores(bootstrap, scores_topic, want, timeout=10)
        assert all(n == 1 for n in counts.values()), {e: n for e, n in counts.items() if n > 1}
        metrics = worker.metrics()
        assert metrics.get("stream_detector_events_dead_lettered_total", 0.0) == 0
        assert metrics["stream_detector_events_warming_up_total"] == 12 * 31  # only each key's first window
    finally:
        worker.stop()


def _delete_topic(bootstrap: str, topic: str, timeout: float = 30.0) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.delete_topics([topic], operation_timeout=timeout)[topic].result(timeout)
    deadline = time.monotonic() + timeout
    while topic in admin.list_topics(timeout=10).topics:
        assert time.monotonic() < deadline, f"{topic} still listed {timeout} s after its deletion"
        time.sleep(0.2)


def test_input_topic_deleted_and_recreated_mid_run_has_every_new_event_scored_and_none_taken_for_a_replay(
        kafka_broker, sensor_model_dir, tmp_path):
    bootstrap = kafka_broker.bootstrap_servers
    worker = _worker(kafka_broker, sensor_model_dir, tmp_path, partitions=1, **FAST_METADATA)
    scores_topic = worker.extra_env["STREAM_DETECTOR_SCORES_TOPIC"]
    keys = 4
    phase1 = generate("sensors", keys, 150, anomaly_rate=0.0, seed=111)
    # The new topic's stream goes on where the old one stopped (later timestamps, new event ids), but
    # its offsets start again at 0, below those the restored snapshots hold.
    phase2 = with_obvious_anomalies(shifted(generate("sensors", keys, 100, anomaly_rate=0.04, seed=112),
                                            10_000.0, "new"))
    assert anomaly_segments(phase2)
    worker.start()
    try:
        produce_events(bootstrap, worker.input_topic, phase1, rate=0)
        want1 = expected_scored(phase1)
        assert want1 <= collect_scores(bootstrap, scores_topic, want1, timeout=120).keys(), worker.log_tail()
        wait_for_group_lag_zero(worker, partitions=1, timeout=60)
        wait_for_floor(bootstrap, f"{worker.consumer_group}-windows-changelog", len(phase1), timeout=60)

        _delete_topic(bootstrap, worker.input_topic)
        ensure_topics(bootstrap, {worker.input_topic: 1})
        produce_events(bootstrap, worker.input_topic, phase2, rate=0)

        want = expected_scored(phase1 + phase2)  # the restored windows are full: every new event is scored
        counts = collect_scores(bootstrap, scores_topic, want, timeout=120)
        missing = want - counts.keys()
        assert not missing, (f"{len(missing)} of the new topic's events never scored; {_counters(worker)}; "
                             f"log:\n{worker.log_tail()}")
        _, alerted = _alerted(bootstrap, worker.alerts_topic)
        missed = [seg for seg in anomaly_segments(phase2) if not alerted & seg]
        assert not missed, f"{len(missed)} injected anomalies never alerted"
        wait_for_group_lag_zero(worker, partitions=1, timeout=60)
        worker.assert_alive()
        metrics = worker.metrics()
        assert metrics["stream_detector_events_replayed_total"] == 0
        assert metrics["stream_detector_state_positions_dropped_total"] == keys
        assert metrics["stream_detector_events_warming_up_total"] == keys * 31  # windows kept
        assert all(n == 1 for n in collect_scores(bootstrap, scores_topic, want, timeout=10).values())
    finally:
        worker.stop()
