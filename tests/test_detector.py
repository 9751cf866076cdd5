"""Unit tests for stream_detector.detector.Detector with a tiny real artifact (no Kafka)."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jsonschema
import numpy as np
import orjson
import pytest
import torch

from stream_detector import events as ev
from stream_detector.alerts import alert_id, encode_alert, incident_id
from stream_detector.artifacts import load_artifact, save_artifact
from stream_detector.detector import Detector, RawRecord
from stream_detector.events import encode_event
from stream_detector.models import build_model
from stream_detector.preprocessing import ScalerParams
from stream_detector.profiles import SensorProfile
from stream_detector.scoring import ModelRunner, Scores
from stream_detector.incidents import AlertPolicy
from stream_detector.surprise import TailCalibration
from stream_detector.thresholds import GlobalThreshold, fit_quantile_threshold

EVERY_WINDOW = AlertPolicy(min_windows=1, update_every=1)  # a message for every window over threshold

WINDOW = 4
CHANNELS = ("a", "b", "c")
T0 = 1_767_225_600.0
SCHEMA_PATH = Path(__file__).resolve().parent.parent / "stream_detector" / "schemas" / "alert.schema.json"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = build_model("lstm_ae", {"n_features": len(CHANNELS), "window": WINDOW, "hidden": 8, "latent": 4})
    scaler = ScalerParams.fit(rng.normal(0.0, 1.0, (100, len(CHANNELS))))
    threshold = fit_quantile_threshold(rng.gamma(2.0, 1.0, 100), 0.99)
    root = tmp_path_factory.mktemp("model")
    save_artifact(root, model, SensorProfile(CHANNELS), scaler, threshold, version="20260101T000000Z-abcdef")
    return load_artifact(root)


@pytest.fixture(scope="module")
def validator():
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


class RecordingScorer:
    """The real model runner, remembering what it was asked to score."""

    def __init__(self, artifact):
        self.runner = ModelRunner(artifact, device="cpu")
        self.calls: list[np.ndarray] = []

    def __call__(self, windows: np.ndarray) -> Scores:
        self.calls.append(windows.copy())
        return self.runner.score(windows)


def values(key: str, i: int) -> tuple[float, float, float]:
    base = 100.0 * (ord(key[-1]) - ord("a"))
    return (base + i, base - i, base + 0.5 * i)


_offsets = iter(range(10**9))


def record(key: str, i: int, event_id: str | None = None, offset: int | None = None) -> RawRecord:
    """A record as Kafka delivers it: every message has its own, increasing offset."""
    data = encode_event(key, event_id or f"{key}-{i}", T0 + i, dict(zip(CHANNELS, values(key, i))))
    return RawRecord(data, key.encode(), T0 + i, 0, next(_offsets) if offset is None else offset)


def make_detector(artifact, **kwargs):
    scorer = kwargs.pop("scorer", None) or RecordingScorer(artifact)
    return Detector(artifact, scorer, clock=lambda: T0, **kwargs), scorer


def test_same_key_twice_in_a_batch_gets_each_window_as_it_stood_after_its_event(artifact):
    detector, scorer = make_detector(artifact)
    # Key x: events 0..5 in ONE batch, interleaved with key y. Events 3, 4 and 5 of x complete windows.
    records = []
    for i in range(6):
        records.append(record("x", i))
        if i < 4:
            records.append(record("y", i))
    decisions, batch = detector.process(records)
    assert [(d.event.key, d.event.event_id) for d in decisions] == [("x", "x-3"), ("y", "y-3"), ("x", "x-4"),
                                                                     ("x", "x-5")]
    windows = scorer.calls[0]
    assert windows.shape == (4, WINDOW, len(CHANNELS))
    np.testing.assert_array_equal(windows, batch.windows)
    expected = {
        0: [values("x", j) for j in range(0, 4)],
        1: [values("y", j) for j in range(0, 4)],
        2: [values("x", j) for j in range(1, 5)],
        3: [values("x", j) for j in range(2, 6)],
    }
    for row, rows in expected.items():
        np.testing.assert_array_equal(windows[row], np.float32(rows))
    assert not np.array_equal(windows[2], windows[3])  # distinct windows, not the final state twice
    # Each decision carries the record that produced it.
    assert [d.record for d in decisions] == [records[i] for i in (6, 7, 8, 9)]
    assert decisions[3].event.timestamp == T0 + 5


def test_events_before_the_window_fills_count_as_warming_up(artifact):
    detector, scorer = make_detector(artifact)
    decisions, batch = detector.process([record("k", i) for i in range(WINDOW - 1)])
    assert decisions == [] and len(batch) == 0
    assert batch.warming_up == WINDOW - 1 and detector.stats.warming_up == WINDOW - 1
    assert batch.windows.shape == (0, WINDOW, len(CHANNELS))
    decisions, batch = detector.process([record("k", WINDOW - 1), record("other", 0)])
    assert [d.event.event_id for d in decisions] == [f"k-{WINDOW - 1}"]
    assert batch.warming_up == 1 and detector.stats.warming_up == WINDOW
    assert detector.stats.scored == 1 and detector.stats.consumed == WINDOW + 1


def test_invalid_records_counted_by_reason_and_not_scored(artifact):
    detector, scorer = make_detector(artifact)
    bad = [
        RawRecord(None),
        RawRecord(b"{oops"),
        RawRecord(b"[1]"),
        RawRecord(encode_event("k", "e", T0, {"a": 1.0, "b": 2.0})),  # missing field c
        RawRecord(encode_event("k", "e", T0, {"a": 1.0, "b": True, "c": 0.0})),
        RawRecord(encode_event("k", "e", "not a time", {"a": 1.0, "b": 2.0, "c": 0.0})),
        RawRecord(b"{oops again"),
    ]
    good = [record("k", i) for i in range(WINDOW)]
    decisions, batch = detector.process(bad[:3] + good + bad[3:])
    assert detector.stats.invalid == {ev.EMPTY: 1, ev.MALFORMED_JSON: 2, ev.NOT_AN_OBJECT: 1,
                                      ev.MISSING_FIELD: 1, ev.NON_NUMERIC: 1, ev.BAD_TIMESTAMP: 1}
    assert [r for r, _ in batch.invalid] == bad  # original records kept for the dead-letter topic
    assert [d.event.event_id for d in decisions] == [f"k-{WINDOW - 1}"]
    assert len(scorer.calls[0]) == 1
    assert detector.stats.consumed == len(bad) + len(good)
    assert detector.stats.scored == 1 and detector.stats.warming_up == WINDOW - 1
    assert "k" in detector.windows.store and len(detector.windows) == 1  # invalid events did not touch windows


def test_no_alerts_at_an_unreachable_threshold(artifact):
    detector, _ = make_detector(artifact, threshold=GlobalThreshold(1e30))
    decisions, _ = detector.process([record("k", i) for i in range(WINDOW + 2)])
    assert len(decisions) == 3 and all(d.alert is None for d in decisions)
    assert all(d.threshold == 1e30 for d in decisions)
    assert detector.stats.alerts == 0


def test_default_threshold_comes_from_the_artifact(artifact):
    detector, _ = make_detector(artifact)
    assert detector.threshold.value_for("any") == artifact.threshold
    # Per-key tail calibration, as the worker serves by default; the artifact's threshold during warm-up.
    assert isinstance(detector.threshold, TailCalibration)
    assert detector.threshold.value == artifact.threshold


def check_alert(validator, alert):
    errors = sorted(validator.iter_errors(alert), key=str)
    assert not errors, [e.message for e in errors]
    # date-time needs an optional jsonschema extra to be checked by FormatChecker: check it here.
    for name in ("event_timestamp", "detected_at"):
        parsed = datetime.fromisoformat(alert[name])
        assert parsed.utcoffset() is not None and parsed.utcoffset().total_seconds() == 0
    assert orjson.loads(encode_alert(alert)) == alert


def test_forced_low_threshold_alerts_on_every_scored_event_with_valid_alerts(artifact, validator):
    detector, _ = make_detector(artifact, threshold=GlobalThreshold(value=-1), top_features=2,
                                alerting=EVERY_WINDOW)
    records = [record(k, i) for i in range(WINDOW + 1) for k in ("x", "y")]
    decisions, _ = detector.process(records)
    assert len(decisions) == 4 and detector.stats.alerts == 4 and detector.stats.over_threshold == 4
    assert [d.alert["state"] for d in decisions] == ["open", "open", "update", "update"]
    for d in decisions:
        alert = d.alert
        assert alert is not None and d.over and d.severity is None
        check_alert(validator, alert)
        assert alert["key"] == d.event.key and alert["event_id"] == d.event.event_id
        assert alert["event_ids"] == [d.event.event_id]
        assert alert["alert_id"] == alert_id(d.event.key, d.event.event_id, alert["state"])
        assert alert["incident"]["first_event_id"] == f"{d.event.key}-{WINDOW - 1}"
        assert alert["score"] == pytest.approx(d.score) and alert["threshold"] == -1.0
        assert alert["severity"] is None  # no meaningful ratio to a non-positive threshold
        assert alert["model_version"] == artifact.version and alert["model_kind"] == "lstm_ae"
        assert alert["window_size"] == WINDOW
        assert len(alert["top_features"]) == 2
        errors = [f["error"] for f in alert["top_features"]]
        assert errors == sorted(errors, reverse=True)
        assert {f["feature"] for f in alert["top_features"]} <= set(CHANNELS)
        assert datetime.fromisoformat(alert["event_timestamp"]).timestamp() == d.event.timestamp


def test_alert_with_positive_threshold_has_severity_above_one(artifact, validator):
    detector, _ = make_detector(artifact, threshold=GlobalThreshold(value=1e-12))
    decisions, _ = detector.process([record("k", i) for i in range(WINDOW)])
    alert = decisions[0].alert
    check_alert(validator, alert)
    assert alert["severity"] > 1.0 and decisions[0].severity == pytest.approx(alert["severity"])
    assert alert["state"] == "open"  # far over threshold: opens at once, whatever alert_min_windows


def test_schema_validator_really_checks_formats(validator):
    ts = "2026-01-01T00:00:00+00:00"
    alert = {"schema_version": 2, "alert_id": "not-a-uuid", "incident_id": incident_id("k", "e"), "state": "open",
             "sequence": 0, "event_id": "e", "event_ids": ["e"], "key": "k", "event_timestamp": ts,
             "detected_at": ts, "score": 1.0, "threshold": 0.5, "severity": 2.0, "model_version": "v",
             "model_kind": "lstm_ae", "window_size": 4, "top_features": [],
             "incident": {"first_event_id": "e", "first_event_timestamp": ts, "last_event_id": "e",
                          "last_event_timestamp": ts, "windows_over": 1, "windows_total": 1, "peak_event_id": "e",
                          "peak_score": 1.0, "peak_severity": 2.0, "duration_s": 0.0, "close_reason": None}}
    assert any(e.validator == "format" for e in validator.iter_errors(alert))
    alert["alert_id"] = alert_id("k", "e")
    assert list(validator.iter_errors(alert)) == []
    alert["extra"] = 1
    assert list(validator.iter_errors(alert))
    del alert["extra"]
    alert["event_ids"] = []  # only a close may report no new window
    assert list(validator.iter_errors(alert))
    alert["state"] = "close"
    assert list(validator.iter_errors(alert))  # a close says why
    alert["incident"]["close_reason"] = "recovered"
    assert list(validator.iter_errors(alert)) == []


def test_alert_id_is_deterministic_for_the_same_key_and_event(artifact):
    first, _ = make_detector(artifact, threshold=GlobalThreshold(value=-1), alerting=EVERY_WINDOW)
    second, _ = make_detector(artifact, threshold=GlobalThreshold(value=-1), alerting=EVERY_WINDOW)
    records = [record("k", i) for i in range(WINDOW)]
    a = first.process(records)[0][0].alert
    b = second.process(records)[0][0].alert  # the same event scored again, e.g. after a restart
    assert a["alert_id"] == b["alert_id"] == alert_id("k", f"k-{WINDOW - 1}", "open")
    assert a["incident_id"] == b["incident_id"] == incident_id("k", f"k-{WINDOW - 1}")
    assert alert_id("k", "e1") != alert_id("k", "e2")
    assert alert_id("k", "e1") != alert_id("k2", "e1")
    assert alert_id("k", "e1", "open") != alert_id("k", "e1", "close")


def test_key_field_rekeys_windows(artifact):
    detector, _ = make_detector(artifact, key_field="c", threshold=GlobalThreshold(-1), alerting=EVERY_WINDOW)
    # Different event keys, the same value of field c: one window, keyed by c.
    records = [RawRecord(encode_event(f"sender-{i}", f"e{i}", T0 + i, {"a": float(i), "b": 0.0, "c": 7}))
               for i in range(WINDOW)]
    records.append(RawRecord(encode_event("sender-x", "ex", T0, {"a": 1.0, "b": 2.0, "c": 1.5})))
    decisions, _ = detector.process(records)
    assert [(d.event.key, d.event.event_id) for d in decisions] == [("7", f"e{WINDOW - 1}")]
    assert decisions[0].alert["key"] == "7"
    assert detector.stats.invalid == {ev.BAD_KEY: 1}  # 1.5 is not an identifier


def test_capacity_evictions_are_counted(artifact):
    detector, _ = make_detector(artifact, max_keys=2)
    detector.process([record(k, 0) for k in ("a", "b", "c", "a")])
    assert detector.stats.evicted == {"capacity": 2}
    assert len(detector.windows) == 2


def test_process_large_batch_grows_buffer(artifact):
    detector, scorer = make_detector(artifact, max_batch=2)
    decisions, batch = detector.process([record("k", i) for i in range(WINDOW + 5)])
    assert len(decisions) == 6 and batch.windows.shape[0] == 6
    np.testing.assert_array_equal(batch.windows[-1], np.float32([values("k", j) for j in range(5, 9)]))


def test_a_batch_prepared_in_parts_scores_and_judges_like_one_prepared_whole(artifact):
    records = [record(key, i) for i in range(WINDOW + 6) for key in ("p", "q", "r")]
    whole, _ = make_detector(artifact, max_batch=4)
    expected, _ = whole.process(records)
    parted, _ = make_detector(artifact, max_batch=4)
    parts, row = [], 0
    for first in range(0, len(records), 7):  # the worker's order: every part prepared, then judged
        part = parted.prepare(records[first:first + 7], first_row=row)
        row += len(part)
        parts.append(part)
    # A later part (growing the buffer, too) never overwrites an earlier one still being scored.
    windows = np.concatenate([part.windows for part in parts])
    reference, _ = make_detector(artifact)
    np.testing.assert_array_equal(windows, reference.prepare(records).windows)
    decisions = [d for part in parts for d in parted.finish(part, parted.score(part))]
    assert [(d.event.event_id, d.score, d.threshold, d.over) for d in decisions] == \
        [(d.event.event_id, d.score, d.threshold, d.over) for d in expected]


def test_the_next_batch_is_windowed_without_touching_the_rows_of_the_batch_still_being_scored(artifact):
    detector, _ = make_detector(artifact, max_batch=4)
    first = detector.prepare([record(key, i) for i in range(WINDOW + 1) for key in ("u", "v")])
    rows = first.windows.copy()
    second = detector.prepare([record(key, i) for i in range(WINDOW + 1, WINDOW + 9) for key in ("u", "v")])
    np.testing.assert_array_equal(first.windows, rows)  # a pipelined worker scores these meanwhile
    assert not np.shares_memory(first.windows, second.windows)
    np.testing.assert_array_equal(second.windows[-1], np.float32([values("v", j) for j in range(WINDOW + 5, WINDOW + 9)]))


def test_a_snapshot_is_its_window_part_followed_by_the_keys_incident_and_threshold_state(artifact):
    detector, _ = make_detector(artifact, threshold=GlobalThreshold(value=-1), alerting=EVERY_WINDOW)
    decisions, _ = detector.process([record("w", i) for i in range(WINDOW + 1)])
    assert any(d.alert for d in decisions)
    slot = detector.windows.store.slot_of("w")
    state = detector.key_state("w")
    assert state  # the open incident (every window is over a threshold of -1)
    assert detector.snapshot("w", slot) == detector.windows.store.snapshot(slot) + state
    assert detector.key_state("never-seen") == b""


def test_a_model_swap_waits_for_the_next_batch_not_the_next_part(artifact):
    detector, first_scorer = make_detector(artifact)
    second_scorer = RecordingScorer(artifact)
    detector.prepare([record("s", i) for i in range(WINDOW)])
    detector.swap_model(artifact, second_scorer)
    part = detector.prepare([record("s", WINDOW)], first_row=1)  # the same micro-batch
    assert detector.scorer is first_scorer
    detector.score(part)
    assert len(first_scorer.calls) == 1 and not second_scorer.calls
    detector.prepare([record("s", WINDOW + 1)])  # the next micro-batch
    assert detector.scorer is second_scorer


def test_redelivered_records_already_in_a_restored_window_are_not_applied_twice(artifact):
    first, _ = make_detector(artifact)
    records = [record("k", i, offset=100 + i) for i in range(6)]
    first.process(records)
    snapshots = {key: first.windows.store.snapshot(slot) for key, slot in first.windows.drain_touched().items()}

    # A restarted worker restores the key's state and is handed the last three records again.
    second, scorer = make_detector(artifact, restore=snapshots.get)
    decisions, batch = second.process(records[3:] + [record("k", 6, offset=106)])
    assert batch.replayed == 3
    assert [d.event.event_id for d in decisions] == ["k-6"]
    expected = [values("k", j) for j in range(3, 7)]
    np.testing.assert_array_equal(scorer.calls[0][0], np.float32(expected))


def test_changed_keys_are_due_by_the_generation_they_first_changed_in(artifact):
    detector, _ = make_detector(artifact)
    windows = detector.windows
    detector.prepare([record("a", 0), record("b", 0)])
    windows.seal(1, now=10.0)
    detector.prepare([record("c", 0), record("a", 1)])  # a is still due with batch 1's keys
    windows.seal(2, now=11.0)
    assert windows.newest_sealed == 2

    due, through = windows.drain_sealed(10.5)
    assert (sorted(due), through) == (["a", "b"], 1)
    assert windows.drain_sealed(10.5) == ({}, None)  # nothing else sealed by then
    detector.prepare([record("a", 2)])  # written already: a changes again, in the open generation
    due, through = windows.drain_sealed(11.0)
    assert (sorted(due), through) == (["c"], 2)
    assert windows.newest_sealed is None
    assert sorted(windows.drain_touched()) == ["a"]  # every changed key, sealed or not
    assert windows.drain_touched() == {}


def test_flat_records_keyed_by_the_record_key_are_windowed_and_alerted_by_record_time_and_position(artifact):
    from stream_detector.events import Envelope

    envelope = Envelope(key_from="record_key", time_from="record_timestamp", event_id_from="record_position",
                        fields_path="")
    detector, _ = make_detector(artifact, threshold=GlobalThreshold(-1), alerting=EVERY_WINDOW, envelope=envelope,
                                topic="sensors")
    records = [RawRecord(orjson.dumps(dict(zip(CHANNELS, values("a", i)))), b"pump-a", T0 + i, 3, 100 + i)
               for i in range(WINDOW)]
    decisions, batch = detector.process(records)
    assert not batch.invalid
    assert [(d.event.key, d.event.event_id, d.event.timestamp) for d in decisions] == [
        ("pump-a", f"sensors:3:{100 + WINDOW - 1}", T0 + WINDOW - 1)]
    assert decisions[0].alert["event_id"] == f"sensors:3:{100 + WINDOW - 1}"
