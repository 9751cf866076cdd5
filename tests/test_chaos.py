"""Poison records and a failing model against the real broker and worker: nothing is lost.

- Poison records among valid events (a deeply nested message, a 1,000,500-byte record the topic
  accepts, a 999,950-byte malformed one) are each dead-lettered exactly once (cut to fit, with
  the original's length and SHA-256), every valid event is scored, the injected anomalies are
  alerted, and the group's committed offsets reach the end.
- A model that raises makes the worker exit with status 70 without committing past the failed
  batch; a restarted worker (with a good model) then judges those events: no alert is lost.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
import sys
import time
import uuid
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from stream_detector.kafka.local_broker import ensure_topics
from stream_detector.producer import iter_messages, produce_events
from stream_detector.runtime.failures import EXIT_BATCH_FAILED
from stream_detector.runtime.state import FLOOR, floor_key
from stream_detector.synthetic import LabelledEvent, generate

from test_delivery import (alerted_event_ids, anomaly_segments, collect_scores, expected_scored, shifted,
                           wait_for_group_lag_zero, with_obvious_anomalies)
from worker_harness import WorkerProcess

pytestmark = pytest.mark.integration

BIG = 2_000_000  # the input topic's and the test producer's record size limit


def _worker(kafka_broker, sensor_model_dir, tmp_path, partitions: int, **env: str) -> WorkerProcess:
    proc = WorkerProcess(kafka_broker.bootstrap_servers, sensor_model_dir, tmp_path / f"worker-{uuid.uuid4().hex[:6]}.log")
    proc.extra_env = {"STREAM_DETECTOR_SCORES_TOPIC": f"scores-{uuid.uuid4().hex[:10]}",
                      "STREAM_DETECTOR_LAG_INTERVAL_S": "1", **env}
    ensure_topics(kafka_broker.bootstrap_servers, {proc.input_topic: partitions},
                  config={"max.message.bytes": str(BIG)})
    ensure_topics(kafka_broker.bootstrap_servers, {proc.alerts_topic: 1, proc.dead_letter_topic: 1,
                                                   proc.extra_env["STREAM_DETECTOR_SCORES_TOPIC"]: 1})
    return proc


def _dead_letters(bootstrap: str, topic: str, want: int, timeout: float) -> list[tuple[bytes, dict[str, bytes]]]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"dlq-reader-{time.time_ns()}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topic])
    out: list[tuple[bytes, dict[str, bytes]]] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None or msg.error():
                if len(out) >= want and msg is None:
                    break
                continue
            out.append((msg.value() or b"", dict(msg.headers() or [])))
    finally:
        consumer.close()
    return out


def test_poison_records_are_dead_lettered_once_and_every_valid_event_is_scored_and_committed(
        kafka_broker, sensor_model_dir, tmp_path):
    bootstrap = kafka_broker.bootstrap_servers
    worker = _worker(kafka_broker, sensor_model_dir, tmp_path, partitions=2)
    scores_topic = worker.extra_env["STREAM_DETECTOR_SCORES_TOPIC"]
    events = with_obvious_anomalies(generate("sensors", 4, 500, anomaly_rate=0.02, seed=61))
    assert len(events) == 2000 and anomaly_segments(events)
    poison = {
        "nested": b'{"x":' + b"[" * 1000,  # 1,005 bytes: msgspec recursed on it and raised
        "huge": b"y" * 1_000_500,  # over max_message_bytes (oversized); over the producer's limit with headers
        "near": b'{"key": "' + b"z" * 999_950 + b'"',  # malformed, just under max_message_bytes
    }
    poison["near"] = poison["near"][:999_950]
    producer = Producer({"bootstrap.servers": bootstrap, "message.max.bytes": BIG, "linger.ms": 5})
    worker.start()
    try:
        chunks = [events[i:i + 500] for i in range(0, len(events), 500)]
        for chunk, (name, value) in zip(chunks, list(poison.items()) + [(None, None)]):
            produce_events(bootstrap, worker.input_topic, chunk, rate=0)
            if name is not None:
                producer.produce(worker.input_topic, key=f"poison-{name}".encode(), value=value)
                assert producer.flush(30) == 0

        want = expected_scored(events)
        scored: dict[str, list[tuple[float, float]]] = {}
        counts = collect_scores(bootstrap, scores_topic, want, timeout=180, scored=scored)
        missing = want - counts.keys()
        assert not missing, f"{len(missing)} valid events never scored; log:\n{worker.log_tail()}"

        letters = _dead_letters(bootstrap, worker.dead_letter_topic, want=len(poison), timeout=60)
        assert len(letters) == len(poison), [h.get("x-dlq-reason") for _, h in letters]
        by_key_hash = {}
        for value, headers in letters:
            original_sha = headers.get("x-dlq-original-sha256", hashlib.sha256(value).hexdigest().encode())
            by_key_hash[original_sha.decode()] = (value, headers)
        for name, original in poison.items():
            value, headers = by_key_hash[hashlib.sha256(original).hexdigest()]  # each exactly once
            assert original.startswith(value)
            assert headers["x-dlq-source"].startswith(worker.input_topic.encode() + b":")
            if len(original) > 900_000:
                assert headers["x-dlq-truncated"] == b"true"
                assert headers["x-dlq-original-bytes"] == str(len(original)).encode()
        assert by_key_hash[hashlib.sha256(poison["nested"]).hexdigest()][1]["x-dlq-reason"] == b"malformed_json"
        assert by_key_hash[hashlib.sha256(poison["huge"]).hexdigest()][1]["x-dlq-reason"] == b"oversized"

        alerts = list(iter_messages(bootstrap, worker.alerts_topic, idle_timeout=5.0))
        alerted = set().union(*(alerted_event_ids(a) for a in alerts)) if alerts else set()
        missed = [seg for seg in anomaly_segments(events) if not alerted & seg]
        assert not missed, f"{len(missed)} injected anomalies never alerted"

        wait_for_group_lag_zero(worker, partitions=2, timeout=60)
        worker.assert_alive()
        metrics = worker.metrics()
        assert metrics["stream_detector_dead_letters_truncated_total"] == 2
        assert metrics["stream_detector_events_dead_lettered_total"] == len(poison)
    finally:
        worker.stop()


def _committed(bootstrap: str, group: str, topic: str, timeout: float = 60.0) -> int:
    """The group's committed offset on partition 0 (retried while the coordinator answers with an
    error, as while the group waits for its dead member's session to time out)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    deadline = time.monotonic() + timeout
    try:
        while True:
            (tp,) = consumer.committed([TopicPartition(topic, 0)], timeout=10)
            if tp.error is None or time.monotonic() > deadline:
                assert tp.error is None, tp.error
                return tp.offset
            time.sleep(0.5)
    finally:
        consumer.close()


def test_a_model_that_raises_stops_the_worker_uncommitted_and_a_restarted_worker_alerts_every_anomaly(
        kafka_broker, sensor_model_dir, tmp_path):
    bootstrap = kafka_broker.bootstrap_servers
    flag = tmp_path / "model-fails"
    faulty = _worker(kafka_broker, sensor_model_dir, tmp_path, partitions=1, FAULTY_MODEL_FLAG=str(flag))
    faulty.command = [sys.executable, str(Path(__file__).with_name("faulty_model_worker.py"))]
    scores_topic = faulty.extra_env["STREAM_DETECTOR_SCORES_TOPIC"]
    phase1 = generate("sensors", 4, 100, anomaly_rate=0.0, seed=81)
    phase2 = with_obvious_anomalies(shifted(generate("sensors", 4, 150, anomaly_rate=0.04, seed=82), 10_000.0, "p2"))
    assert anomaly_segments(phase2)
    faulty.start()
    try:
        produce_events(bootstrap, faulty.input_topic, phase1, rate=0)
        deadline = time.monotonic() + 60  # phase 1 judged and committed
        while _committed(bootstrap, faulty.consumer_group, faulty.input_topic) < len(phase1):
            assert time.monotonic() < deadline, faulty.log_tail()
            faulty.assert_alive()
            time.sleep(0.5)
        flag.touch()  # from now on every model call raises
        produce_events(bootstrap, faulty.input_topic, phase2, rate=0)
        assert faulty.process is not None
        status = faulty.process.wait(60)
        assert status == EXIT_BATCH_FAILED, faulty.log_tail()
        assert "micro-batch failed at score" in faulty.log_path.read_text()
        # Not a single offset of phase 2 was committed: none of its events was judged.
        assert _committed(bootstrap, faulty.consumer_group, faulty.input_topic) == len(phase1)
    finally:
        faulty.stop()

    flag.unlink()
    good = _worker(kafka_broker, sensor_model_dir, tmp_path, partitions=1)
    for attr in ("input_topic", "alerts_topic", "dead_letter_topic", "consumer_group"):
        setattr(good, attr, getattr(faulty, attr))
    good.extra_env = {**faulty.extra_env}
    good.extra_env.pop("FAULTY_MODEL_FLAG")
    good.start()
    try:
        want = expected_scored(phase1 + phase2)
        counts = collect_scores(bootstrap, scores_topic, want, timeout=120)
        missing = want - counts.keys()
        assert not missing, f"{len(missing)} events never scored; log:\n{good.log_tail()}"
        alerts = list(iter_messages(bootstrap, good.alerts_topic, idle_timeout=5.0))
        alerted = set().union(*(alerted_event_ids(a) for a in alerts)) if alerts else set()
        missed = [seg for seg in anomaly_segments(phase2) if not alerted & seg]
        assert not missed, f"{len(missed)} injected anomalies never alerted; log:\n{good.log_tail()}"
        wait_for_group_lag_zero(good, partitions=1, timeout=60)
        assert good.metrics()["stream_detector_events_warming_up_total"] == 0  # windows restored
    finally:
        good.stop()


def _anomalous_tail(events: list, n: int) -> list:
    """The stream with its last ``n`` events made obviously anomalous (an incident opens at the end)."""
    tail = [LabelledEvent(e.key, e.event_id, e.timestamp, e.fields, 1, "test") for e in events[-n:]]
    return with_obvious_anomalies(events[:-n] + tail)


def test_an_open_incident_of_a_key_that_goes_silent_is_closed_idle_by_the_worker_that_takes_over(
        kafka_broker, sensor_model_dir, tmp_path):
    bootstrap = kafka_broker.bootstrap_servers
    idle_s = 20
    first = _worker(kafka_broker, sensor_model_dir, tmp_path, partitions=1,
                    STREAM_DETECTOR_INCIDENT_IDLE_CLOSE_S=str(idle_s))
    events = _anomalous_tail(generate("sensors", 1, 120, anomaly_rate=0.0, seed=91), 6)
    gap = events[1].timestamp - events[0].timestamp
    assert 4 * gap < idle_s  # the incident's idle limit is the setting's
    first.start()
    try:
        produce_events(bootstrap, first.input_topic, events, rate=0)
        deadline = time.monotonic() + 60
        opened: list[dict] = []
        while not opened:
            assert time.monotonic() < deadline, f"no incident opened; log:\n{first.log_tail()}"
            opened = [a for a in iter_messages(bootstrap, first.alerts_topic, idle_timeout=2.0) if a["state"] == "open"]
        wait_for_group_lag_zero(first, partitions=1, timeout=60)  # every event acked: its snapshot is written
        assert first.metrics().get('stream_detector_incidents_closed_total{reason="idle"}', 0.0) == 0
        assert first.process is not None
        first.process.kill()  # kill -9 with the incident open; the key never sends again
        first.process.wait(10)
    finally:
        first.stop()

    second = _worker(kafka_broker, sensor_model_dir, tmp_path, partitions=1)
    for attr in ("input_topic", "alerts_topic", "dead_letter_topic", "consumer_group"):
        setattr(second, attr, getattr(first, attr))
    second.extra_env = {**first.extra_env}
    second.start()
    try:
        (incident,) = {a["incident_id"] for a in opened}
        deadline = time.monotonic() + 120
        closes: list[dict] = []
        while not closes:
            assert time.monotonic() < deadline, f"the incident was never closed; log:\n{second.log_tail()}"
            second.assert_alive()
            closes = [a for a in iter_messages(bootstrap, second.alerts_topic, idle_timeout=2.0)
                      if a["state"] == "close"]
        assert [(a["incident_id"], a["incident"]["close_reason"]) for a in closes] == [(incident, "idle")]
        assert second.metrics()["stream_detector_events_consumed_total"] == 0  # closed without a new event
    finally:
        second.stop()


def _reset_to_earliest(bootstrap: str, group: str, topic: str, timeout: float = 60.0, offset: int = 0) -> None:
    """What `kafka-consumer-groups --reset-offsets --to-offset` does (the group must be empty)."""
    from confluent_kafka import ConsumerGroupTopicPartitions
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    deadline = time.monotonic() + timeout
    while True:
        future = admin.alter_consumer_group_offsets(
            [ConsumerGroupTopicPartitions(group, [TopicPartition(topic, 0, offset)])])[group]
        try:
            future.result(10)
            return
        except Exception:  # the stopped member has not left yet
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def wait_for_floor(bootstrap: str, changelog_topic: str, at_least: int, timeout: float) -> None:
    """Until partition 0's floor record in the changelog reaches ``at_least`` (the committed offset)."""
    deadline = time.monotonic() + timeout
    floor = -1
    while time.monotonic() < deadline:
        consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"floor-{uuid.uuid4().hex[:8]}",
                             "auto.offset.reset": "earliest", "enable.auto.commit": False})
        try:
            consumer.assign([TopicPartition(changelog_topic, 0, 0)])
            idle_until = time.monotonic() + 3.0
            while time.monotonic() < idle_until:
                msg = consumer.poll(0.5)
                if msg is None or msg.error():
                    continue
                idle_until = time.monotonic() + 3.0
                if msg.key() == floor_key(0) and msg.value():
                    floor = FLOOR.unpack(msg.value())[0]
        finally:
            consumer.close()
        if floor >= at_least:
            return
        time.sleep(1.0)
    raise AssertionError(f"the changelog's floor of partition 0 is {floor}, not {at_least} or more, after {timeout} s")


def test_after_a_group_reset_to_earliest_every_event_is_scored_again_and_none_taken_for_a_replay(
        kafka_broker, sensor_model_dir, tmp_path):
    bootstrap = kafka_broker.bootstrap_servers
    first = _worker(kafka_broker, sensor_model_dir, tmp_path, partitions=1)
    scores_topic = first.extra_env["STREAM_DETECTOR_SCORES_TOPIC"]
    events = generate("sensors", 2, 100, anomaly_rate=0.0, seed=93)
    want = expected_scored(events)
    first.start()
    try:
        produce_events(bootstrap, first.input_topic, events, rate=0)
        counts = collect_scores(bootstrap, scores_topic, want, timeout=120)
        assert want <= counts.keys(), first.log_tail()
        wait_for_group_lag_zero(first, partitions=1, timeout=60)
        # The floor follows the commit (written while the input is quiet): wait until it is there.
        wait_for_floor(bootstrap, f"{first.consumer_group}-windows-changelog", len(events), timeout=60)
    finally:
        first.stop()
    # To offset 0: Faust seeks only to committed offsets above 0; the worker seeks the rest itself
    # (faust_fixes.seek_uncommitted), without which the restarted worker consumed nothing in 2 of 3 runs.
    _reset_to_earliest(bootstrap, first.consumer_group, first.input_topic, offset=0)

    second = _worker(kafka_broker, sensor_model_dir, tmp_path, partitions=1)
    for attr in ("input_topic", "alerts_topic", "dead_letter_topic", "consumer_group"):
        setattr(second, attr, getattr(first, attr))
    second.extra_env = {**first.extra_env}
    second.start()
    try:
        deadline = time.monotonic() + 120
        while True:
            counts = defaultdict(int)
            for message in iter_messages(bootstrap, scores_topic, idle_timeout=3.0):
                counts[message["event_id"]] += 1
            again = {e for e in want if counts.get(e, 0) >= 2}
            if again == want:
                break
            assert time.monotonic() < deadline, (
                f"{len(want - again)} of {len(want)} events not scored again; "
                f"{ {k: v for k, v in second.metrics().items() if 'events' in k or 'consumer' in k} }; "
                f"log:\n{second.log_tail()}")
            time.sleep(1.0)
        metrics = second.metrics()
        assert metrics["stream_detector_events_replayed_total"] == 0
        assert metrics["stream_detector_state_positions_dropped_total"] == 2  # both keys' windows kept
        assert metrics["stream_detector_events_warming_up_total"] == 0
    finally:
        second.stop()


def test_events_with_null_record_keys_are_dead_lettered_and_never_split_a_keys_window(
        kafka_broker, sensor_model_dir, tmp_path):
    bootstrap = kafka_broker.bootstrap_servers
    worker = _worker(kafka_broker, sensor_model_dir, tmp_path, partitions=2,
                     STREAM_DETECTOR_KEY_PARTITION_CHECK="dead_letter")
    scores_topic = worker.extra_env["STREAM_DETECTOR_SCORES_TOPIC"]
    keyed = generate("sensors", 3, 80, anomaly_rate=0.0, seed=95)
    unkeyed = shifted(generate("sensors", 3, 40, anomaly_rate=0.0, seed=96), 100_000.0, "nokey")
    worker.start()
    try:
        produce_events(bootstrap, worker.input_topic, keyed, rate=0)
        producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
        for i, e in enumerate(unkeyed):  # no record key: spread over the partitions
            producer.produce(worker.input_topic, value=orjson.dumps(e.to_message()), partition=i % 2)
        assert producer.flush(30) == 0

        want = expected_scored(keyed)
        counts = collect_scores(bootstrap, scores_topic, want, timeout=120)
        assert want <= counts.keys(), worker.log_tail()
        letters = _dead_letters(bootstrap, worker.dead_letter_topic, want=len(unkeyed), timeout=60)
        assert len(letters) == len(unkeyed)
        assert {h["x-dlq-reason"] for _, h in letters} == {b"key_partition_mismatch"}
        wait_for_group_lag_zero(worker, partitions=2, timeout=60)
        counts = collect_scores(bootstrap, scores_topic, want, timeout=10)
        assert not {e.event_id for e in unkeyed} & counts.keys()  # none windowed on a second partition
        assert all(n == 1 for n in counts.values())
        assert worker.metrics()['stream_detector_events_invalid_total{reason="key_partition_mismatch"}'] == len(unkeyed)
    finally:
        worker.stop()


def test_wall_clock_steps_of_a_day_ahead_and_an_hour_back_close_no_incident_and_lose_no_event(
        kafka_broker, sensor_model_dir, tmp_path):
    bootstrap = kafka_broker.bootstrap_servers
    step = tmp_path / "clock-step"
    worker = _worker(kafka_broker, sensor_model_dir, tmp_path, partitions=1, STEPPED_CLOCK_FILE=str(step))
    worker.command = [sys.executable, str(Path(__file__).with_name("stepped_clock_worker.py"))]
    scores_topic = worker.extra_env["STREAM_DETECTOR_SCORES_TOPIC"]
    events = generate("sensors", 1, 360, anomaly_rate=0.0, seed=97)
    events = with_obvious_anomalies([LabelledEvent(e.key, e.event_id, e.timestamp, e.fields, int(150 <= i < 190),
                                                   "test" if 150 <= i < 190 else None) for i, e in enumerate(events)])
    phases = [events[:170], events[170:260], events[260:]]  # the incident opens in the first, closes in the second

    def alerts() -> list[dict]:
        return list(iter_messages(bootstrap, worker.alerts_topic, idle_timeout=3.0))

    worker.start()
    try:
        for phase, clock_step in zip(phases, (None, 25 * 3600.0, -3600.0)):
            if clock_step is not None:
                step.write_text(str(clock_step))
                time.sleep(1.0)  # the worker's clock has moved
            produce_events(bootstrap, worker.input_topic, phase, rate=0)
            want = expected_scored(events[:events.index(phase[-1]) + 1])
            counts = collect_scores(bootstrap, scores_topic, want, timeout=120)
            assert want <= counts.keys(), f"{len(want - counts.keys())} events not scored; log:\n{worker.log_tail()}"
            if clock_step is None:
                assert [a["state"] for a in alerts()][:1] == ["open"]
        wait_for_group_lag_zero(worker, partitions=1, timeout=60)
        states = [(a["state"], a["incident"]["close_reason"]) for a in alerts() if a["state"] != "update"]
        assert states == [("open", None), ("close", "recovered")], worker.log_tail()
        metrics = worker.metrics()
        assert metrics.get("stream_detector_events_dead_lettered_total", 0.0) == 0
        assert sum(v for k, v in metrics.items() if k.startswith("stream_detector_keys_evicted_total")) == 0
    finally:
        worker.stop()
