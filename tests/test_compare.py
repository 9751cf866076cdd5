"""Unit tests of the champion/challenger comparison, the promotion gate and the retrain decision."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest

from stream_detector.feedback import Feedback
from stream_detector.registry import CHALLENGER, CHAMPION, read_aliases, remove_alias, rollback, set_alias
from trainer.compare import (
    GateConfig, apply_worker_metrics, compare, format_comparison, gate, incidents_from_alerts,
)
from trainer.lifecycle import alias_set_at, decide
from test_artifacts import save_tiny


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=timezone.utc).isoformat()


def alert(incident: str, key: str, state: str, first: float, last: float, version: str = "v1",
          windows_over: int = 1, severity: float = 1.5) -> dict:
    return {"incident_id": incident, "key": key, "state": state, "model_version": version,
            "incident": {"first_event_timestamp": iso(first), "last_event_timestamp": iso(last),
                         "windows_over": windows_over, "peak_severity": severity}}


def verdict(incident: str, kind: str) -> Feedback:
    return Feedback.new(incident, "k", kind, at=1000.0)


def test_an_incident_spans_its_messages_and_keeps_the_largest_counts():
    found = incidents_from_alerts([(100.0, alert("i1", "k1", "open", 10, 10)),
                                   (101.0, alert("i1", "k1", "update", 10, 40, windows_over=5, severity=3.0)),
                                   (102.0, alert("i1", "k1", "close", 10, 40, windows_over=5))])
    assert len(found) == 1
    (inc,) = found
    assert (inc.first_event_s, inc.last_event_s, inc.windows_over, inc.peak_severity, inc.closed) == (10, 40, 5, 3.0,
                                                                                                      True)


def test_incidents_opened_before_the_period_or_by_another_version_are_left_out():
    messages = [(50.0, alert("old", "k1", "open", 1, 2)), (150.0, alert("old", "k1", "close", 1, 3)),
                (160.0, alert("other", "k2", "open", 5, 6, version="v0")),
                (170.0, alert("new", "k3", "open", 7, 8)),
                (171.0, {"not": "an alert"})]
    assert [i.incident_id for i in incidents_from_alerts(messages, "v1", since=100.0)] == ["new"]


def test_overlapping_incidents_on_one_key_match_and_verdicts_say_what_the_challenger_would_have_done():
    champion = incidents_from_alerts([
        (1.0, alert("fp-shared", "a", "open", 100, 200)),
        (1.0, alert("fp-spared", "b", "open", 100, 200)),
        (1.0, alert("tp-caught", "c", "open", 100, 200)),
        (1.0, alert("tp-missed", "d", "open", 100, 200)),
    ])
    challenger = incidents_from_alerts([
        (1.0, alert("x1", "a", "open", 150, 160, version="v2")),
        (1.0, alert("x2", "c", "open", 190, 300, version="v2")),
        (1.0, alert("x3", "d", "open", 201, 300, version="v2")),  # after d's span: no match without slack
        (1.0, alert("x4", "e", "open", 100, 200, version="v2")),
    ])
    verdicts = {"fp-shared": verdict("fp-shared", "false_positive"), "fp-spared": verdict("fp-spared", "false_positive"),
                "tp-caught": verdict("tp-caught", "true_positive"), "tp-missed": verdict("tp-missed", "true_positive")}
    result = compare(champion, challenger, verdicts, 0.0, 10.0, "v1", "v2")
    assert (result.matched, result.champion_only, result.challenger_only) == (2, 2, 2)
    assert (result.false_positives, result.false_positives_avoided) == (2, 1)
    assert (result.true_positives, result.true_positives_missed) == (2, 1)
    with_slack = compare(champion, challenger, verdicts, 0.0, 10.0, "v1", "v2", match_slack_s=5.0)
    assert (with_slack.true_positives_missed, with_slack.challenger_only) == (0, 1)
    assert "missed 1 confirmed anomalies" in format_comparison(result)


def _result(champion_incidents: int, challenger_incidents: int, seconds: float = 7200.0, tp_missed: int = 0):
    champion = [incidents_from_alerts([(1.0, alert(f"c{i}", f"k{i}", "open", 0, 1))])[0]
                for i in range(champion_incidents)]
    challenger = [incidents_from_alerts([(1.0, alert(f"x{i}", f"z{i}", "open", 0, 1, version="v2"))])[0]
                  for i in range(challenger_incidents)]
    verdicts = {f"c{i}": verdict(f"c{i}", "true_positive") for i in range(tp_missed)}
    return compare(champion, challenger, verdicts, 0.0, seconds, "v1", "v2")


def test_the_gate_passes_a_challenger_that_alarms_less_after_shadowing_long_enough():
    assert gate(_result(10, 3), GateConfig(min_shadow_s=3600)) == (True, [])
    assert gate(_result(0, 0), GateConfig(min_shadow_s=3600)) == (True, [])  # nothing to tell apart: no worse


@pytest.mark.parametrize("result, config, reason", [
    (_result(10, 3, seconds=60), GateConfig(min_shadow_s=3600), "shadowed 60 s"),
    (_result(3, 10), GateConfig(), "opened 10 incidents, the champion 3"),
    (_result(0, 2), GateConfig(), "opened 2 incidents, the champion 0"),
    (_result(3, 1, tp_missed=1), GateConfig(), "missed 1 of the champion's 1 confirmed anomalies"),
    (_result(3, 1), GateConfig(min_challenger_windows=100), "no worker metrics read"),
])
def test_the_gate_refuses_and_says_why(result, config, reason):
    passed, reasons = gate(result, config)
    assert not passed
    assert any(reason in r for r in reasons), reasons


def test_worker_metrics_give_both_models_over_threshold_rates_and_the_agreement():
    result = _result(2, 1)
    samples = {
        ("stream_detector_shadow_windows_total", (("model", "champion"), ("outcome", "over"))): 30.0,
        ("stream_detector_shadow_windows_total", (("model", "champion"), ("outcome", "under"))): 970.0,
        ("stream_detector_shadow_windows_total", (("model", "challenger"), ("outcome", "over"))): 10.0,
        ("stream_detector_shadow_windows_total", (("model", "challenger"), ("outcome", "under"))): 990.0,
        ("stream_detector_shadow_agreement_total", (("agreement", "both"),)): 8.0,
        ("stream_detector_shadow_agreement_total", (("agreement", "champion_only"),)): 22.0,
        ("stream_detector_shadow_agreement_total", (("agreement", "challenger_only"),)): 2.0,
        ("stream_detector_shadow_agreement_total", (("agreement", "neither"),)): 968.0,
    }
    apply_worker_metrics(result, samples)
    assert result.champion.over_threshold_rate == pytest.approx(0.03)
    assert result.challenger.over_threshold_rate == pytest.approx(0.01)
    assert result.challenger.windows_judged == 1000.0
    assert result.agreement["neither"] == pytest.approx(0.968)
    assert gate(result, GateConfig(min_challenger_windows=1000))[0]
    assert not gate(result, GateConfig(min_challenger_windows=1001))[0]
    result.challenger.over_threshold_rate = 0.05  # now it alarms more often than the champion, window by window
    passed, reasons = gate(result, GateConfig())
    assert not passed and "judged 5.000 % of windows over its threshold, the champion 3.000 %" in reasons[0]


def _registry(tmp_path: Path) -> Path:
    save_tiny(tmp_path, version="v1")
    save_tiny(tmp_path, version="v2")
    set_alias(tmp_path, CHAMPION, "v1")
    set_alias(tmp_path, CHALLENGER, "v2")
    return tmp_path


def test_a_passing_gate_promotes_the_challenger_and_a_rollback_returns_to_the_old_champion(tmp_path):
    root = _registry(tmp_path)
    assert decide(root, _result(5, 1), GateConfig(min_shadow_s=60)) == ("promoted", [])
    assert read_aliases(root)["aliases"] == {CHAMPION: "v2"}
    assert rollback(root) == "v1"


def test_a_challenger_not_shadowed_long_enough_waits_and_nothing_moves(tmp_path):
    root = _registry(tmp_path)
    outcome, reasons = decide(root, _result(5, 1, seconds=30), GateConfig(min_shadow_s=60))
    assert outcome == "waiting" and reasons
    assert read_aliases(root)["aliases"] == {CHAMPION: "v1", CHALLENGER: "v2"}


def test_a_failing_gate_retires_the_challenger_and_says_why_in_the_history(tmp_path):
    root = _registry(tmp_path)
    outcome, reasons = decide(root, _result(1, 5), GateConfig(min_shadow_s=60))
    assert outcome == "retired"
    data = read_aliases(root)
    assert data["aliases"] == {CHAMPION: "v1"}
    assert data["history"][-1]["previous"] == "v2" and "gate failed" in data["history"][-1]["reason"]


def test_removing_an_unset_alias_changes_nothing_and_alias_times_come_from_the_history(tmp_path):
    root = _registry(tmp_path)
    before = read_aliases(root)
    assert remove_alias(root, "nonexistent") is None
    assert read_aliases(root) == before
    set_at = alias_set_at(root, CHALLENGER)
    assert set_at is not None and abs(set_at - datetime.now(timezone.utc).timestamp()) < 60
    remove_alias(root, CHALLENGER)
    assert alias_set_at(root, CHALLENGER) is None
