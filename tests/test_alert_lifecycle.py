"""Alert lifecycle: incidents open, update (rate-limited) and close; blips are suppressed; ids are stable."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch

from stream_detector.alerts import alert_id, incident_id
from stream_detector.artifacts import load_artifact, save_artifact
from stream_detector.detector import Detector, RawRecord
from stream_detector.events import encode_event
from stream_detector.incidents import AlertPolicy, IncidentTracker, WindowInfo
from stream_detector.models import build_model
from stream_detector.preprocessing import ScalerParams
from stream_detector.profiles import SensorProfile
from stream_detector.scoring import Scores
from stream_detector.surprise import TailConfig
from stream_detector.thresholds import AdaptiveThreshold, GlobalThreshold, ThresholdConfig, fit_quantile_threshold

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "stream_detector" / "schemas" / "alert.schema.json"
CONTEXT = {"model_version": "v1", "model_kind": "lstm_ae", "window_size": 4}
T = 1.0  # threshold of the tracker-level tests
T0 = 1_767_225_600.0


@pytest.fixture(scope="module")
def validator():
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


class Stream:
    """Feeds one key's window scores to a tracker and keeps every message, in order."""

    def __init__(self, policy: AlertPolicy | None = None, key: str = "k"):
        self.tracker = IncidentTracker(policy or AlertPolicy())
        self.key = key
        self.messages: list[dict] = []
        self.i = 0
        self.now = 0.0

    def feed(self, scores) -> list[dict]:
        out = []
        for s in scores:
            over = s > T
            info = WindowInfo(f"{self.key}-{self.i}", T0 + self.i, float(s), T,
                              (("a", float(s)),)) if over else None
            msg = self.tracker.observe(self.key, over, info, self.now, CONTEXT)
            if msg is not None:
                out.append(msg)
            self.i += 1
            self.now += 1.0
        self.messages += out
        return out


def reported(messages) -> list[str]:
    return [e for m in messages for e in m["event_ids"]]


def test_a_burst_gives_one_open_bounded_updates_and_one_close(validator):
    policy = AlertPolicy(min_windows=2, close_after=5, update_every=10, update_growth=1.5)
    stream = Stream(policy)
    stream.feed([0.5] * 20)
    burst = np.full(100, 1.4)
    burst[60] = 3.0  # a peak in the middle of the burst
    stream.feed(burst)
    stream.feed([0.5] * 20)
    states = [m["state"] for m in stream.messages]
    assert states[0] == "open" and states[-1] == "close" and states.count("open") == 1 and states.count("close") == 1
    assert 1 <= states.count("update") <= 100 // 10 + 1  # bounded: not one message per window
    assert len({m["incident_id"] for m in stream.messages}) == 1
    assert [m["sequence"] for m in stream.messages] == list(range(len(stream.messages)))
    # Every over-threshold window is reported exactly once, in order; nothing else is.
    assert reported(stream.messages) == [f"k-{i}" for i in range(20, 120)]
    for m in stream.messages:
        validator.validate(m)
    close = stream.messages[-1]
    summary = close["incident"]
    assert summary["close_reason"] == "recovered"
    assert summary["first_event_id"] == "k-20" and summary["last_event_id"] == "k-119"
    assert close["event_id"] == "k-119"  # the newest over-threshold window, not the recovery one
    assert summary["windows_over"] == 100 and summary["windows_total"] == 100 + 5
    assert summary["peak_event_id"] == "k-80" and summary["peak_score"] == 3.0 and summary["peak_severity"] == 3.0
    assert summary["duration_s"] == 99.0
    assert stream.tracker.stats.opened == 1 and stream.tracker.stats.closed == {"recovered": 1}
    assert len(stream.tracker) == 0 and stream.tracker.open_count == 0


def test_updates_when_the_peak_grows_and_at_least_every_m_windows():
    stream = Stream(AlertPolicy(min_windows=1, update_every=4, update_growth=2.0, close_after=3))
    assert [m["state"] for m in stream.feed([1.5])] == ["open"]
    assert stream.feed([1.5, 1.5]) == []  # nothing new worth a message yet
    grown = stream.feed([3.1])  # peak 3.1 >= 2 x 1.5
    assert [m["state"] for m in grown] == ["update"] and grown[0]["event_ids"] == ["k-1", "k-2", "k-3"]
    assert stream.feed([1.5] * 3) == []
    every = stream.feed([1.5])  # the 4th window since the last message
    assert [m["state"] for m in every] == ["update"] and len(every[0]["event_ids"]) == 4
    close = stream.feed([0.1] * 3)
    assert [m["state"] for m in close] == ["close"] and close[0]["event_ids"] == []


def test_min_windows_suppresses_single_blips_but_not_severe_windows():
    stream = Stream(AlertPolicy(min_windows=2, open_severity=2.0))
    assert stream.feed([0.5, 1.2, 0.5, 1.3, 0.5, 1.9, 0.5]) == []  # mild single-window blips
    assert stream.tracker.stats.suppressed == 3 and len(stream.tracker) == 0
    opened = stream.feed([1.2, 1.2])  # two in a row: an incident, the first window included
    assert [m["state"] for m in opened] == ["open"] and opened[0]["event_ids"] == ["k-7", "k-8"]
    assert opened[0]["incident_id"] == incident_id("k", "k-7")
    severe = Stream(AlertPolicy(min_windows=3, open_severity=2.0), key="s")
    opened = severe.feed([0.5, 2.5])  # one window far over threshold opens at once
    assert [m["state"] for m in opened] == ["open"] and opened[0]["event_ids"] == ["s-1"]


def test_short_gaps_keep_the_incident_open():
    stream = Stream(AlertPolicy(min_windows=1, close_after=3, update_every=100))
    stream.feed([1.5, 0.5, 0.5, 1.5, 0.5, 1.5, 0.5, 0.5, 0.5])
    states = [m["state"] for m in stream.messages]
    assert states == ["open", "close"]
    assert reported(stream.messages) == ["k-0", "k-3", "k-5"]
    assert stream.messages[-1]["incident"]["windows_total"] == 9


def test_ids_are_deterministic_and_unique():
    scores = [0.5, 1.5, 1.5, 3.5, 1.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 1.6, 1.7, 0.1] + [0.1] * 10
    policy = AlertPolicy(min_windows=2, close_after=8, update_every=2)
    first, second = Stream(policy), Stream(policy)
    first.feed(scores)
    second.feed(scores)  # the same events again, e.g. replayed after a restart
    ids = [(m["alert_id"], m["incident_id"]) for m in first.messages]
    assert ids == [(m["alert_id"], m["incident_id"]) for m in second.messages]
    assert len({a for a, _ in ids}) == len(ids)  # a subscriber can drop duplicates by alert_id alone
    assert len({i for _, i in ids}) == 2  # two incidents
    for m in first.messages:
        assert m["alert_id"] == alert_id("k", m["event_id"], m["state"])
        assert m["incident_id"] == incident_id("k", m["incident"]["first_event_id"])


def test_idle_incidents_are_closed_by_the_sweep():
    stream = Stream(AlertPolicy(min_windows=1, idle_close_s=60.0))
    stream.feed([1.5, 1.5])
    assert stream.tracker.sweep_idle(stream.now + 30, CONTEXT) == []
    closed = stream.tracker.sweep_idle(stream.now + 61, CONTEXT)
    assert [m["incident"]["close_reason"] for m in closed] == ["idle"] and closed[0]["event_ids"] == ["k-1"]
    assert len(stream.tracker) == 0


def test_close_all_closes_open_incidents_and_forgets_candidates():
    tracker = IncidentTracker(AlertPolicy(min_windows=2, open_severity=10.0))
    for key, n in (("a", 3), ("b", 1)):
        for i in range(n):
            tracker.observe(key, True, WindowInfo(f"{key}{i}", T0, 1.5, T, ()), 0.0, CONTEXT)
    assert tracker.open_count == 1 and len(tracker) == 2
    closed = tracker.close_all("stopped", CONTEXT)
    assert [(m["key"], m["incident"]["close_reason"]) for m in closed] == [("a", "stopped")]
    assert len(tracker) == 0 and tracker.stats.suppressed == 1


@pytest.mark.parametrize("kwargs", [dict(min_windows=0), dict(close_after=0), dict(update_every=0),
                                    dict(update_growth=0.9), dict(open_severity=0.5), dict(idle_close_s=0)])
def test_rejects_bad_policies(kwargs):
    with pytest.raises(ValueError):
        AlertPolicy(**kwargs)


# --- through the Detector: thresholds, lifecycle and key eviction together ----------------------

WINDOW = 4
CHANNELS = ("a", "b", "c")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("lstm_ae", {"n_features": len(CHANNELS), "window": WINDOW, "hidden": 4, "latent": 2})
    scaler = ScalerParams.fit(np.random.default_rng(0).normal(0.0, 1.0, (50, len(CHANNELS))))
    threshold = fit_quantile_threshold(np.linspace(0.0, 2.0, 101), 0.5)  # value 1.0, reference median 1.0
    root = tmp_path_factory.mktemp("model")
    save_artifact(root, model, SensorProfile(CHANNELS), scaler, threshold, version="20260101T000000Z-abcdef")
    return load_artifact(root)


def newest_a(windows: np.ndarray) -> Scores:
    """Score = channel `a` of the window's newest event: tests choose every score."""
    return Scores(windows[:, -1, 0].astype(np.float32), np.abs(windows[:, -1, :]).astype(np.float32))


def rec(key: str, i: int, score: float) -> RawRecord:
    return RawRecord(encode_event(key, f"{key}-{i}", T0 + i, {"a": score, "b": 0.0, "c": 0.0}))


ADAPTIVE = ThresholdConfig(tail=TailConfig(enabled=False))  # per-key adaptive thresholds, tail calibration off


def test_detector_adaptive_policy_is_per_key(artifact):
    detector = Detector(artifact, newest_a, clock=lambda: T0, thresholds=ADAPTIVE)
    assert isinstance(detector.threshold, AdaptiveThreshold)
    warmup = detector.threshold.warmup
    quiet = [rec("quiet", i, 0.5) for i in range(WINDOW - 1 + warmup + 5)]
    decisions, _ = detector.process(quiet)
    assert decisions[0].threshold == artifact.threshold  # global during warm-up
    assert decisions[-1].threshold == pytest.approx(0.5 * artifact.threshold)  # then the key's own: half
    assert decisions[-1].severity == pytest.approx(1.0)
    decisions, _ = detector.process([rec("quiet", 100, 0.8), rec("quiet", 101, 0.8)])
    assert all(d.over for d in decisions) and decisions[1].alert["state"] == "open"
    assert decisions[1].alert["threshold"] == pytest.approx(0.5) and decisions[1].alert["severity"] == pytest.approx(1.6)
    assert decisions[1].alert["event_ids"] == ["quiet-100", "quiet-101"]
    # A key still warming up is judged against the global threshold: 0.8 is normal for it.
    decisions, _ = detector.process([rec("new", i, 0.8) for i in range(WINDOW + 1)])
    assert not any(d.over for d in decisions)


def test_key_eviction_closes_its_incident_and_drops_its_threshold_state(artifact, validator):
    detector = Detector(artifact, newest_a, max_keys=2, clock=lambda: T0,
                        alerting=AlertPolicy(min_windows=1))
    decisions, _ = detector.process([rec("a", i, 0.5 if i < WINDOW else 3.0) for i in range(WINDOW + 2)])
    assert decisions[1].alert["state"] == "open" and decisions[2].alert is None
    assert "a" in detector.threshold and "a" in detector.incidents
    detector.process([rec("b", i, 0.5) for i in range(WINDOW)])
    assert detector.drain_closed() == []
    detector.process([rec("c", 0, 0.5)])  # a third key: the least recently seen, a, is evicted
    closed = detector.drain_closed()
    assert [(m["key"], m["state"], m["incident"]["close_reason"]) for m in closed] == [("a", "close", "evicted")]
    assert closed[0]["event_ids"] == [f"a-{WINDOW + 1}"]  # the window not published yet goes with the close
    validator.validate(closed[0])
    assert "a" not in detector.threshold and "a" not in detector.incidents
    assert detector.drain_closed() == [] and detector.stats.alerts == 2


def test_revoked_partitions_close_their_keys_incidents(artifact):
    detector = Detector(artifact, newest_a, clock=lambda: T0, threshold=GlobalThreshold(1.0),
                        alerting=AlertPolicy(min_windows=1))
    records = [RawRecord(r.value, b"k", T0, 3, i) for i, r in enumerate(rec("k", i, 2.0) for i in range(WINDOW))]
    decisions, _ = detector.process(records)
    assert decisions[0].alert["state"] == "open"
    detector.windows.store.drop_partitions({3})
    assert [m["incident"]["close_reason"] for m in detector.drain_closed()] == ["revoked"]


def test_detector_sweeps_idle_incidents_with_its_clock(artifact):
    now = [T0]
    detector = Detector(artifact, newest_a, clock=lambda: now[0], threshold=GlobalThreshold(1.0),
                        alerting=AlertPolicy(min_windows=1, idle_close_s=30.0))
    detector.process([rec("k", i, 2.0) for i in range(WINDOW)])
    now[0] += 31.0
    detector.process([rec("other", i, 0.1) for i in range(WINDOW)])
    assert [(m["key"], m["incident"]["close_reason"]) for m in detector.drain_closed()] == [("k", "idle")]


# --- settings -------------------------------------------------------------------------------------

from stream_detector.settings import Settings  # noqa: E402
from stream_detector.thresholds import ThresholdConfig  # noqa: E402


def test_default_settings_give_the_default_policies():
    s = Settings()
    assert ThresholdConfig.from_settings(s) == ThresholdConfig()
    assert AlertPolicy.from_settings(s) == AlertPolicy()
    env = {"STREAM_DETECTOR_ADAPTIVE_THRESHOLDS": "false", "STREAM_DETECTOR_ALERT_MIN_WINDOWS": "3",
           "STREAM_DETECTOR_INCIDENT_IDLE_CLOSE_S": "30", "STREAM_DETECTOR_THRESHOLD": "2.5"}
    s = Settings.load(env=env)
    assert ThresholdConfig.from_settings(s) == ThresholdConfig(adaptive=False, override=2.5)
    assert AlertPolicy.from_settings(s) == AlertPolicy(min_windows=3, idle_close_s=30.0)


@pytest.mark.parametrize("changes", [
    dict(threshold_warmup_windows=0), dict(threshold_history=0), dict(threshold_warmup_windows=200),
    dict(threshold_min_ratio=0.0), dict(threshold_min_ratio=1.2), dict(threshold_max_ratio=0.8),
    dict(threshold_max_ratio=float("inf")), dict(alert_min_windows=0), dict(alert_close_after=0),
    dict(alert_update_every=0), dict(alert_open_severity=0.5), dict(alert_update_growth=0.99),
    dict(incident_idle_close_s=0.0), dict(threshold_min_ratio=float("nan")),
])
def test_settings_reject_out_of_range_policy_values(changes):
    with pytest.raises(ValueError, match="invalid settings"):
        Settings(**changes)


def rec_at(key: str, i: int, score: float, offset: int) -> RawRecord:
    """A record as consumed from partition 0, so the key's window is snapshotted."""
    value = encode_event(key, f"{key}-{i}", T0 + i, {"a": score, "b": 0.0, "c": 0.0})
    return RawRecord(value, key.encode(), T0 + i, 0, offset)


def snapshots_of(detector: Detector) -> dict[str, bytes]:
    return {key: detector.snapshot(key, slot) for key, slot in detector.windows.drain_touched().items()}


def test_a_restarted_worker_goes_on_with_a_restored_open_incident_and_publishes_its_pending_windows(artifact):
    first = Detector(artifact, newest_a, clock=lambda: T0, thresholds=ADAPTIVE)
    warm = WINDOW - 1 + first.threshold.warmup + 5
    scores = [0.5] * warm + [0.8] * 3  # calibrated at 0.5; then the 2nd window over it opens, the 3rd waits
    decisions, _ = first.process([rec_at("k", i, s, i) for i, s in enumerate(scores)])
    opened = decisions[-2].alert
    assert opened["state"] == "open" and decisions[-1].alert is None
    pending = f"k-{len(scores) - 1}"  # over threshold, acked, not published yet
    snapshots = snapshots_of(first)

    # kill -9 here: a new worker restores the key from its snapshot and reads on.
    second = Detector(artifact, newest_a, clock=lambda: T0, restore=snapshots.get, thresholds=ADAPTIVE)
    n = len(scores)
    decisions, _ = second.process([rec_at("k", n + i, 0.5, n + i) for i in range(8)])
    assert decisions[0].threshold == pytest.approx(0.5)  # the key's calibration, not the global 1.0
    closed = [d.alert for d in decisions if d.alert is not None]
    assert [m["state"] for m in closed] == ["close"]
    assert closed[0]["incident_id"] == opened["incident_id"] and closed[0]["sequence"] == opened["sequence"] + 1
    assert closed[0]["event_ids"] == [pending]
    assert closed[0]["incident"]["windows_over"] == 3
    assert second.incidents.open_count == 0


def test_redelivered_events_after_a_restore_do_not_repeat_an_incidents_windows(artifact):
    first = Detector(artifact, newest_a, clock=lambda: T0, threshold=GlobalThreshold(1.0),
                     alerting=AlertPolicy(min_windows=1, update_every=100))
    records = [rec_at("k", i, 0.5 if i < WINDOW else 2.0, i) for i in range(WINDOW + 3)]
    first.process(records)
    snapshots = snapshots_of(first)
    second = Detector(artifact, newest_a, clock=lambda: T0, threshold=GlobalThreshold(1.0),
                      alerting=AlertPolicy(min_windows=1, update_every=100), restore=snapshots.get)
    more = [rec_at("k", WINDOW + 3 + i, 0.5, WINDOW + 3 + i) for i in range(8)]
    decisions, batch = second.process(records[-2:] + more)  # the last two were acked late: redelivered
    assert batch.replayed == 2
    closed = [d.alert for d in decisions if d.alert is not None]
    assert [m["state"] for m in closed] == ["close"]
    assert closed[0]["event_ids"] == [f"k-{WINDOW + 1}", f"k-{WINDOW + 2}"]  # each window reported once


def test_a_calibration_made_for_another_model_is_not_taken_over(artifact):
    first = Detector(artifact, newest_a, clock=lambda: T0, thresholds=ADAPTIVE)
    warm = WINDOW - 1 + first.threshold.warmup + 5
    first.process([rec_at("k", i, 0.5, i) for i in range(warm)])
    snapshots = snapshots_of(first)
    other = AdaptiveThreshold(2.0, 1.0)  # another global threshold: the stored calibration does not apply
    second = Detector(artifact, newest_a, clock=lambda: T0, threshold=other, restore=snapshots.get)
    decisions, _ = second.process([rec_at("k", warm, 0.5, warm)])
    assert decisions[0].threshold == pytest.approx(2.0) and not other.calibrated("k")


def test_with_a_changelog_revoked_partitions_hand_their_incidents_over_without_closing_them(artifact):
    detector = Detector(artifact, newest_a, clock=lambda: T0, threshold=GlobalThreshold(1.0),
                        alerting=AlertPolicy(min_windows=1), restore=lambda key: None)
    records = [RawRecord(r.value, b"k", T0, 3, i) for i, r in enumerate(rec("k", i, 2.0) for i in range(WINDOW))]
    decisions, _ = detector.process(records)
    assert decisions[0].alert["state"] == "open" and detector.incidents.open_count == 1
    detector.windows.store.drop_partitions({3})
    assert detector.drain_closed() == [] and "k" not in detector.incidents and detector.incidents.open_count == 0


def test_an_incident_closed_idle_marks_its_key_for_a_new_snapshot(artifact):
    now = [T0]
    detector = Detector(artifact, newest_a, clock=lambda: now[0], threshold=GlobalThreshold(1.0),
                        alerting=AlertPolicy(min_windows=1, idle_close_s=30.0))
    detector.process([rec_at("k", i, 2.0, i) for i in range(WINDOW)])
    snapshots_of(detector)
    now[0] += 31.0
    detector.process([rec_at("other", i, 0.1, i) for i in range(WINDOW)])
    assert [m["incident"]["close_reason"] for m in detector.drain_closed()] == ["idle"]
    snapshots = snapshots_of(detector)
    assert "k" in snapshots
    restored = Detector(artifact, newest_a, clock=lambda: now[0], threshold=GlobalThreshold(1.0),
                        alerting=AlertPolicy(min_windows=1, idle_close_s=30.0), restore=snapshots.get)
    restored.process([rec_at("k", WINDOW, 0.1, WINDOW)])
    assert "k" not in restored.incidents  # the closed incident does not come back


def test_a_corrupt_alert_state_leaves_the_restored_window_and_is_counted(artifact):
    first = Detector(artifact, newest_a, clock=lambda: T0, threshold=GlobalThreshold(1.0),
                     alerting=AlertPolicy(min_windows=1))
    first.process([rec_at("k", i, 2.0, i) for i in range(WINDOW)])
    blob = snapshots_of(first)["k"]
    body = first.windows.store.snapshot_body_size
    corrupt = blob[:body] + blob[body:body + 9] + b"{not json" + blob[body + 18:]
    second = Detector(artifact, newest_a, clock=lambda: T0, threshold=GlobalThreshold(1.0),
                      restore={"k": corrupt}.get)
    decisions, batch = second.process([rec_at("k", WINDOW, 0.1, WINDOW)])
    assert batch.replayed == 0 and len(decisions) == 1  # the window came back: a full window at once
    assert second.windows.restore_failures == 1 and "k" not in second.incidents
