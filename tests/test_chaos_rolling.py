"""Rolling restarts of three workers while keys fall silent with their incident open, against the
real broker: every incident gets exactly one ``open`` and exactly one ``close``.

Issue 21 asks for 5 minutes of restarts: ``CHAOS_ROLLING_RESTARTS=15`` runs them (15 restarts,
one worker every 20 s, each worker restarted five times; about 7 minutes in all). CI runs 6
restarts (2 minutes) to keep the whole run well under 30 minutes: every restart moves partitions
(a rebalance of the whole group), so each key's incident state is handed over through the
changelog about 6 times, and the silent keys' incidents as often with no event to carry them,
which is the behaviour the longer run repeats. 20 % of the keys stop right after their incident opens; the others
go on to the end, their incidents closing as they recover (or, for one open at the end of their
stream, idle). Redelivered alerts repeat their ``alert_id``: "exactly one" counts distinct ids.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import defaultdict

import pytest

from stream_detector.producer import iter_messages, produce_events
from stream_detector.synthetic import LabelledEvent, generate

from test_chaos import _worker
from test_delivery import (WINDOW, alerted_event_ids, anomaly_segments, collect_scores, expected_scored,
                           wait_for_group_lag_zero, with_obvious_anomalies)
from worker_harness import WorkerProcess

pytestmark = pytest.mark.integration

WORKERS = 3
PARTITIONS = 6
RESTART_EVERY_S = 20.0
RESTARTS = int(os.environ.get("CHAOS_ROLLING_RESTARTS", "6"))
IDLE_CLOSE_S = 10  # 4 event-time gaps (1 s each) are less: the setting's limit applies
KEYS = 20
SILENT = 4  # 20 %: they stop right after their incident opens


def _stream() -> tuple[list[LabelledEvent], set[str]]:
    """Every key's events in time order; the silent keys end halfway with 6 anomalous events."""
    events = generate("sensors", KEYS, 300, anomaly_rate=0.02, seed=141)
    by_key: dict[str, list[LabelledEvent]] = defaultdict(list)
    for e in events:
        by_key[e.key].append(e)
    silent = set(sorted(by_key)[:SILENT])
    out: list[LabelledEvent] = []
    for key, stream in by_key.items():
        if key in silent:
            stream = [LabelledEvent(e.key, e.event_id, e.timestamp, e.fields, 0, None) for e in stream[:144]] + \
                     [LabelledEvent(e.key, e.event_id, e.timestamp, e.fields, 1, "test") for e in stream[144:150]]
        out.extend(stream)
    out.sort(key=lambda e: (e.timestamp, e.key))
    return with_obvious_anomalies(out), silent


# Failed in 2 of 4 runs while a key was written only from its second event on (`state_min_events`
# 2): records never scored, each a key's 32nd event. The likely path, made certain in the test
# below: keys' first events processed and committed, with no snapshot, just before the first
# rebalance; their next owner started them without that event, so the 32nd only filled the window.
def test_rolling_restarts_every_20_s_give_every_incident_one_open_and_one_close_with_silent_keys_closed_idle(
        kafka_broker, sensor_model_dir, tmp_path):
    bootstrap = kafka_broker.bootstrap_servers
    # A delivery test: anomalies inside the tail calibration's warm-up are judged by per-key adaptive
    # thresholds, as in test_delivery's kill -9 test.
    first = _worker(kafka_broker, sensor_model_dir, tmp_path, partitions=PARTITIONS,
                    STREAM_DETECTOR_INCIDENT_IDLE_CLOSE_S=str(IDLE_CLOSE_S), STREAM_DETECTOR_TAIL_CALIBRATION="false")
    workers = [first]
    for _ in range(WORKERS - 1):
        other = WorkerProcess(bootstrap, sensor_model_dir, tmp_path / f"worker-{uuid.uuid4().hex[:6]}.log")
        for attr in ("input_topic", "alerts_topic", "dead_letter_topic", "consumer_group"):
            setattr(other, attr, getattr(first, attr))
        other.extra_env = dict(first.extra_env)
        workers.append(other)
    scores_topic = first.extra_env["STREAM_DETECTOR_SCORES_TOPIC"]
    events, silent = _stream()
    assert anomaly_segments(events)
    for worker in workers:
        worker.start()
    try:
        rate = len(events) / (RESTART_EVERY_S * (RESTARTS - 0.5))  # the stream ends before the last restart
        feeder = threading.Thread(target=produce_events, args=(bootstrap, first.input_topic, events, rate))
        feeder.start()
        for i in range(RESTARTS):
            time.sleep(RESTART_EVERY_S)
            worker = workers[i % WORKERS]
            worker.assert_alive()
            worker.stop()  # SIGTERM: a rolling deployment
            worker.start()
        feeder.join(60)
        assert not feeder.is_alive()

        want = expected_scored(events)
        counts = collect_scores(bootstrap, scores_topic, want, timeout=120)
        missing = want - counts.keys()
        assert not missing, (f"{len(missing)} events never scored, e.g. {sorted(missing)[:8]}; lag "
                             f"{ {k: v for k, v in workers[0].metrics().items() if 'consumer_lag' in k} }; "
                             f"log:\n{workers[0].log_tail()}")

        def incidents() -> tuple[list[dict], dict[str, dict[str, set[str]]]]:
            alerts = list(iter_messages(bootstrap, first.alerts_topic, idle_timeout=3.0))
            ids: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
            for a in alerts:
                ids[a["incident_id"]][a["state"]].add(a["alert_id"])
            return alerts, ids

        deadline = time.monotonic() + 4 * IDLE_CLOSE_S + 30  # the last incidents close idle
        while True:
            alerts, ids = incidents()
            if ids and all(states.get("close") for states in ids.values()):
                break
            assert time.monotonic() < deadline, (
                f"incidents never closed: {[i for i, s in ids.items() if not s.get('close')]}; "
                f"log:\n{workers[-1].log_tail()}")
            time.sleep(2.0)

        opens_closes = {i: (len(s.get("open", ())), len(s.get("close", ()))) for i, s in ids.items()}
        assert all(v == (1, 1) for v in opens_closes.values()), {i: v for i, v in opens_closes.items() if v != (1, 1)}
        alerted = set().union(*(alerted_event_ids(a) for a in alerts))
        missed = [seg for seg in anomaly_segments(events) if not alerted & seg]
        assert not missed, f"{len(missed)} injected anomalies never alerted"
        last_close = {}
        for a in alerts:
            if a["state"] == "close":
                last_close[a["key"]] = a["incident"]["close_reason"]
        assert {last_close.get(key) for key in silent} == {"idle"}, last_close
        wait_for_group_lag_zero(workers[0], partitions=PARTITIONS, timeout=60)
        for worker in workers:
            worker.assert_alive()
    finally:
        for worker in workers:
            worker.stop()


def test_a_key_whose_first_event_was_committed_before_a_restart_has_its_first_full_window_scored_after_it(
        kafka_broker, sensor_model_dir, tmp_path):
    """The rolling restarts' lost records, made certain: each key's first event is processed and its
    offset committed (the input goes quiet), then the partitions move to another worker. The key's
    window must come back with that event, or the key's W-th event only fills the window again and is
    never scored."""
    partitions = 2
    first = _worker(kafka_broker, sensor_model_dir, tmp_path, partitions=partitions)
    bootstrap = kafka_broker.bootstrap_servers
    events = generate("sensors", 8, WINDOW + 4, anomaly_rate=0.0, seed=211)
    seen: set[str] = set()
    opening = [e for e in events if e.key not in seen and not seen.add(e.key)]  # each key's first event
    rest = [e for e in events if e not in opening]
    second = WorkerProcess(bootstrap, sensor_model_dir, tmp_path / f"worker-{uuid.uuid4().hex[:6]}.log")
    for attr in ("input_topic", "alerts_topic", "dead_letter_topic", "consumer_group"):
        setattr(second, attr, getattr(first, attr))
    second.extra_env = dict(first.extra_env)
    try:
        first.start()
        produce_events(bootstrap, first.input_topic, opening)
        wait_for_group_lag_zero(first, partitions=partitions, timeout=60)  # committed
        first.stop()
        second.start()
        produce_events(bootstrap, first.input_topic, rest)
        want = expected_scored(events)
        counts = collect_scores(bootstrap, first.extra_env["STREAM_DETECTOR_SCORES_TOPIC"], want, timeout=90)
        missing = want - counts.keys()
        assert not missing, f"{len(missing)} events never scored, e.g. {sorted(missing)[:8]}; log:\n{second.log_tail()}"
    finally:
        first.stop()
        second.stop()
