"""The replay evaluator: metrics on hand-made examples with known answers, the replay through the
worker's Detector, and the `trainer evaluate` command on generated CSVs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from stream_detector.artifacts import load_artifact
from stream_detector.events import Event
from stream_detector.synthetic import SENSOR_CHANNELS, generate
from stream_detector.thresholds import GlobalThreshold
from trainer.cli import main as trainer_main
from trainer.evaluate import evaluate, evaluation_mask, replay
from trainer.metrics import (
    average_precision, detection_metrics, precision_at_k_per_day, precision_recall_curve, roc_auc, segments,
)

T0 = 1_767_225_600.0


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- metrics on a hand-made stream ----------------------------------------------------------------

# Two keys interleaved. Key a (stream positions 0, 2, 4, ...) has two anomalous segments, key b one.
KEYS = ["a", "b"] * 8
#        a0 b0 a1 b1 a2 b2 a3 b3 a4 b4 a5 b5 a6 b6 a7 b7
LABELS = [0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0, 1, 0, 1, 0]
ALERTS = [0, 1, 1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0]
# a: labels 0 0 1 1 1 0 1 1 -> segments a2-a4 (alerts at a3, a4: delay 1) and a6-a7 (no alert)
# b: labels 0 1 1 1 0 0 0 0 -> segment b1-b3 (alerts at b3: delay 2)


def test_point_metrics_by_hand():
    m = detection_metrics(np.array(LABELS), np.array(ALERTS), keys=KEYS)
    # TP: positions 6, 7, 8; FP: 1, 2, 13; FN: 3, 4, 5, 12, 14; TN: the 5 others.
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (3, 3, 5, 5)
    assert m["precision"] == pytest.approx(3 / 6)
    assert m["recall"] == pytest.approx(3 / 8)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 3 + 5))
    assert m["far"] == pytest.approx(3 / 8)
    assert m["mar"] == pytest.approx(5 / 8)
    assert m["events"] == 16 and m["anomalous_events"] == 8


def test_segments_are_per_key_and_event_recall_and_delay_by_hand():
    segs = segments(np.array(LABELS), KEYS)
    assert [(k, idx.tolist()) for k, idx in segs] == [("a", [4, 6, 8]), ("a", [12, 14]), ("b", [3, 5, 7])]
    m = detection_metrics(np.array(LABELS), np.array(ALERTS), keys=KEYS)
    assert m["segments"] == 3 and m["segments_detected"] == 2
    assert m["event_recall"] == pytest.approx(2 / 3)
    assert m["mean_detection_delay"] == pytest.approx((1 + 2) / 2)  # in events of the key
    assert m["median_detection_delay"] == pytest.approx(1.5)


def test_ranking_metrics_by_hand():
    labels = np.array([1, 0, 1, 0])
    scores = np.array([0.9, 0.8, 0.7, 0.1])
    # Operating points: (P=1, R=.5), (P=.5, R=.5), (P=2/3, R=1), (P=.5, R=1).
    assert average_precision(labels, scores) == pytest.approx(1.0 * 0.5 + (2 / 3) * 0.5)
    assert roc_auc(labels, scores) == pytest.approx(3 / 4)  # pairs: 0.9>0.8, 0.9>0.1, 0.7>0.1; not 0.7>0.8
    # Ties count half for ROC-AUC and form one operating point for AP.
    tied = np.array([0.5, 0.5, 0.5, 0.5])
    assert roc_auc(labels, tied) == pytest.approx(0.5)
    assert average_precision(labels, tied) == pytest.approx(0.5)
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    np.testing.assert_allclose(precision, [1.0, 0.5, 2 / 3, 0.5])
    np.testing.assert_allclose(recall, [0.5, 0.5, 1.0, 1.0])
    assert math.isnan(average_precision(np.zeros(3), np.arange(3.0)))
    assert math.isnan(roc_auc(np.ones(3), np.arange(3.0)))


def test_ranking_metrics_agree_with_scikit_learn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for _ in range(5):
        labels = rng.random(400) < 0.2
        scores = np.round(rng.normal(size=400) + labels, 1)  # rounding makes ties
        assert average_precision(labels, scores) == pytest.approx(sklearn_metrics.average_precision_score(labels, scores))
        assert roc_auc(labels, scores) == pytest.approx(sklearn_metrics.roc_auc_score(labels, scores))


def test_unscored_events_count_as_not_alerted_and_are_left_out_of_ranking_metrics():
    labels = np.array([1, 0, 1, 0, 1])
    scores = np.array([np.nan, np.nan, 0.9, 0.1, 0.8])
    alerted = np.array([False, False, True, False, True])
    m = detection_metrics(labels, alerted, scores)
    assert m["scored_events"] == 3 and m["unscored_events"] == 2
    assert m["fn"] == 1 and m["tn"] == 2  # the unscored anomaly is missed, the unscored normal event is fine
    assert m["average_precision"] == pytest.approx(1.0) and m["roc_auc"] == pytest.approx(1.0)


def test_card_precision_at_k_per_day():
    labels = [1, 0, 0, 1, 0, 0]
    scores = [0.9, 0.8, 0.1, 0.2, 0.95, np.nan]
    cards = ["c1", "c2", "c3", "c1", "c2", "c3"]
    days = [0, 0, 0, 1, 1, 1]
    # Day 0: top 2 cards c1 (fraud), c2 -> 1/2. Day 1: c2 (0.95), c1 (0.2, fraud) -> 1/2.
    assert precision_at_k_per_day(labels, scores, cards, days, k=2) == pytest.approx(0.5)
    # Day 0 top-1: c1 -> 1; day 1 top-1: c2 -> 0.
    assert precision_at_k_per_day(labels, scores, cards, days, k=1) == pytest.approx(0.5)


def test_evaluation_mask_skips_each_keys_warmup_rows_and_bounds_time():
    events = [Event(k, f"{k}{i}", T0 + 10 * i + (k == "b"), (0.0,)) for i in range(5) for k in ("a", "b")]
    mask = evaluation_mask(events, warmup_rows_per_key=2)
    assert [e.event_id for e, m in zip(events, mask) if m] == ["a2", "b2", "a3", "b3", "a4", "b4"]
    mask = evaluation_mask(events, eval_from=T0 + 10, eval_until=T0 + 30)
    assert [e.event_id for e, m in zip(events, mask) if m] == ["a1", "b1", "a2", "b2"]


# --- replay through the Detector ------------------------------------------------------------------

def write_csv(path: Path, rows: list[dict], sep: str = ",") -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter=sep)
        writer.writeheader()
        writer.writerows(rows)


CHANNELS = SENSOR_CHANNELS[:3]


def sensor_rows(n_keys: int, per_key: int, anomaly_rate: float, seed: int) -> list[dict]:
    rows = []
    for e in generate("sensors", n_keys=n_keys, events_per_key=per_key, anomaly_rate=anomaly_rate, seed=seed):
        row = {"timestamp": e.timestamp, "device": e.key}
        row.update({c: e.fields[c] for c in CHANNELS})
        row["anomaly"] = e.label
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def sensor_model(tmp_path_factory):
    """A tiny model trained through the CLI on generated normal data."""
    root = tmp_path_factory.mktemp("eval")
    write_csv(root / "train.csv", sensor_rows(3, 200, 0.0, seed=1))
    rc = trainer_main(["train", "--profile", "sensors", "--csv", str(root / "train.csv"), "--key-column", "device",
                       "--label-column", "anomaly", "--window", "8", "--hidden", "16", "--latent", "4", "--epochs",
                       "3", "--model", "dense_ae", "--score-steps", "2", "--threshold-quantile", "0.99",
                       "--no-progress", "--threads", "1", "--device", "cpu", "--out", str(root / "model")])
    assert rc == 0
    return root


def test_replay_scores_every_event_after_its_keys_window_fills(sensor_model):
    from trainer.data import CsvSpec, load_csv

    artifact = load_artifact(sensor_model / "model")
    write_csv(sensor_model / "test.csv", sensor_rows(3, 120, 0.1, seed=2))
    data = load_csv([str(sensor_model / "test.csv")], artifact.profile,
                    CsvSpec(key_column="device", label_column="anomaly"))
    result = replay(artifact, data.events, data.labels, batch_events=37, threshold=GlobalThreshold(artifact.threshold))
    unscored = ~np.isfinite(result.scores)
    assert unscored.sum() == 3 * (artifact.window - 1) == result.warming_up
    assert not result.alerted[unscored].any()
    scored = ~unscored
    np.testing.assert_array_equal(result.alerted[scored], result.scores[scored] > artifact.threshold)
    assert np.all(result.thresholds[scored] == artifact.threshold)
    metrics = evaluate(result)
    assert metrics["warming_up_events"] == 21 and metrics["events"] == 360 and metrics["anomalous_events"] > 0
    # The batching of the replay does not change anything.
    again = replay(artifact, data.events, data.labels, batch_events=1000, threshold=GlobalThreshold(artifact.threshold))
    np.testing.assert_allclose(again.scores, result.scores, rtol=1e-5, equal_nan=True)
    # An unreachable threshold: no alert at all.
    quiet = replay(artifact, data.events, data.labels, threshold=GlobalThreshold(1e30))
    assert not quiet.alerted.any() and evaluate(quiet)["recall"] == 0.0


def test_evaluate_cli_writes_json_and_plots(sensor_model, capsys):
    write_csv(sensor_model / "labelled.csv", sensor_rows(3, 150, 0.08, seed=3))
    out = sensor_model / "report"
    rc = trainer_main(["evaluate", "--model-dir", str(sensor_model / "model"), "--csv", str(sensor_model / "labelled.csv"),
                       "--key-column", "device", "--label-column", "anomaly", "--warmup-rows-per-key", "20",
                       "--json", str(out / "metrics.json"), "--plots", str(out / "plots"), "--plot-keys", "2",
                       "--threads", "1"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "point F1" in printed and "false-alarm rate" in printed and "mean detection delay" in printed
    report = json.loads((out / "metrics.json").read_text())
    m = report["metrics"]
    for name in ("precision", "recall", "f1", "far", "mar", "average_precision", "roc_auc", "event_recall",
                 "mean_detection_delay", "warming_up_events"):
        assert name in m
    assert m["events"] == 3 * (150 - 20)
    assert m["warming_up_events"] == 0  # the 20 warm-up rows per key filled the 8-event windows
    assert m["tp"] + m["fp"] + m["tn"] + m["fn"] == m["events"]
    assert report["model"]["kind"] == "dense_ae" and report["protocol"]["warmup_rows_per_key"] == 20
    pngs = sorted(p.name for p in (out / "plots").iterdir())
    assert "pr_curve.png" in pngs and sum(p.startswith("scores_") for p in pngs) == 2
    for name in pngs:
        assert (out / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_cli_on_a_plain_timestamp_value_series_with_another_separator(tmp_path):
    rng = np.random.default_rng(0)
    n = 400
    t = np.arange(n)
    value = np.sin(t / 10.0) + rng.normal(0, 0.05, n)
    label = np.zeros(n, dtype=int)
    label[300:310] = 1
    value[300:310] += 3.0
    rows = [{"timestamp": T0 + i, "value": round(float(v), 5), "label": int(l)} for i, v, l in zip(t, value, label)]
    write_csv(tmp_path / "series.csv", rows, sep=";")
    rc = trainer_main(["train", "--profile", "sensors", "--csv", str(tmp_path / "series.csv"), "--sep", ";",
                       "--label-column", "label", "--head-rows-per-key", "250", "--window", "8", "--hidden", "8",
                       "--latent", "2", "--epochs", "2", "--model", "conv_ae", "--no-progress", "--threads", "1",
                       "--device", "cpu", "--out", str(tmp_path / "model")])
    assert rc == 0
    rc = trainer_main(["evaluate", "--model-dir", str(tmp_path / "model"), "--csv", str(tmp_path / "series.csv"),
                       "--sep", ";", "--label-column", "label", "--warmup-rows-per-key", "250",
                       "--json", str(tmp_path / "m.json"), "--threads", "1", "--global-threshold"])
    assert rc == 0
    report = json.loads((tmp_path / "m.json").read_text())
    assert report["model"]["features"] == ["value"]
    assert report["metrics"]["events"] == 150 and report["metrics"]["anomalous_events"] == 10
    assert report["metrics"]["segments"] == 1
    assert report["model"]["threshold_policy"] == "GlobalThreshold"


def test_evaluate_cli_needs_a_label_column(sensor_model, capsys):
    rc = trainer_main(["evaluate", "--model-dir", str(sensor_model / "model"), "--csv", str(sensor_model / "train.csv"),
                       "--key-column", "device"])
    assert rc == 2
    assert "--label-column" in capsys.readouterr().err


def test_train_and_evaluate_cli_on_a_transactions_csv(tmp_path):
    """The fraud data's layout (TX_* columns, customer key, ISO times): a supervised classifier with
    the robust per-key features, evaluated by replay."""
    from datetime import datetime, timezone

    rows = []
    for i, e in enumerate(generate("transactions", n_keys=30, events_per_key=60, anomaly_rate=0.08, seed=4)):
        rows.append({"TRANSACTION_ID": i,
                     "TX_DATETIME": datetime.fromtimestamp(e.timestamp, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
                     "CUSTOMER_ID": e.key, "TERMINAL_ID": e.fields["terminal_id"], "TX_AMOUNT": e.fields["amount"],
                     "TX_FRAUD": e.label})
    write_csv(tmp_path / "tx.csv", rows)
    flags = ["--csv", str(tmp_path / "tx.csv"), "--key-column", "CUSTOMER_ID", "--time-column", "TX_DATETIME",
             "--amount-column", "TX_AMOUNT", "--terminal-column", "TERMINAL_ID", "--id-column", "TRANSACTION_ID",
             "--label-column", "TX_FRAUD"]
    rc = trainer_main(["train", "--profile", "transactions", "--robust-features", *flags, "--model", "lstm_classifier",
                       "--window", "8", "--hidden", "8", "--epochs", "2", "--no-progress", "--threads", "1",
                       "--device", "cpu", "--out", str(tmp_path / "model")])
    assert rc == 0
    artifact = load_artifact(tmp_path / "model")
    assert artifact.kind == "lstm_classifier" and "amount_to_key_median" in artifact.feature_names
    assert artifact.metadata["threshold"]["method"] == "max_f1"
    rc = trainer_main(["evaluate", "--model-dir", str(tmp_path / "model"), *flags, "--json", str(tmp_path / "m.json"),
                       "--threads", "1"])
    assert rc == 0
    report = json.loads((tmp_path / "m.json").read_text())
    assert report["metrics"]["events"] == 30 * 60
    assert report["metrics"]["warming_up_events"] == 30 * 7
    assert report["model"]["threshold_policy"] == "GlobalThreshold"  # an F1 threshold is not adapted per key


def test_train_from_fits_only_windows_of_the_dates_warmed_by_the_events_before(tmp_path):
    """`trainer train --train-from/--train-until`: windows ending before the dates are not fitted,
    but their events warm each key up, so the first events of the dates already complete windows."""
    from datetime import datetime, timezone

    events = generate("transactions", n_keys=20, events_per_key=40, anomaly_rate=0.0, seed=5)
    rows = [{"TRANSACTION_ID": i,
             "TX_DATETIME": datetime.fromtimestamp(e.timestamp, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
             "CUSTOMER_ID": e.key, "TERMINAL_ID": e.fields["terminal_id"], "TX_AMOUNT": e.fields["amount"]}
            for i, e in enumerate(sorted(events, key=lambda e: e.timestamp))]
    write_csv(tmp_path / "tx.csv", rows)
    stamps = sorted(int(datetime.strptime(r["TX_DATETIME"], "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc)
                        .timestamp()) for r in rows)
    since, until = stamps[len(stamps) // 2], stamps[3 * len(stamps) // 4]
    in_dates = sum(since <= s < until for s in stamps)
    flags = ["train", "--profile", "transactions", "--csv", str(tmp_path / "tx.csv"), "--key-column", "CUSTOMER_ID",
             "--time-column", "TX_DATETIME", "--amount-column", "TX_AMOUNT", "--terminal-column", "TERMINAL_ID",
             "--id-column", "TRANSACTION_ID", "--window", "8", "--hidden", "8", "--latent", "4", "--epochs", "1",
             "--no-progress", "--threads", "1", "--device", "cpu", "--val-fraction", "0"]
    rc = trainer_main([*flags, "--train-from", str(since), "--train-until", str(until), "--out", str(tmp_path / "m")])
    assert rc == 0
    # Every event of the dates completes a window: each key has had more than 8 events by `since`.
    assert load_artifact(tmp_path / "m").metadata["training"]["train_windows"] == in_dates
    rc = trainer_main([*flags, "--out", str(tmp_path / "all")])
    assert rc == 0
    assert load_artifact(tmp_path / "all").metadata["training"]["train_windows"] == 20 * (40 - 7)
