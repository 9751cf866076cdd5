"""Two workers under several faults at once, against the real broker: nothing is lost.

Events with null record keys are mixed into a keyed stream consumed by two workers (with
``key_partition_check=dead_letter``), one worker is killed with ``kill -9`` mid-stream and started
again, and the model of both raises on one call in 1,000 (retried, see
``stream_detector.runtime.failures``). Every keyed event is scored, every null-keyed one
dead-lettered and never scored, every injected anomaly alerted, no ``alert_id`` names two
different alerts, and the committed offsets reach the end.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Producer

from stream_detector.producer import iter_messages, produce_events
from stream_detector.synthetic import generate

from test_chaos import _dead_letters, _worker
from test_delivery import (alerted_event_ids, anomaly_segments, collect_scores, expected_scored, shifted,
                           wait_for_group_lag_zero, with_obvious_anomalies)
from worker_harness import WorkerProcess

pytestmark = pytest.mark.integration

PARTITIONS = 4
FAULTY = [sys.executable, str(Path(__file__).with_name("faulty_model_worker.py"))]


def _wait_ready(worker: WorkerProcess, timeout: float) -> None:
    """Until the worker's /readyz answers 200 (it holds input partitions, its recovery done)."""
    url = worker.metrics_url.replace("/metrics", "/readyz")
    deadline = time.monotonic() + timeout
    while True:
        worker.assert_alive()
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"not ready after {timeout} s; log:\n{worker.log_tail()}"
        time.sleep(0.5)


def _alerts_by_id(alerts: list[dict]) -> dict[str, set[tuple]]:
    by_id: dict[str, set[tuple]] = defaultdict(set)
    for a in alerts:  # a redelivered alert repeats its id and its content
        by_id[a["alert_id"]].add((a["key"], a["event_id"], a["state"], a["incident_id"]))
    return by_id


def test_null_keys_a_kill_9_and_a_model_failing_one_call_in_1000_across_two_workers_lose_nothing(
        kafka_broker, sensor_model_dir, tmp_path):
    bootstrap = kafka_broker.bootstrap_servers
    # A delivery test: anomalies inside the tail calibration's warm-up are judged by per-key adaptive
    # thresholds, as in test_delivery's kill -9 test.
    first = _worker(kafka_broker, sensor_model_dir, tmp_path, partitions=PARTITIONS,
                    STREAM_DETECTOR_KEY_PARTITION_CHECK="dead_letter", STREAM_DETECTOR_TAIL_CALIBRATION="false",
                    FAULTY_MODEL_EVERY="1000")
    first.command = FAULTY

    def sibling() -> WorkerProcess:
        other = WorkerProcess(bootstrap, sensor_model_dir, tmp_path / f"worker-{time.time_ns()}.log", command=FAULTY)
        for attr in ("input_topic", "alerts_topic", "dead_letter_topic", "consumer_group"):
            setattr(other, attr, getattr(first, attr))
        other.extra_env = dict(first.extra_env)
        return other

    second = sibling()
    scores_topic = first.extra_env["STREAM_DETECTOR_SCORES_TOPIC"]
    keyed = with_obvious_anomalies(generate("sensors", 12, 600, anomaly_rate=0.02, seed=131))
    unkeyed = shifted(generate("sensors", 3, 60, anomaly_rate=0.0, seed=132), 100_000.0, "nokey")
    assert anomaly_segments(keyed)
    restarted: WorkerProcess | None = None
    first.start()
    second.start()
    try:
        for worker in (first, second):  # both hold partitions before the events come
            _wait_ready(worker, timeout=90)
        feeder = threading.Thread(target=produce_events, args=(bootstrap, first.input_topic, keyed, 600.0))
        feeder.start()
        producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
        started = time.monotonic()
        for i, e in enumerate(unkeyed):  # no record key: spread over the partitions, paced with the rest
            producer.produce(first.input_topic, value=orjson.dumps(e.to_message()), partition=i % PARTITIONS)
            producer.poll(0)
            time.sleep(0.05)
            if second.process is not None and time.monotonic() - started > 5.0 and restarted is None:
                second.process.send_signal(signal.SIGKILL)  # kill -9 mid-stream, both feeds flowing
                second.process.wait(10)
                restarted = sibling().start()
        assert producer.flush(30) == 0
        feeder.join(120)
        assert not feeder.is_alive() and restarted is not None

        want = expected_scored(keyed)
        scored: dict[str, list[tuple[float, float]]] = {}
        counts = collect_scores(bootstrap, scores_topic, want, timeout=240, scored=scored)
        missing = want - counts.keys()
        assert not missing, f"{len(missing)} keyed events never scored; logs:\n{first.log_tail()}\n{restarted.log_tail()}"
        wait_for_group_lag_zero(first, partitions=PARTITIONS, timeout=90)

        counts = collect_scores(bootstrap, scores_topic, want, timeout=10)
        assert not {e.event_id for e in unkeyed} & counts.keys()  # none windowed
        letters = _dead_letters(bootstrap, first.dead_letter_topic, want=len(unkeyed), timeout=60)
        lettered = {orjson.loads(value)["event_id"] for value, _ in letters}
        assert lettered == {e.event_id for e in unkeyed}  # each at least once (a redelivery repeats one)
        assert {h["x-dlq-reason"] for _, h in letters} == {b"key_partition_mismatch"}

        alerts = list(iter_messages(bootstrap, first.alerts_topic, idle_timeout=5.0))
        alerted = set().union(*(alerted_event_ids(a) for a in alerts)) if alerts else set()
        missed = [seg for seg in anomaly_segments(keyed) if not alerted & seg]
        assert not missed, (f"{len(missed)} injected anomalies never alerted; (score, threshold): "
                            f"{[{i: scored.get(i) for i in sorted(seg)} for seg in missed]}")
        by_id = _alerts_by_id(alerts)
        assert all(len(v) == 1 for v in by_id.values()), {k: v for k, v in by_id.items() if len(v) > 1}

        for worker in (first, restarted):
            worker.assert_alive()  # a model call that raised once was retried, never a batch failure
        logs = "".join(w.log_path.read_text() for w in (first, second, restarted))
        assert "injected model failure" in logs  # the fault happened (and was retried: no batch failed)
        assert "micro-batch failed" not in logs
    finally:
        for worker in (first, second, restarted):
            if worker is not None:
                worker.stop()
