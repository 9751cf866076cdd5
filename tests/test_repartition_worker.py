"""key_partition_check=repartition against the real broker: events whose record key is null or
another key than their window key, mixed with well keyed ones on a two-partition input, are each
scored exactly once, every key's scores equal an offline replay of its events in one partition
(the order they were windowed in: a key's well keyed events in their input order, its forwarded
ones in the repartition topic's), and the group's committed offsets reach the end of the input
and of the repartition topic."""

from __future__ import annotations

import time
import uuid
from collections import defaultdict

import orjson
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from stream_detector.detector import Detector, RawRecord
from stream_detector.kafka.local_broker import ensure_topics
from stream_detector.registry import load_served
from stream_detector.repartition import SOURCE_HEADER
from stream_detector.scoring import ModelRunner
from stream_detector.synthetic import generate

from stream_detector.producer import iter_messages

from test_chaos_fleet import _wait_ready
from test_delivery import WINDOW, expected_scored
from worker_harness import WorkerProcess

pytestmark = pytest.mark.integration


def _read_all(bootstrap: str, topic: str, idle_s: float = 3.0) -> list:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4().hex[:8]}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topic])
    out = []
    last = time.monotonic()
    try:
        while time.monotonic() - last < idle_s:
            msg = consumer.poll(0.2)
            if msg is None or msg.error():
                continue
            out.append(msg)
            last = time.monotonic()
    finally:
        consumer.close()
    return out


def _committed_at_end(bootstrap: str, group: str, topic: str, partitions: int, timeout: float) -> None:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        deadline = time.monotonic() + timeout
        while True:
            committed = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
            ends = [consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(partitions)]
            if all(tp.offset == end or (end == 0 and tp.offset < 0) for tp, end in zip(committed, ends)):
                return  # (a partition with no record has nothing to commit)
            assert time.monotonic() < deadline, f"{topic}: committed {[tp.offset for tp in committed]}, ends {ends}"
            time.sleep(0.5)
    finally:
        consumer.close()


def _scores(bootstrap: str, topic: str, n: int, timeout: float) -> dict[str, list[float]]:
    """Event id -> its scores, read until ``n`` distinct events are scored (or the time is up)."""
    scored: dict[str, list[float]] = defaultdict(list)
    deadline = time.monotonic() + timeout
    for message in iter_messages(bootstrap, topic, idle_timeout=timeout):
        scored[message["event_id"]].append(message["score"])
        if len(scored) >= n or time.monotonic() > deadline:
            break
    return scored


@pytest.mark.parametrize("workers", [1, 2])
def test_null_and_wrongly_keyed_events_are_repartitioned_and_scored_once_as_one_partition_replays(
        kafka_broker, sensor_model_dir, tmp_path, workers):
    """With two workers each owns one input partition and the same repartition partition: a
    forwarded event crosses to the other worker when its key's partition is the other's."""
    bootstrap = kafka_broker.bootstrap_servers
    worker = WorkerProcess(bootstrap, sensor_model_dir, tmp_path / "worker.log")
    scores_topic = f"scores-{uuid.uuid4().hex[:10]}"
    worker.extra_env = {"STREAM_DETECTOR_SCORES_TOPIC": scores_topic, "STREAM_DETECTOR_LAG_INTERVAL_S": "1",
                        "STREAM_DETECTOR_KEY_PARTITION_CHECK": "repartition"}
    fleet = [worker]
    for n in range(1, workers):
        other = WorkerProcess(bootstrap, sensor_model_dir, tmp_path / f"worker-{n}.log")
        for attr in ("input_topic", "alerts_topic", "dead_letter_topic", "consumer_group"):
            setattr(other, attr, getattr(worker, attr))
        other.extra_env = dict(worker.extra_env)
        fleet.append(other)
    ensure_topics(bootstrap, {worker.input_topic: 2, worker.alerts_topic: 1, worker.dead_letter_topic: 1,
                              scores_topic: 1})
    repartition_topic = f"{worker.consumer_group}-{worker.input_topic}-repartition"
    events = generate("sensors", 6, 60, anomaly_rate=0.0, seed=131)
    keys = sorted({e.key for e in events})
    well, null, wrong, mixed = keys[:2], keys[2:4], keys[4:5], keys[5:]
    # The mixed key: its well keyed first half, scored before its null-keyed second half is sent.
    later = [e for e in events if e.key in mixed][30:]
    first = [e for e in events if e not in later]
    for member in fleet:
        member.start()
    for member in fleet:  # every member holds its partition before any event is sent
        _wait_ready(member, timeout=60)
    try:
        producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
        for i, e in enumerate(first):
            value = orjson.dumps(e.to_message())
            if e.key in null:  # no record key: spread over the partitions
                producer.produce(worker.input_topic, value=value, partition=i % 2)
            elif e.key in wrong:  # keyed by another entity than the window's (key_field-style)
                producer.produce(worker.input_topic, key=b"terminal-9", value=value)
            else:
                producer.produce(worker.input_topic, key=e.key.encode(), value=value)
        assert producer.flush(30) == 0
        # As many events scored as there are past each key's first W-1 (which they are is checked below:
        # null-keyed events spread over both partitions reach the repartition topic in either's order).
        scored = _scores(bootstrap, scores_topic, len(expected_scored(first)), timeout=60)
        assert len(scored) == len(expected_scored(first)), worker.log_tail()
        for i, e in enumerate(later):
            producer.produce(worker.input_topic, value=orjson.dumps(e.to_message()), partition=i % 2)
        assert producer.flush(30) == 0
        want = len(expected_scored(events))
        scored = _scores(bootstrap, scores_topic, want, timeout=60)
        assert len(scored) == want, worker.log_tail()
        _committed_at_end(bootstrap, worker.consumer_group, worker.input_topic, 2, timeout=30)
        _committed_at_end(bootstrap, worker.consumer_group, repartition_topic, 2, timeout=30)
        scored = _scores(bootstrap, scores_topic, want + 1, timeout=3)
        assert len(scored) == want and all(len(s) == 1 for s in scored.values())  # each exactly once
        forwarded = _read_all(bootstrap, repartition_topic)
        n_forwarded = sum(1 for e in events if e.key not in well) - 30
        assert len(forwarded) == n_forwarded  # well keyed events were never forwarded
        metrics = [member.metrics() for member in fleet]
        assert sum(m["stream_detector_events_repartitioned_total"] for m in metrics) == n_forwarded
        assert all(m.get("stream_detector_events_replayed_total", 0) == 0 for m in metrics)
        if workers == 2:  # each windowed events: the partitions were shared
            assert all(m["stream_detector_windows_scored_total"] > 0 for m in metrics)
    finally:
        for member in fleet:
            member.stop()

    # Each key's events in the order they were windowed: its direct ones in input order, then its
    # forwarded ones in their repartition partition's order (a key's forwards share one partition).
    by_id = {e.event_id: e for e in events}
    order: dict[str, list[str]] = defaultdict(list)
    for e in first:
        if e.key in well or e.key in mixed:
            order[e.key].append(e.event_id)
    partitions: dict[str, set[int]] = defaultdict(set)
    for msg in forwarded:
        event = orjson.loads(msg.value())
        partitions[event["key"]].add(msg.partition())
        assert msg.key() == event["key"].encode()
        assert dict(msg.headers())[SOURCE_HEADER].startswith(f"{worker.input_topic}:".encode())
        order[event["key"]].append(event["event_id"])
    assert all(len(p) == 1 for p in partitions.values())  # a key's forwards on one partition, in order
    assert sorted(order) == keys and sum(map(len, order.values())) == len(events)
    artifact = load_served(sensor_model_dir)
    runner = ModelRunner(artifact, device="cpu")
    for key, ids in order.items():
        replay = Detector(artifact, runner.score)
        records = [RawRecord(orjson.dumps(by_id[i].to_message()), key.encode(), by_id[i].timestamp, 0, n)
                   for n, i in enumerate(ids)]
        decisions, _ = replay.process(records)
        assert [d.event.event_id for d in decisions] == ids[WINDOW - 1:]  # the same events scored
        assert {i for i in scored if by_id[i].key == key} == set(ids[WINDOW - 1:])
        got = [scored[d.event.event_id][0] for d in decisions]
        assert got == pytest.approx([d.score for d in decisions], rel=1e-4, abs=1e-6), key


def test_kill_9_mid_stream_repartitioned_keys_never_take_an_event_twice(kafka_broker, sensor_model_dir, tmp_path):
    """kill -9 twice while null-keyed events are forwarded: a forward acknowledged before its input
    offset was committed is made again after the restart (a duplicate in the repartition topic);
    every event is still scored, and every score of it (a crash re-scores the events after the last
    snapshot, from the same restored window) equals an offline one-partition replay of its key's
    events without duplicates: no window ever took an event twice."""
    import signal
    import threading

    bootstrap = kafka_broker.bootstrap_servers
    worker = WorkerProcess(bootstrap, sensor_model_dir, tmp_path / "worker.log")
    scores_topic = f"scores-{uuid.uuid4().hex[:10]}"
    worker.extra_env = {"STREAM_DETECTOR_SCORES_TOPIC": scores_topic, "STREAM_DETECTOR_LAG_INTERVAL_S": "1",
                        "STREAM_DETECTOR_KEY_PARTITION_CHECK": "repartition"}
    ensure_topics(bootstrap, {worker.input_topic: 2, worker.alerts_topic: 1, worker.dead_letter_topic: 1,
                              scores_topic: 1})
    repartition_topic = f"{worker.consumer_group}-{worker.input_topic}-repartition"
    events = generate("sensors", 6, 200, anomaly_rate=0.0, seed=137)
    keys = sorted({e.key for e in events})
    null = set(keys[:4])

    def produce() -> None:
        producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
        for i, e in enumerate(events):
            value = orjson.dumps(e.to_message())
            if e.key in null:
                producer.produce(worker.input_topic, value=value, partition=i % 2)
            else:
                producer.produce(worker.input_topic, key=e.key.encode(), value=value)
            if i % 50 == 49:
                producer.flush(10)
                time.sleep(0.25)  # about 200 events/s: kills land mid-stream
        assert producer.flush(30) == 0

    worker.start()
    try:
        thread = threading.Thread(target=produce)
        thread.start()
        for delay in (3.0, 4.0):
            time.sleep(delay)
            worker.process.send_signal(signal.SIGKILL)
            worker.process.wait(10)
            worker.start()
        thread.join(60)
        assert not thread.is_alive()
        want = expected_scored(events)  # a count: null-keyed events enter their window in forward order
        scored = _scores(bootstrap, scores_topic, len(want), timeout=90)
        assert len(scored) >= len(want), worker.log_tail()
        _committed_at_end(bootstrap, worker.consumer_group, worker.input_topic, 2, timeout=60)
        _committed_at_end(bootstrap, worker.consumer_group, repartition_topic, 2, timeout=60)
        scored = _scores(bootstrap, scores_topic, len(want) + 1, timeout=3)
        forwarded = _read_all(bootstrap, repartition_topic)
    finally:
        worker.stop()

    by_id = {e.event_id: e for e in events}
    order: dict[str, list[str]] = defaultdict(list)
    for e in events:
        if e.key not in null:
            order[e.key].append(e.event_id)
    sources: set[bytes] = set()
    duplicates = 0
    for msg in forwarded:
        source = dict(msg.headers())[SOURCE_HEADER]
        if source in sources:
            duplicates += 1
            continue
        sources.add(source)
        event = orjson.loads(msg.value())
        order[event["key"]].append(event["event_id"])
    assert len(sources) == sum(1 for e in events if e.key in null)  # every null-keyed event forwarded
    artifact = load_served(sensor_model_dir)
    runner = ModelRunner(artifact, device="cpu")
    for key, ids in order.items():
        records = [RawRecord(orjson.dumps(by_id[i].to_message()), key.encode(), by_id[i].timestamp, 0, n)
                   for n, i in enumerate(ids)]
        decisions, _ = Detector(artifact, runner.score).process(records)
        assert {i for i in scored if by_id[i].key == key} == set(ids[WINDOW - 1:]), key
        for d in decisions:
            assert scored[d.event.event_id] == pytest.approx([d.score] * len(scored[d.event.event_id]), rel=1e-4,
                                                             abs=1e-6), (key, d.event.event_id)
    print(f"{duplicates} duplicate forwards; {sum(map(len, scored.values())) - len(scored)} events re-scored")
