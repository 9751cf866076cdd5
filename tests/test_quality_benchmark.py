"""benchmarks/quality.py's transactions protocol pieces, on generated transactions."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np

from stream_detector.events import Event
from stream_detector.profiles import TransactionProfile
from trainer.fit import windows_from_events

ROOT = Path(__file__).resolve().parent.parent
DAY = 86_400.0


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("quality_benchmark", ROOT / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _transactions(days: int = 4, customers: int = 3, per_day: int = 3, seed: int = 1) -> list[Event]:
    rng = np.random.default_rng(seed)
    events = []
    for c in range(customers):
        for d in range(days):
            for j in range(per_day):
                t = d * DAY + (j + 1) * DAY / (per_day + 1) + c * 60.0
                events.append(Event(f"c{c}", f"c{c}-{d}-{j}", t, (float(rng.uniform(5, 80)), f"T{rng.integers(5)}")))
    return sorted(events, key=lambda e: e.timestamp)


def test_training_windows_end_in_the_training_dates_and_are_warm_from_the_days_before():
    quality = _load_benchmark()
    events = _transactions()
    labels = [0] * len(events)
    profile = TransactionProfile(robust_features=True)
    window, start, end = 4, 2 * DAY, 3 * DAY
    warm = quality.training_window_set(events, labels, profile, window, start, end, warmup_s=2 * DAY)
    cold = quality.training_window_set(events, labels, profile, window, start, end, warmup_s=0.0)
    stamps = np.array([e.timestamp for e in events])
    assert np.all((stamps[warm.event_index] >= start) & (stamps[warm.event_index] < end))
    in_dates = int(((stamps >= start) & (stamps < end)).sum())
    # Warm: every event of the training dates completes a window (3 a day per key, window 4); cold:
    # a key's first 3 events there only fill its window.
    assert len(warm.windows) == in_dates
    assert len(cold.windows) == 0
    # The warm windows are those of a replay from the start of the data, at the same events.
    full = windows_from_events(events, profile, window, labels)
    same = np.isin(full.event_index, warm.event_index)
    np.testing.assert_array_equal(full.windows[same], warm.windows)


def test_training_windows_keep_their_labels_and_contamination_from_the_warm_up():
    quality = _load_benchmark()
    events = _transactions()
    stamps = np.array([e.timestamp for e in events])
    first_in_dates = int(np.searchsorted(stamps, 2 * DAY))
    labels = [0] * len(events)
    labels[first_in_dates - 1] = 1  # a fraud the day before the training dates
    labels[first_in_dates + 4] = 1
    ws = quality.training_window_set(events, labels, TransactionProfile(), 4, 2 * DAY, 3 * DAY, warmup_s=2 * DAY)
    assert int(ws.label.sum()) == 1 and ws.event_index[ws.label == 1][0] == first_in_dates + 4
    key = events[first_in_dates - 1].key
    own = [i for i, e_i in enumerate(ws.event_index) if events[e_i].key == key]
    assert ws.contaminated[own[0]]  # its window still holds the earlier fraud


def test_handbook_summary_gives_each_splits_figures_and_their_median():
    quality = _load_benchmark()

    def row(name, kind, ap, auc, p100):
        return {"name": name, "kind": kind, "average_precision": ap, "roc_auc": auc, "card_precision_at_100": p100}

    splits = [{"rows": [row("lstm_ae", "lstm_ae", 0.2, 0.7, 0.1), row("clf", "lstm_classifier", 0.6, 0.9, 0.3)]},
              {"rows": [row("clf", "lstm_classifier", 0.8, 0.8, 0.5), row("lstm_ae", "lstm_ae", 0.3, 0.9, None)]}]
    summary = quality.handbook_summary(splits)
    assert [r["name"] for r in summary] == ["lstm_ae", "clf"]
    ae, clf = summary
    assert ae["average_precision"] == [0.2, 0.3] and math.isclose(ae["average_precision_median"], 0.25)
    assert math.isclose(clf["roc_auc_median"], 0.85)
    assert math.isnan(ae["card_precision_at_100_median"])  # a split without the figure: no median


def test_the_handbook_report_shows_each_split_the_median_and_the_published_figures():
    quality = _load_benchmark()

    def row(name, kind, ap, auc):
        return {"name": name, "kind": kind, "average_precision": ap, "roc_auc": auc, "card_precision_at_100": 0.2,
                "f1": 0.5, "far": 0.01, "recall_scenario_1": 0.5, "recall_scenario_2": 0.5, "recall_scenario_3": 0.5,
                "train_seconds": 1.0}

    def split(train, test, ap):
        return {"rows": [row("lstm_ae + terminal risk", "lstm_ae", ap, 0.85),
                         row("lstm_classifier + terminal risk", "lstm_classifier", ap + 0.5, 0.9)],
                "feedback": {},
                "data": {"train": train, "gap": [train[1], test[0]], "test": test, "warmup_days": 35,
                         "test_events": 1000, "test_frauds": 10, "test_frauds_by_scenario": {"1": 1, "2": 6, "3": 3},
                         "profile": {"name": "transactions", "robust_features": True}}}

    hb = {"splits": [split(["2018-05-21", "2018-05-28"], ["2018-06-04", "2018-06-11"], 0.2),
                     split(["2018-06-04", "2018-06-11"], ["2018-06-18", "2018-06-25"], 0.4)]}
    hb["summary"] = quality.handbook_summary(hb["splits"])
    meta = {"command": "python benchmarks/quality.py --tx-protocol handbook", "commit": "abc", "finished_at": "now",
            "seconds": 60.0, "machine": {"cpu": "cpu", "cores": 2, "platform": "linux", "python": "3.11",
                                         "torch": "2", "torch_threads": 1}, "notes": []}
    text = quality.report({"transactions_handbook": hb}, meta)
    assert "| lstm_ae + terminal risk | 0.200 / 0.400 / **0.300** |" in text
    assert "Target unsupervised AP >= 0.25 (median): best lstm_ae + terminal risk 0.300 -> **met**." in text
    assert "Target unsupervised ROC-AUC >= 0.836 (the handbook autoencoder's; median): best lstm_ae + terminal " \
           "risk 0.850 -> **met**." in text
    assert "Target supervised AP >= 0.7 (median): best lstm_classifier + terminal risk 0.800 -> **met**." in text
    assert "| *Autoencoder (handbook, unsupervised)* | 0.180 | 0.836 | 0.217 |" in text
    assert "### Split 1" in text and "### Split 2" in text and "at commit `abc`" in text
