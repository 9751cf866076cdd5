"""Detection-quality metrics, pure numpy (the evaluator, the baselines and the benchmark share them).

Conventions, for one evaluated stream of events (all keys together, each key in time order):

- ``labels``: 1 = anomalous event (ground truth), 0 = normal.
- ``alerted``: the detector raised an alert for the event. Events that were not scored (their
  key's window was not full yet) count as not alerted.
- ``scores``: the anomaly score, NaN for events that were not scored. Threshold-free metrics
  (average precision, ROC-AUC) are computed over scored events only.

Point metrics count events: precision, recall, F1, false-alarm rate FAR = FP / (FP + TN) and
missed-alarm rate MAR = FN / (FN + TP). Event-wise metrics count *segments*: maximal runs of
consecutive anomalous events of one key. A segment is detected when at least one of its events is
alerted; its detection delay is the number of events from the segment's first event to the first
alerted one (0 = alerted on the first anomalous event).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Step-wise area under the precision-recall curve (scikit-learn's definition); NaN without positives."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    if y.sum() == 0:
        return math.nan
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[s[1:] != s[:-1], True]  # ties: one operating point per distinct score
    tp = np.cumsum(y)[last]
    fp = np.cumsum(~y)[last]
    precision = tp / (tp + fp)
    recall = tp / y.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Probability that an anomaly outscores a normal event (ties count half); NaN with one class only."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(len(s), dtype=np.float64)
    # Average ranks over ties.
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def precision_recall_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, threshold) per distinct score, from the highest score down."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[s[1:] != s[:-1], True]
    tp = np.cumsum(y)[last]
    fp = np.cumsum(~y)[last]
    return tp / np.maximum(tp + fp, 1), tp / max(int(y.sum()), 1), s[last]


def segments(labels: np.ndarray, keys: Sequence[str]) -> list[tuple[str, np.ndarray]]:
    """Maximal runs of consecutive anomalous events of one key: (key, indices into the stream)."""
    labels = np.asarray(labels).astype(bool)
    by_key: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        by_key.setdefault(key, []).append(i)
    out: list[tuple[str, np.ndarray]] = []
    for key, idx in by_key.items():
        idx_arr = np.asarray(idx)
        lab = labels[idx_arr]
        run: list[int] = []
        for i, flag in zip(idx_arr, lab):
            if flag:
                run.append(int(i))
            elif run:
                out.append((key, np.asarray(run)))
                run = []
        if run:
            out.append((key, np.asarray(run)))
    return out


def detection_metrics(labels: np.ndarray, alerted: np.ndarray, scores: np.ndarray | None = None,
                      keys: Sequence[str] | None = None) -> dict[str, Any]:
    """Every metric of the evaluator for one stream; see the module docstring for the definitions."""
    y = np.asarray(labels).astype(bool)
    a = np.asarray(alerted).astype(bool)
    if y.shape != a.shape:
        raise ValueError("labels and alerted must have the same shape")
    tp = int((y & a).sum())
    fp = int((~y & a).sum())
    tn = int((~y & ~a).sum())
    fn = int((y & ~a).sum())
    precision = tp / (tp + fp) if tp + fp else math.nan
    recall = tp / (tp + fn) if tp + fn else math.nan
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan
    out: dict[str, Any] = {
        "events": int(len(y)), "anomalous_events": int(y.sum()),
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "precision": precision, "recall": recall, "f1": f1,
        "far": fp / (fp + tn) if fp + tn else math.nan,
        "mar": fn / (fn + tp) if fn + tp else math.nan,
    }
    if scores is not None:
        s = np.asarray(scores, dtype=np.float64)
        scored = np.isfinite(s)
        out["scored_events"] = int(scored.sum())
        out["unscored_events"] = int((~scored).sum())
        out["average_precision"] = average_precision(y[scored], s[scored])
        out["roc_auc"] = roc_auc(y[scored], s[scored])
    if keys is not None:
        segs = segments(y, keys)
        delays = []
        for _, idx in segs:
            hits = np.flatnonzero(a[idx])
            if len(hits):
                delays.append(int(hits[0]))
        out["segments"] = len(segs)
        out["segments_detected"] = len(delays)
        out["event_recall"] = len(delays) / len(segs) if segs else math.nan
        out["mean_detection_delay"] = float(np.mean(delays)) if delays else math.nan
        out["median_detection_delay"] = float(np.median(delays)) if delays else math.nan
    return out


def precision_at_k_per_day(labels: np.ndarray, scores: np.ndarray, entities: Sequence[str],
                           days: Sequence[Any], k: int = 100) -> float:
    """Card precision@k (the fraud handbook's): per day, rank entities (cards, customers) by their
    highest score that day, take the top ``k`` and count the share that had a fraud that day;
    averaged over days. Unscored events (NaN) are ignored."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    per_day: dict[Any, dict[str, tuple[float, bool]]] = {}
    for i in np.flatnonzero(np.isfinite(s)):
        day = per_day.setdefault(days[i], {})
        best, fraud = day.get(entities[i], (-math.inf, False))
        day[entities[i]] = (max(best, s[i]), fraud or bool(y[i]))
    values = []
    for day in per_day.values():
        ranked = sorted(day.values(), key=lambda item: -item[0])[:k]
        values.append(sum(f for _, f in ranked) / k)
    return float(np.mean(values)) if values else math.nan
