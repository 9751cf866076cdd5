"""Replay evaluator: labelled events -> the worker's own detector -> detection-quality metrics.

Events are replayed in timestamp order through :class:`stream_detector.detector.Detector`, the
object the worker wraps with Kafka I/O: the same per-key windows and profile features, the same
model runner (scaling, micro-batches) and the Detector's own threshold policy (whatever the
Detector builds from the artifact: per-key tail calibration, per-key adaptive thresholds or a global
threshold), so what is
measured offline is what runs online. An event counts as *alerted* when the Detector's threshold
policy judged its window over its key's threshold (``Decision.over``; whether the alert lifecycle
published a new message for it or folded it into an open incident does not matter here).

With windows of labelled anomalies (contiguous labelled segments of a key, or a NAB windows file),
:func:`nab_evaluation` adds the NAB scores (:mod:`trainer.nab`), each key's evaluated events as one
NAB series.

Events of a key before its window is full are not scored: they count as not alerted in the point
metrics and are left out of the threshold-free ones (average precision, ROC-AUC); the report says
how many there were. Events can also be replayed only to warm windows and per-key state up without
being evaluated: each key's first ``warmup_rows_per_key`` events (SKAB: the 400-row training part)
and events before ``eval_from`` / from ``eval_until`` on.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from stream_detector.artifacts import ModelArtifact, load_artifact
from stream_detector.detector import Detector
from stream_detector.events import Event
from stream_detector.scoring import ModelRunner, Scores
from stream_detector.thresholds import ThresholdPolicy

from .metrics import detection_metrics, precision_recall_curve
from .nab import PROBATION_PERCENT, PROFILES, Series, nab_scores, normalise, severity_to_anomaly_score


@dataclass
class Replay:
    """Per input event (in input order): what the detector made of it."""

    keys: list[str]
    timestamps: np.ndarray
    labels: np.ndarray  # int 0/1
    scores: np.ndarray  # float64, NaN when not scored (window not full)
    thresholds: np.ndarray  # the policy's threshold for the event's key after it, NaN when not scored
    alerted: np.ndarray  # bool
    evaluated: np.ndarray  # bool: counted in the metrics
    model: dict[str, Any] = field(default_factory=dict)
    warming_up: int = 0
    severity: np.ndarray | None = None  # score / the key's threshold, NaN when not scored
    published: np.ndarray | None = None  # bool: listed in the event_ids of an alert message the replay produced
    opened: np.ndarray | None = None  # bool: the first over-threshold window of an incident that was opened
    # bool: the row (the message's event_id, its newest over-threshold window) at which an open or update
    # message was published: one notification per message, when it went out
    notified: np.ndarray | None = None

    def subset(self, mask: np.ndarray) -> "Replay":
        idx = np.flatnonzero(mask)
        return Replay([self.keys[i] for i in idx], self.timestamps[idx], self.labels[idx], self.scores[idx],
                      self.thresholds[idx], self.alerted[idx], self.evaluated[idx], self.model,
                      int((~np.isfinite(self.scores[idx])).sum()),
                      None if self.severity is None else self.severity[idx],
                      None if self.published is None else self.published[idx],
                      None if self.opened is None else self.opened[idx],
                      None if self.notified is None else self.notified[idx])


def replay(artifact: ModelArtifact | str | os.PathLike[str], events: Sequence[Event], labels: Sequence[int],
           batch_events: int = 1024, device: str = "cpu", max_keys: int = 100_000,
           threshold: ThresholdPolicy | None = None,
           scorer: Callable[[np.ndarray], Scores] | None = None) -> Replay:
    """Replays events (already in timestamp order) through a Detector, in micro-batches.

    ``threshold``: a policy to use instead of the one the Detector builds from the artifact (the
    worker's default). ``scorer``: the model call (windows -> scores) instead of a fresh
    :class:`ModelRunner`, so that a benchmark replaying one series under many policies can reuse
    the model's scores."""
    if not isinstance(artifact, ModelArtifact):
        artifact = load_artifact(artifact)
    if scorer is None:
        scorer = ModelRunner(artifact, device=device, max_batch=batch_events).score
    now = [events[0].timestamp if events else 0.0]
    detector = Detector(artifact, scorer, threshold=threshold, max_keys=max_keys, max_batch=batch_events,
                        clock=lambda: now[0])
    n = len(events)
    scores = np.full(n, np.nan)
    thresholds = np.full(n, np.nan)
    alerted = np.zeros(n, dtype=bool)
    ratio = np.full(n, np.nan)
    row_of_id = {(e.key, str(e.event_id)): i for i, e in enumerate(events)}
    reported: set[int] = set()
    openings: set[int] = set()
    notifications: set[int] = set()

    def note(message: dict[str, Any] | None) -> None:
        if message is not None:
            for event_id in message.get("event_ids", ()):
                row = row_of_id.get((message["key"], str(event_id)))
                if row is not None:
                    reported.add(row)
            if message.get("state") == "open":
                row = row_of_id.get((message["key"], str(message.get("incident", {}).get("first_event_id"))))
                if row is not None:
                    openings.add(row)
            if message.get("state") in ("open", "update"):
                row = row_of_id.get((message["key"], str(message.get("event_id"))))
                if row is not None:
                    notifications.add(row)

    for start in range(0, n, batch_events):
        chunk = events[start:start + batch_events]
        position = {id(e): start + j for j, e in enumerate(chunk)}
        now[0] = chunk[-1].timestamp  # the replay's wall clock is event time
        batch = detector.prepare_events(chunk)
        decisions = detector.finish(batch, detector.score(batch))
        for d in decisions:
            i = position[id(d.event)]
            scores[i] = d.score
            thresholds[i] = d.threshold
            alerted[i] = bool(getattr(d, "over", d.alert is not None))
            ratio[i] = d.severity if getattr(d, "severity", None) is not None else (
                d.score / d.threshold if d.threshold > 0 else np.nan)
            note(d.alert)
        for message in detector.drain_closed():
            note(message)
    model = {"kind": artifact.kind, "version": artifact.version, "path": str(artifact.path),
             "window": artifact.window, "features": list(artifact.feature_names),
             "threshold": artifact.metadata.get("threshold", {}),
             "threshold_policy": type(detector.threshold).__name__}
    published = np.zeros(n, dtype=bool)
    published[list(reported)] = True
    opened = np.zeros(n, dtype=bool)
    opened[list(openings)] = True
    notified = np.zeros(n, dtype=bool)
    notified[list(notifications)] = True
    return Replay([e.key for e in events], np.array([e.timestamp for e in events]), np.asarray(labels, np.int64),
                  scores, thresholds, alerted, np.ones(n, bool), model, detector.stats.warming_up, ratio, published,
                  opened, notified)


def evaluation_mask(events: Sequence[Event], warmup_rows_per_key: int = 0, eval_from: float | None = None,
                    eval_until: float | None = None) -> np.ndarray:
    """Which events count in the metrics (the others only warm windows and state up)."""
    mask = np.ones(len(events), dtype=bool)
    if warmup_rows_per_key:
        seen: dict[str, int] = {}
        for i, e in enumerate(events):
            n = seen.get(e.key, 0)
            seen[e.key] = n + 1
            if n < warmup_rows_per_key:
                mask[i] = False
    if eval_from is not None or eval_until is not None:
        ts = np.array([e.timestamp for e in events])
        if eval_from is not None:
            mask &= ts >= eval_from
        if eval_until is not None:
            mask &= ts < eval_until
    return mask


def evaluate(result: Replay) -> dict[str, Any]:
    """Metrics over the evaluated events (see :mod:`trainer.metrics`)."""
    ev = result.evaluated
    keys = [k for k, e in zip(result.keys, ev) if e]
    metrics = detection_metrics(result.labels[ev], result.alerted[ev], result.scores[ev], keys)
    metrics["keys"] = len(set(keys))
    metrics["warming_up_events"] = int((~np.isfinite(result.scores[ev])).sum())
    metrics["replayed_events"] = int(len(result.labels))
    return metrics


def window_ids_from_labels(keys: Sequence[str], labels: Sequence[int]) -> np.ndarray:
    """Per event, the number of its key's contiguous labelled segment (NAB's anomaly window), or -1."""
    y = np.asarray(labels).astype(bool)
    ids = np.full(len(y), -1, dtype=np.int64)
    last_row: dict[str, int] = {}
    current: dict[str, int] = {}
    count = 0
    for i, key in enumerate(keys):
        if y[i]:
            previous = last_row.get(key)
            if previous is None or not y[previous]:
                current[key] = count
                count += 1
            ids[i] = current[key]
        last_row[key] = i
    return ids


def window_ids_from_nab(keys: Sequence[str], timestamps: np.ndarray, windows: dict[str, list[list[str]]]
                        ) -> tuple[np.ndarray, dict[str, str]]:
    """Per event, the number of the NAB window (``labels/combined_windows.json`` format) it falls in, or -1.

    A key takes the windows of the entry whose path without extension is the key or ends with
    ``/key`` (``realKnownCause/nyc_taxi.csv`` for key ``nyc_taxi``). Window limits are
    inclusive timestamps (UTC when no zone is given). Returns the ids and the entry each key matched."""
    from stream_detector.events import parse_timestamp

    entries = {}
    for name in windows:
        folder, _, file_name = name.rpartition("/")
        entries[(folder + "/" if folder else "") + file_name.split(".")[0]] = name
    ids = np.full(len(keys), -1, dtype=np.int64)
    key_arr = np.asarray(keys, dtype=object)
    matched: dict[str, str] = {}
    count = 0
    for key in dict.fromkeys(keys):
        hits = [name for s, name in entries.items() if s == key or s.endswith("/" + key)]
        if len(hits) > 1:
            raise ValueError(f"key {key!r} matches several NAB series: {', '.join(hits)}")
        if not hits:
            continue
        matched[key] = hits[0]
        rows = np.flatnonzero(key_arr == key)
        t = timestamps[rows]
        for start, end in windows[hits[0]]:
            lo, hi = parse_timestamp(str(start)), parse_timestamp(str(end))
            if lo is None or hi is None:
                raise ValueError(f"{hits[0]}: unreadable window limits {start!r}, {end!r}")
            ids[rows[(t >= lo - 1e-6) & (t <= hi + 1e-6)]] = count
            count += 1
    return ids, matched


def nab_evaluation(result: Replay, window_ids: np.ndarray, probation_percent: float = PROBATION_PERCENT
                   ) -> dict[str, Any]:
    """NAB scores of a replay, each key's evaluated events as one NAB series (:mod:`trainer.nab`).

    Four figures per profile: ``anomaly_score``, NAB's usual one, with the threshold optimised over
    the keys on the detector's severity mapped into [0, 1] (:func:`trainer.nab.severity_to_anomaly_score`);
    ``messages``, the alert messages as published (a detection on the event each ``open`` or
    ``update`` message went out with: what a subscriber is notified of), scored as they stand;
    ``alerts``, every event an alert message listed in its ``event_ids`` (each over-threshold window
    outside a NAB window is one more false alarm); and ``incident_openings``, a detection on the first
    over-threshold event of each incident that was opened only (what a pager would show). Per key,
    its share at the chosen threshold, normalised against its own windows (keys without a window: the raw cost of its false alarms)."""
    ev = result.evaluated
    key_arr = np.asarray(result.keys, dtype=object)
    severity = result.severity if result.severity is not None else np.where(
        result.thresholds > 0, result.scores / result.thresholds, np.nan)
    published = result.published if result.published is not None else np.zeros(len(key_arr), bool)
    opened = result.opened if result.opened is not None else np.zeros(len(key_arr), bool)
    notified = result.notified if result.notified is not None else np.zeros(len(key_arr), bool)
    continuous, fixed, openings, messages = [], [], [], []
    for key in dict.fromkeys(key_arr[ev]):
        rows = np.flatnonzero(ev & (key_arr == key))
        ids = window_ids[rows]
        windows = []
        for i in np.flatnonzero(ids >= 0):
            if windows and ids[i] == ids[windows[-1][1]] and windows[-1][1] == i - 1:
                windows[-1] = (windows[-1][0], int(i))
            else:
                windows.append((int(i), int(i)))
        continuous.append(Series(str(key), severity_to_anomaly_score(severity[rows]), windows))
        fixed.append(Series(str(key), published[rows].astype(np.float64), windows))
        openings.append(Series(str(key), opened[rows].astype(np.float64), windows))
        messages.append(Series(str(key), notified[rows].astype(np.float64), windows))
    out: dict[str, Any] = {"probation_percent": probation_percent, "series": len(continuous),
                           "windows": sum(len(s.windows) for s in continuous)}
    if not continuous:
        return out
    for name, series, threshold in (("anomaly_score", continuous, None), ("messages", messages, 1.0),
                                    ("alerts", fixed, 1.0), ("incident_openings", openings, 1.0)):
        results = nab_scores(series, PROFILES, threshold=threshold, probation_percent=probation_percent)
        figure: dict[str, Any] = {}
        for profile, r in results.items():
            cost = PROFILES[profile]
            per_key = {}
            for s in r.per_series:
                per_key[s.name] = (normalise(s.score, -cost.fn_weight * s.windows, cost.tp_weight * s.windows)
                                   if s.windows else s.score)
            figure[profile] = {"score": r.normalised, "threshold": r.threshold, "raw": r.raw, "null": r.null,
                               "perfect": r.perfect, "per_series": per_key,
                               "tp": sum(s.tp for s in r.per_series), "fp": sum(s.fp for s in r.per_series),
                               "detected_windows": sum(s.detected_windows for s in r.per_series)}
        out[name] = figure
    return out


def format_nab(nab: dict[str, Any]) -> str:
    """The NAB part of the printed report."""
    if "anomaly_score" not in nab:
        return "  NAB: no evaluated series"
    head = (f"  NAB score (probation {nab['probation_percent']:.0%} of each key, {nab['series']} series, "
            f"{nab['windows']} windows)")
    lines = [head, f"  {'':44s}{'standard':>10s}{'low FP':>10s}{'low FN':>10s}"]
    for name, label in (("anomaly_score", "severity, threshold optimised by NAB"),
                        ("messages", "alert messages (open, update), as they stand"),
                        ("alerts", "every event in the alerts' event_ids"),
                        ("incident_openings", "incident openings, as they stand")):
        values = [nab[name][p]["score"] for p in ("standard", "reward_low_FP_rate", "reward_low_FN_rate")]
        lines.append(f"  {label:44s}" + "".join(f"{format_value(v, '{:.2f}'):>10s}" for v in values))
    return "\n".join(lines)


ROWS = (
    ("precision", "point precision", "{:.3f}"),
    ("recall", "point recall", "{:.3f}"),
    ("f1", "point F1", "{:.3f}"),
    ("far", "false-alarm rate FP/(FP+TN)", "{:.2%}"),
    ("mar", "missed-alarm rate FN/(FN+TP)", "{:.2%}"),
    ("average_precision", "average precision", "{:.3f}"),
    ("roc_auc", "ROC-AUC", "{:.3f}"),
    ("event_recall", "event-wise recall", "{:.3f}"),
    ("mean_detection_delay", "mean detection delay (events)", "{:.1f}"),
    ("segments", "anomalous segments", "{}"),
    ("segments_detected", "segments detected", "{}"),
    ("events", "evaluated events", "{}"),
    ("anomalous_events", "anomalous events", "{}"),
    ("warming_up_events", "not scored (window not full)", "{}"),
    ("tp", "TP", "{}"), ("fp", "FP", "{}"), ("tn", "TN", "{}"), ("fn", "FN", "{}"),
)


def format_value(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return fmt.format(value)


def format_table(metrics: dict[str, Any]) -> str:
    width = max(len(label) for _, label, _ in ROWS)
    return "\n".join(f"  {label:<{width}}  {format_value(metrics.get(name), fmt)}" for name, label, fmt in ROWS)


def write_json(path: str | os.PathLike[str], payload: dict[str, Any]) -> None:
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, np.generic):
            return clean(v.item())
        return v

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(clean(payload), indent=2, sort_keys=True))


def write_plots(result: Replay, directory: str | os.PathLike[str], max_keys: int = 4, keys: Sequence[str] = ()) -> list[str]:
    """Score over time per key (labels shaded, threshold and alerts marked) and the PR curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    ev = result.evaluated
    key_arr = np.asarray(result.keys, dtype=object)
    chosen = list(keys)
    if not chosen:  # the first keys with an anomaly, then any
        anomalous = [k for k in dict.fromkeys(key_arr[ev & (result.labels == 1)])]
        chosen = (anomalous + [k for k in dict.fromkeys(key_arr[ev]) if k not in anomalous])[:max_keys]
    for n, key in enumerate(chosen):
        idx = np.flatnonzero((key_arr == key) & ev)
        if len(idx) == 0:
            continue
        fig, ax = plt.subplots(figsize=(11, 3.6))
        t = np.arange(len(idx))
        lab = result.labels[idx] == 1
        ax.fill_between(t, 0, 1, where=lab, transform=ax.get_xaxis_transform(), color="tab:red", alpha=0.15,
                        step="mid", label="labelled anomaly")
        ax.plot(t, result.scores[idx], lw=0.9, color="tab:blue", label="score")
        ax.plot(t, result.thresholds[idx], lw=1.0, color="black", ls="--", label="threshold")
        hit = result.alerted[idx]
        ax.scatter(t[hit], result.scores[idx][hit], s=9, color="tab:red", zorder=3, label="alert")
        finite = result.scores[idx][np.isfinite(result.scores[idx])]
        if len(finite) and finite.min() > 0 and finite.max() / max(finite.min(), 1e-12) > 100:
            ax.set_yscale("log")
        ax.set_xlabel("event of the key (evaluated part)")
        ax.set_ylabel("anomaly score")
        ax.set_title(f"{result.model.get('kind', '')} on key {key}")
        ax.legend(loc="upper left", fontsize=8, ncol=4)
        fig.tight_layout()
        name = out / f"scores_{n:02d}_{_safe(key)}.png"
        fig.savefig(name, dpi=110)
        plt.close(fig)
        written.append(str(name))
    scored = ev & np.isfinite(result.scores)
    if result.labels[scored].sum() > 0:
        precision, recall, _ = precision_recall_curve(result.labels[scored], result.scores[scored])
        fig, ax = plt.subplots(figsize=(5.5, 5))
        ax.step(np.r_[0.0, recall], np.r_[precision[0], precision], where="post")
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_title(f"precision-recall, {result.model.get('kind', '')}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        name = out / "pr_curve.png"
        fig.savefig(name, dpi=110)
        plt.close(fig)
        written.append(str(name))
    return written


def _safe(key: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in key)[:60]
