"""Faults in the window-state changelog, against the real broker and worker: a garbage record and
a snapshot naming an offset far past its partition's end for live keys, tombstones at the tail of a
partition, then the changelog topic deleted (while the worker is stopped, and, in the second test,
under a running worker). The worker neither stops nor takes events for replays:
a key whose snapshot cannot be read (or was deleted) starts a new window, one whose position is
impossible keeps its window and loses the position, and with the changelog gone every key starts
anew; every other event is scored.

The faults are written while the worker is stopped (as a broken or foreign writer would leave
them); the tombstones are at the partition's tail as compaction leaves deletes there until
``delete.retention.ms`` has passed (the broker is not made to compact within the test).
"""

from __future__ import annotations

import time

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from stream_detector.producer import produce_events
from stream_detector.synthetic import generate
from stream_detector.windows import snapshot_position, with_offset

from test_chaos import _worker
from test_chaos_topics import FAST_METADATA, _delete_topic
from test_delivery import collect_scores, expected_scored, shifted, wait_for_group_lag_zero
from worker_harness import read_records

pytestmark = pytest.mark.integration

PARTITIONS = 2
KEYS = 6
WINDOW = 32


def _snapshots(bootstrap: str, topic: str) -> dict[bytes, tuple[int, bytes | None]]:
    """Each key's last changelog record: (partition, value)."""
    return {msg.key(): (msg.partition(), msg.value()) for msg in read_records(bootstrap, topic, first_s=4.0)}


def test_changelog_garbage_impossible_positions_tail_tombstones_and_its_deletion_never_stop_the_worker_or_lose_events(
        kafka_broker, sensor_model_dir, tmp_path):
    bootstrap = kafka_broker.bootstrap_servers
    worker = _worker(kafka_broker, sensor_model_dir, tmp_path, partitions=PARTITIONS)
    scores_topic = worker.extra_env["STREAM_DETECTOR_SCORES_TOPIC"]
    changelog = f"{worker.consumer_group}-windows-changelog"
    phase1 = generate("sensors", KEYS, 100, anomaly_rate=0.0, seed=151)
    phase2 = shifted(generate("sensors", KEYS, 80, anomaly_rate=0.0, seed=152), 10_000.0, "p2")
    phase3 = shifted(generate("sensors", KEYS, 80, anomaly_rate=0.0, seed=153), 20_000.0, "p3")
    worker.start()
    try:
        produce_events(bootstrap, worker.input_topic, phase1, rate=0)
        want = expected_scored(phase1)
        assert want <= collect_scores(bootstrap, scores_topic, want, timeout=120).keys(), worker.log_tail()
        wait_for_group_lag_zero(worker, partitions=PARTITIONS, timeout=60)  # acked: the snapshots are written
        worker.stop()

        snapshots = {k: v for k, v in _snapshots(bootstrap, changelog).items() if not k.startswith(b"\xff")}
        assert len(snapshots) == KEYS
        garbled, far, deleted = sorted(snapshots)[:3]
        producer = Producer({"bootstrap.servers": bootstrap})
        partition, blob = snapshots[garbled]
        producer.produce(changelog, key=garbled, value=b"\x02garbage" + bytes(range(40)), partition=partition)
        partition, blob = snapshots[far]
        assert blob is not None and snapshot_position(blob)[1] < len(phase1)
        producer.produce(changelog, key=far, value=with_offset(blob, 10 ** 12), partition=partition)
        partition, _ = snapshots[deleted]
        producer.produce(changelog, key=deleted, value=None, partition=partition)  # the key's snapshot deleted
        for i in range(5):  # and the partition's tail: deletes of keys long gone
            producer.produce(changelog, key=f"gone-{i}".encode(), value=None, partition=partition)
        assert producer.flush(30) == 0

        worker.start()
        produce_events(bootstrap, worker.input_topic, phase2, rate=0)
        cold = {garbled.decode(), deleted.decode()}
        want = (expected_scored([e for e in phase1 + phase2 if e.key not in cold])
                | expected_scored([e for e in phase2 if e.key in cold]))
        counts = collect_scores(bootstrap, scores_topic, want, timeout=120)
        missing = want - counts.keys()
        assert not missing, (f"{len(missing)} events never scored, of keys {sorted({m.rsplit('-', 2)[0] for m in missing})}; "
                             f"log:\n{worker.log_tail()}")
        wait_for_group_lag_zero(worker, partitions=PARTITIONS, timeout=60)
        metrics = worker.metrics()
        assert metrics["stream_detector_events_replayed_total"] == 0
        assert metrics["stream_detector_state_positions_dropped_total"] == 1  # the impossible one
        assert metrics["stream_detector_events_warming_up_total"] == len(cold) * (WINDOW - 1)
        assert "its snapshot names offset 1000000000000" in worker.log_path.read_text()
        worker.stop()

        _delete_topic(bootstrap, changelog)
        worker.start()  # creates the changelog again; every key starts a new window
        admin, deadline = AdminClient({"bootstrap.servers": bootstrap}), time.monotonic() + 60
        # All topics listed (a metadata request naming the topic would have the broker create it).
        while len(getattr(admin.list_topics(timeout=10).topics.get(changelog), "partitions", ())) != PARTITIONS:
            assert time.monotonic() < deadline, f"changelog not created again; log:\n{worker.log_tail()}"
            time.sleep(0.5)
        produce_events(bootstrap, worker.input_topic, phase3, rate=0)
        want = expected_scored(phase3)
        counts = collect_scores(bootstrap, scores_topic, want, timeout=120)
        assert want <= counts.keys(), f"{len(want - counts.keys())} events never scored; log:\n{worker.log_tail()}"
        wait_for_group_lag_zero(worker, partitions=PARTITIONS, timeout=60)
        metrics = worker.metrics()
        assert metrics["stream_detector_events_warming_up_total"] == KEYS * (WINDOW - 1)
        assert metrics["stream_detector_events_replayed_total"] == 0
        worker.assert_alive()
    finally:
        worker.stop()


def test_the_changelog_deleted_under_a_running_worker_loses_no_event(kafka_broker, sensor_model_dir, tmp_path):
    """The changelog topic deleted while the worker runs: snapshots can no longer be written where
    the worker's recovery reads them. Whatever the worker does (go on, or stop non-zero so that its
    supervisor restarts it, as a failed snapshot delivery does), every event is scored and the
    committed offsets reach the end once it runs again."""
    bootstrap = kafka_broker.bootstrap_servers
    worker = _worker(kafka_broker, sensor_model_dir, tmp_path, partitions=PARTITIONS, **FAST_METADATA)
    scores_topic = worker.extra_env["STREAM_DETECTOR_SCORES_TOPIC"]
    changelog = f"{worker.consumer_group}-windows-changelog"
    phase1 = generate("sensors", KEYS, 100, anomaly_rate=0.0, seed=161)
    phase2 = shifted(generate("sensors", KEYS, 100, anomaly_rate=0.0, seed=162), 10_000.0, "p2")
    worker.start()
    try:
        produce_events(bootstrap, worker.input_topic, phase1, rate=0)
        want = expected_scored(phase1)
        assert want <= collect_scores(bootstrap, scores_topic, want, timeout=120).keys(), worker.log_tail()
        wait_for_group_lag_zero(worker, partitions=PARTITIONS, timeout=60)

        _delete_topic(bootstrap, changelog)
        produce_events(bootstrap, worker.input_topic, phase2, rate=200)
        want = expected_scored(phase1) | expected_scored(phase2)
        restarts, deadline = 0, time.monotonic() + 180
        while True:
            counts = collect_scores(bootstrap, scores_topic, want, timeout=10)
            if want <= counts.keys():
                break
            if worker.process.poll() is not None:  # a supervisor restarts a worker that stopped
                assert worker.process.returncode != 0, "the worker stopped cleanly with events unscored"
                restarts += 1
                assert restarts <= 3, f"the worker keeps stopping; log:\n{worker.log_tail()}"
                worker.start()
            assert time.monotonic() < deadline, (
                f"{len(want - counts.keys())} events never scored; log:\n{worker.log_tail()}")
        wait_for_group_lag_zero(worker, partitions=PARTITIONS, timeout=60)
        assert worker.metrics()["stream_detector_events_replayed_total"] == 0
        worker.assert_alive()
    finally:
        worker.stop()
