"""Feedback: verdicts are validated, an expected change closes its incident as acknowledged and
restarts the key's threshold warm-up, and invalid feedback is dead-lettered, never raised."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import jsonschema
import orjson
import pytest

from stream_detector.detector import Detector, RawRecord
from stream_detector.feedback import (EXPECTED_CHANGE, FALSE_POSITIVE, INVALID_FEEDBACK, TRUE_POSITIVE, VERDICTS,
                                      Feedback, InvalidFeedback, parse_feedback, read_feedback_jsonl)
from stream_detector.incidents import AlertPolicy
from stream_detector.metrics import WorkerMetrics
from stream_detector.runtime.feedback import FeedbackHandler
from stream_detector.settings import Settings

from test_alert_lifecycle import ADAPTIVE, T0, WINDOW, artifact, newest_a, rec, validator  # noqa: F401 (fixtures)

SCHEMAS = Path(__file__).resolve().parent.parent / "stream_detector" / "schemas"


@pytest.fixture(scope="module")
def feedback_validator():
    schema = json.loads((SCHEMAS / "feedback.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


def test_a_verdict_round_trips_keyed_by_its_incident_id_and_matches_the_schema(feedback_validator):
    for verdict in VERDICTS:
        feedback = Feedback.new("inc-1", "device-7", verdict, by="alice", note="planned", at=T0)
        key, value = feedback.encode()
        assert key == b"inc-1"
        assert parse_feedback(value, key) == feedback
        feedback_validator.validate(orjson.loads(value))
    minimal = Feedback.new("inc-2", "k", TRUE_POSITIVE, at=T0).to_dict()
    assert set(minimal) == {"incident_id", "key", "verdict", "at"} and minimal["at"].endswith("+00:00")


@pytest.mark.parametrize("value, record_key, reason", [
    (None, None, "tombstone"),
    (b"{not json", None, "not JSON"),
    (b"[1, 2]", None, "not a JSON object"),
    (b'{"incident_id": "i", "key": "k", "at": "2026-01-01T00:00:00+00:00"}', None, "missing verdict"),
    (b'{"incident_id": "i", "key": "k", "verdict": "maybe", "at": "2026-01-01T00:00:00+00:00"}', None, "verdict"),
    (b'{"incident_id": "i", "key": "k", "verdict": "true_positive", "at": "yesterday"}', None, "ISO 8601"),
    (b'{"incident_id": "i", "key": "k", "verdict": "true_positive", "at": "2026-01-01T00:00:00"}', None,
     "UTC offset"),
    (b'{"incident_id": "", "key": "k", "verdict": "true_positive", "at": "2026-01-01T00:00:00+00:00"}', None,
     "must not be empty"),
    (b'{"incident_id": "i", "key": 3, "verdict": "true_positive", "at": "2026-01-01T00:00:00+00:00"}', None,
     "key must be a string"),
    (b'{"incident_id": "i", "key": "k", "verdict": "true_positive", "at": "2026-01-01T00:00:00+00:00", "x": 1}',
     None, "unknown field"),
    (b'{"incident_id": "i", "key": "k", "verdict": "true_positive", "at": "2026-01-01T00:00:00+00:00"}', b"other",
     "record key must be the incident id"),
])
def test_invalid_feedback_is_refused_with_its_reason(value, record_key, reason, feedback_validator):
    with pytest.raises(InvalidFeedback, match=reason):
        parse_feedback(value, record_key)


def test_the_schema_refuses_what_the_parser_refuses(feedback_validator):
    bad = {"incident_id": "i", "key": "k", "verdict": "maybe", "at": "2026-01-01T00:00:00+00:00"}
    assert not feedback_validator.is_valid(bad)
    assert not feedback_validator.is_valid({**bad, "verdict": "true_positive", "extra": 1})


def test_the_feedback_topic_follows_the_alerts_topic_unless_set():
    assert Settings(alerts_topic="alerts-x").feedback_topic_name == "alerts-x.feedback"
    assert Settings(feedback_topic="verdicts").feedback_topic_name == "verdicts"


def _open_incident(detector: Detector, key: str = "k") -> dict:
    warmup = detector.threshold.warmup
    detector.process([rec(key, i, 0.5) for i in range(WINDOW - 1 + warmup + 2)])  # calibrated: 0.5 x global
    assert detector.threshold.calibrated(key)
    decisions, _ = detector.process([rec(key, 1000 + i, 0.9) for i in range(2)])
    opened = [d.alert for d in decisions if d.alert is not None]
    assert [m["state"] for m in opened] == ["open"]
    return opened[0]


def test_expected_change_closes_the_open_incident_as_acknowledged_and_restarts_the_warmup(artifact, validator):
    detector = Detector(artifact, newest_a, clock=lambda: T0, alerting=AlertPolicy(min_windows=2), thresholds=ADAPTIVE)
    opened = _open_incident(detector)
    detector.windows.drain_touched()
    closed = detector.acknowledge("k", opened["incident_id"])
    assert closed is not None and closed["state"] == "close" and closed["incident_id"] == opened["incident_id"]
    assert closed["incident"]["close_reason"] == "acknowledged"
    validator.validate(closed)
    assert "k" not in detector.incidents and detector.incidents.open_count == 0
    assert not detector.threshold.calibrated("k") and detector.threshold.calibrated_keys == 0
    assert "k" in detector.windows.touched  # its snapshot (now without the incident) is written again
    # Warming up again, the key is judged against the global threshold: 0.9 is normal for it now.
    decisions, _ = detector.process([rec("k", 2000 + i, 0.9) for i in range(4)])
    assert all(d.threshold == artifact.threshold and not d.over for d in decisions)


def test_a_verdict_for_another_or_closed_incident_changes_nothing(artifact):
    detector = Detector(artifact, newest_a, clock=lambda: T0, alerting=AlertPolicy(min_windows=2), thresholds=ADAPTIVE)
    opened = _open_incident(detector)
    assert detector.acknowledge("k", "some-other-incident") is None
    assert detector.acknowledge("unknown-key", opened["incident_id"]) is None
    assert "k" in detector.incidents and detector.threshold.calibrated("k")


class _Sent:
    def __init__(self, log: list):
        self.log = log

    def send(self, topic, key, value, partition=None, headers=None):
        self.log.append((topic, key, value, dict(headers or ())))

    def wait(self):
        future = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future


class _Out:
    """Stands in for the output producer: records what would be sent (the broker path is the
    integration test's, tests/test_feedback_worker.py)."""

    max_message_bytes = 1_000_000

    def __init__(self):
        self.sent: list = []

    def group(self):
        return _Sent(self.sent)


def _handle(handler: FeedbackHandler, value: bytes | None, key: bytes | None, offset: int = 0) -> None:
    asyncio.run(handler.handle(RawRecord(value, key, T0, 0, offset)))


def test_the_handler_counts_verdicts_dead_letters_invalid_ones_and_publishes_the_acknowledged_close(artifact):
    detector = Detector(artifact, newest_a, clock=lambda: T0, alerting=AlertPolicy(min_windows=2), thresholds=ADAPTIVE)
    opened = _open_incident(detector)
    metrics, out = WorkerMetrics(), _Out()
    handler = FeedbackHandler(detector, metrics, out, "alerts.feedback", "alerts", "events.dlq")
    _handle(handler, b"garbage", b"x", offset=3)
    assert metrics.feedback_invalid._value.get() == 1 and metrics.dead_lettered._value.get() == 1
    topic, key, value, headers = out.sent[-1]
    assert (topic, key, value) == ("events.dlq", b"x", b"garbage")
    assert headers["x-dlq-reason"] == INVALID_FEEDBACK.encode() and headers["x-dlq-source"] == b"alerts.feedback:0:3"
    for verdict in (TRUE_POSITIVE, FALSE_POSITIVE):
        _handle(handler, *reversed(Feedback.new(opened["incident_id"], "k", verdict, at=T0).encode()))
    assert "k" in detector.incidents and len(out.sent) == 1  # counted only
    _handle(handler, *reversed(Feedback.new(opened["incident_id"], "k", EXPECTED_CHANGE, at=T0).encode()))
    topic, key, value, _ = out.sent[-1]
    assert topic == "alerts" and key == b"k"
    assert orjson.loads(value)["incident"]["close_reason"] == "acknowledged"
    counts = {v: metrics.feedback.labels(verdict=v)._value.get() for v in VERDICTS}
    assert counts == {TRUE_POSITIVE: 1, FALSE_POSITIVE: 1, EXPECTED_CHANGE: 1}
    assert metrics.incidents_closed.labels(reason="acknowledged")._value.get() == 1
    assert metrics.incidents_open._value.get() == 0


def test_a_feedback_dump_gives_the_latest_verdict_of_each_incident(tmp_path):
    dump = tmp_path / "feedback.jsonl"
    lines = [Feedback.new("a", "k1", TRUE_POSITIVE, at=T0).encode()[1],
             Feedback.new("b", "k2", TRUE_POSITIVE, at=T0).encode()[1],
             Feedback.new("a", "k1", FALSE_POSITIVE, at=T0 + 1).encode()[1]]
    dump.write_bytes(b"\n".join(lines) + b"\n\n")
    verdicts = read_feedback_jsonl(str(dump))
    assert {i: f.verdict for i, f in verdicts.items()} == {"a": FALSE_POSITIVE, "b": TRUE_POSITIVE}
    dump.write_bytes(lines[0] + b"\n{}\n")
    with pytest.raises(ValueError, match=r"feedback.jsonl:2: missing"):
        read_feedback_jsonl(str(dump))


def test_verdicts_relabel_their_incidents_events_for_training():
    from trainer.feedback import apply_verdicts

    alerts = [{"incident_id": "tp", "event_ids": ["e1", "e2"]}, {"incident_id": "tp", "event_ids": ["e3"]},
              {"incident_id": "fp", "event_ids": ["e5"]}, {"incident_id": "chg", "event_ids": ["e6"]},
              {"incident_id": "unjudged", "event_ids": ["e7"]}]
    verdicts = {"tp": Feedback.new("tp", "k", TRUE_POSITIVE, at=T0), "fp": Feedback.new("fp", "k", FALSE_POSITIVE, at=T0),
                "chg": Feedback.new("chg", "k", EXPECTED_CHANGE, at=T0)}
    ids = ["e0", "e1", "e2", "e3", "e4", "e5", "e6", "e7"]
    labels, counts = apply_verdicts(ids, [0, 0, 0, 0, 1, 1, 0, 1], verdicts, alerts)
    # true positives anomalous; a false positive normal even where the data said otherwise; others untouched
    assert labels == [0, 1, 1, 1, 1, 0, 0, 1]
    assert counts == {TRUE_POSITIVE: 3, FALSE_POSITIVE: 1}
