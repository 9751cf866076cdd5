"""Univariate series (``timestamp,value[,label]``) train and evaluate with defaults, and
``trainer evaluate`` reports NAB scores from labelled segments or a NAB windows file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from stream_detector.artifacts import load_artifact
from trainer.cli import main as trainer_main
from trainer.evaluate import Replay, nab_evaluation, window_ids_from_labels, window_ids_from_nab
from trainer.nab import PROFILES

START = np.datetime64("2026-01-01T00:00:00")


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def series_rows(n: int, seed: int, anomalies: list[tuple[int, int]]) -> list[tuple[str, float, int]]:
    """A daily-cycle series sampled every 5 minutes, with level shifts on the given row ranges."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    value = 50 + 10 * np.sin(2 * np.pi * t / 288) + rng.normal(0, 0.5, n)
    label = np.zeros(n, dtype=int)
    for a, b in anomalies:
        value[a:b + 1] += 25.0
        label[a:b + 1] = 1
    stamps = [str(START + np.timedelta64(5 * int(i), "m")).replace("T", " ") for i in t]
    return list(zip(stamps, value.round(4).tolist(), label.tolist()))


def write_series(path: Path, rows, with_label: bool = True) -> None:
    header = "timestamp,value,label" if with_label else "timestamp,value"
    body = [f"{s},{v},{y}" if with_label else f"{s},{v}" for s, v, y in rows]
    path.write_text("\n".join([header, *body]) + "\n")


@pytest.fixture(scope="module")
def univariate_model(tmp_path_factory):
    """A model trained with default settings on a 400-row normal head of a univariate series."""
    root = tmp_path_factory.mktemp("univariate")
    rows = series_rows(1400, seed=11, anomalies=[(700, 730), (1100, 1120)])
    write_series(root / "series.csv", rows)
    write_series(root / "head.csv", rows[:400])
    rc = trainer_main(["train", "--profile", "sensors", "--csv", str(root / "head.csv"), "--epochs", "4",
                       "--no-progress", "--threads", "1", "--device", "cpu", "--out", str(root / "model")])
    assert rc == 0
    return root


def test_a_timestamp_value_csv_trains_with_its_value_column_as_the_one_channel(univariate_model):
    artifact = load_artifact(univariate_model / "model")
    assert artifact.profile.name == "sensors"
    assert list(artifact.feature_names) == ["value"]
    assert artifact.window == 32 and artifact.threshold > 0


def test_evaluate_reports_nab_scores_from_labelled_segments(univariate_model, capsys):
    out = univariate_model / "report.json"
    rc = trainer_main(["evaluate", "--model-dir", str(univariate_model / "model"), "--csv",
                       str(univariate_model / "series.csv"), "--label-column", "label", "--json", str(out),
                       "--threads", "1"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "point F1" in printed and "NAB score" in printed and "alert messages (open, update)" in printed
    report = json.loads(out.read_text())
    nab = report["nab"]
    assert nab["series"] == 1 and nab["windows"] == 2
    for figure in ("anomaly_score", "messages", "alerts", "incident_openings"):
        for profile in PROFILES:
            assert math.isfinite(nab[figure][profile]["score"])
    assert nab["alerts"]["standard"]["threshold"] == 1.0
    # Level shifts of 50 noise sigmas are found: the optimised figure detects both windows.
    assert nab["anomaly_score"]["standard"]["detected_windows"] == 2
    assert nab["anomaly_score"]["standard"]["score"] > 50
    assert report["metrics"]["segments"] == 2
    # Each incident opening is one of the published rows.
    openings = nab["incident_openings"]["standard"]
    assert 1 <= openings["tp"] + openings["fp"] <= nab["alerts"]["standard"]["tp"] + nab["alerts"]["standard"]["fp"]
    # Each open or update message is one notification, at one of the over-threshold rows it reports.
    messages = nab["messages"]["standard"]
    assert 1 <= messages["tp"] + messages["fp"] <= nab["alerts"]["standard"]["tp"] + nab["alerts"]["standard"]["fp"]


def test_evaluate_takes_nab_windows_instead_of_a_label_column(univariate_model, capsys):
    rows = series_rows(1400, seed=11, anomalies=[(700, 730), (1100, 1120)])
    data_dir = univariate_model / "nabdata" / "realTest"
    data_dir.mkdir(parents=True)
    write_series(data_dir / "series_a.csv", rows, with_label=False)
    windows = {"realTest/series_a.csv": [[rows[700][0] + ".000000", rows[730][0] + ".000000"],
                                         [rows[1100][0] + ".000000", rows[1120][0] + ".000000"]]}
    (univariate_model / "windows.json").write_text(json.dumps(windows))
    out = univariate_model / "nab.json"
    rc = trainer_main(["evaluate", "--model-dir", str(univariate_model / "model"),
                       "--csv", str(data_dir / "series_a.csv"),
                       "--nab-windows", str(univariate_model / "windows.json"), "--json", str(out), "--threads", "1"])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["nab"]["windows"] == 2
    assert report["metrics"]["anomalous_events"] == 31 + 21  # window rows labelled for the point metrics
    labelled = json.loads((univariate_model / "report.json").read_text())
    assert report["nab"]["anomaly_score"]["standard"]["score"] == pytest.approx(
        labelled["nab"]["anomaly_score"]["standard"]["score"])


def test_evaluate_refuses_a_key_missing_from_the_nab_windows(univariate_model, capsys):
    (univariate_model / "other.json").write_text(json.dumps({"realTest/unrelated.csv": []}))
    rc = trainer_main(["evaluate", "--model-dir", str(univariate_model / "model"), "--csv",
                       str(univariate_model / "series.csv"), "--nab-windows", str(univariate_model / "other.json")])
    assert rc == 2 and "no series" in capsys.readouterr().err


def _replay(keys, severity, published, labels) -> Replay:
    n = len(keys)
    return Replay(list(keys), np.arange(n, dtype=float), np.asarray(labels), np.asarray(severity, float),
                  np.ones(n), np.asarray(severity) > 1, np.ones(n, bool), severity=np.asarray(severity, float),
                  published=np.asarray(published, bool))


def test_nab_evaluation_scores_each_key_as_one_series_and_the_published_alerts_as_they_stand():
    n = 200
    keys = ["a"] * n + ["b"] * n
    labels = np.zeros(2 * n, int)
    labels[100:110] = 1  # key a: one window, rows 100..109
    severity = np.full(2 * n, 0.2)
    severity[100] = 5.0  # key a: a sharp detection at the window's first row
    published = np.zeros(2 * n, bool)
    published[[100, 101]] = True  # the incident's open message listed the window's first two rows
    published[n + 150] = True  # key b (no window): one false alarm
    result = _replay(keys, severity, published, labels)
    nab = nab_evaluation(result, window_ids_from_labels(keys, labels))
    assert nab["series"] == 2 and nab["windows"] == 1
    # Optimised: the threshold lands on severity 5, the perfect detection: 100.
    assert nab["anomaly_score"]["standard"]["score"] == pytest.approx(100.0)
    assert nab["anomaly_score"]["standard"]["per_series"]["a"] == pytest.approx(100.0)
    # As published: the window's first row (1.0) and one lone false positive (-0.11).
    raw = nab["alerts"]["standard"]["raw"]
    assert raw == pytest.approx(1.0 - 0.11)
    assert nab["alerts"]["standard"]["score"] == pytest.approx(100 * (raw + 1) / 2)
    assert nab["alerts"]["standard"]["per_series"]["b"] == pytest.approx(-0.11)


def test_alert_messages_count_once_each_where_every_listed_event_counts_as_a_false_alarm_outside_windows():
    """A long incident outside any window: its open and update messages are two notifications (two
    false alarms), while its event_ids list twenty over-threshold windows (twenty false alarms)."""
    n = 300
    keys = ["a"] * n
    labels = np.zeros(n, int)
    labels[100:110] = 1
    severity = np.full(n, 0.2)
    severity[200:220] = 3.0
    published = np.zeros(n, bool)
    published[200:220] = True  # every over-threshold window of the incident, listed across its messages
    notified = np.zeros(n, bool)
    notified[[201, 217]] = True  # the open (at its second window) and one update
    result = Replay(list(keys), np.arange(n, dtype=float), labels, severity, np.ones(n), severity > 1,
                    np.ones(n, bool), severity=severity, published=published, notified=notified)
    nab = nab_evaluation(result, window_ids_from_labels(keys, labels))
    assert nab["messages"]["standard"]["fp"] == 2 and nab["alerts"]["standard"]["fp"] == 20
    assert nab["messages"]["standard"]["raw"] == pytest.approx(-1.0 - 2 * 0.11)  # the window missed, two alarms
    assert nab["messages"]["standard"]["raw"] > nab["alerts"]["standard"]["raw"]


def test_window_ids_follow_each_keys_own_segments_and_nab_limits():
    keys = ["a", "b", "a", "b", "a", "b", "a"]
    labels = [1, 1, 1, 0, 0, 1, 1]
    assert window_ids_from_labels(keys, labels).tolist() == [0, 1, 0, -1, -1, 2, 3]
    times = np.array([0.0, 0.0, 60.0, 60.0, 120.0, 120.0, 180.0])
    ids, matched = window_ids_from_nab(keys, times, {"cat/a.csv": [["1970-01-01 00:01:00", "1970-01-01 00:02:00"]],
                                                     "cat/b.csv": []})
    assert matched == {"a": "cat/a.csv", "b": "cat/b.csv"}
    assert ids.tolist() == [-1, -1, 0, -1, 0, -1, -1]


def test_events_with_one_numeric_field_are_served_by_the_univariate_model(univariate_model):
    """The worker's path from message bytes: decode, window, score, judge, with the model's only channel."""
    import orjson

    from stream_detector.detector import Detector, RawRecord
    from stream_detector.scoring import ModelRunner

    artifact = load_artifact(univariate_model / "model")
    runner = ModelRunner(artifact, device="cpu")
    rows = series_rows(120, seed=12, anomalies=[(100, 119)])
    t0 = 1_767_225_600.0
    records = [RawRecord(orjson.dumps({"key": "meter-1", "event_id": f"m-{i}", "timestamp": t0 + 300 * i,
                                       "fields": {"value": v}}), partition=0, offset=i)
               for i, (_, v, _) in enumerate(rows)]
    records.append(RawRecord(orjson.dumps({"key": "meter-1", "event_id": "bad", "timestamp": t0,
                                           "fields": {"other": 1.0}}), partition=0, offset=len(rows)))
    detector = Detector(artifact, runner.score, clock=lambda: t0 + 300 * len(rows))
    decisions, batch = detector.process(records)
    assert len(decisions) == len(rows) - (artifact.window - 1)
    assert detector.stats.invalid["missing_field"] == 1  # a message without the channel is refused, not scored
    over = [d for d in decisions if d.over]
    assert over and all(int(d.event.event_id.split("-")[1]) >= 100 for d in over)


def test_evaluate_explains_an_unreadable_or_ambiguous_nab_windows_file(univariate_model, capsys):
    (univariate_model / "ambiguous.json").write_text(json.dumps({"a/series.csv": [], "b/series.csv": []}))
    (univariate_model / "broken.json").write_text("[1, 2]")
    for name, message in (("ambiguous.json", "matches several NAB series"), ("broken.json", "maps series names"),
                          ("absent.json", "No such file")):
        rc = trainer_main(["evaluate", "--model-dir", str(univariate_model / "model"), "--csv",
                           str(univariate_model / "series.csv"), "--nab-windows", str(univariate_model / name)])
        assert rc == 2 and message in capsys.readouterr().err
