"""NAB scoring (the Numenta Anomaly Benchmark's), ported to numpy.

A faithful port of NAB's scorer (numenta/NAB, MIT licence: ``nab/sweeper.py``, ``optimizer.py``,
``scorer.py`` and the normalisation of ``runner.py``), so that a detector's NAB score can be
computed inside the product without NAB's pinned pandas. The rules, as NAB applies them:

- Each series has labelled anomaly *windows* (inclusive start and end rows). The first rows of a
  series are its *probationary period*, ``min(floor(0.15 n), 0.15 x 5000)`` rows
  (:func:`probation_length`, NAB's ``getProbationPeriod``): detections there are not scored.
- A detection (a row whose anomaly score is at or above the threshold) inside a window is worth
  ``tp_weight x sigma(position) / sigma(-1)`` where ``sigma(p) = 2 / (1 + exp(5 p)) - 1`` is NAB's
  scaled sigmoid and ``position`` runs from -1 (the window's first row) to about 0 (its last row):
  only a window's best detection counts, so early detection is rewarded. A window without a
  detection costs ``fn_weight``.
- A detection outside every window costs ``fp_weight x sigma(distance past the previous window's
  end / (its width - 1))`` (so a detection just after a window costs less, or even counts as a late
  positive), and the full ``fp_weight`` when no window precedes it.
- The threshold is one per detector and profile, chosen over the whole corpus to maximise the
  summed score (NAB's optimizer: every distinct anomaly score is tried, the highest threshold wins
  ties). The corpus score is normalised ``100 (score - null) / (perfect - null)``: *null* is NAB's
  null detector (a constant score, optimised the same way), *perfect* is the number of windows
  times ``tp_weight``.

Profiles are NAB's ``config/profiles.json``: ``standard`` (FP 0.11), ``reward_low_FP_rate`` (FP
0.22), ``reward_low_FN_rate`` (FN 2.0).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

PROBATION_PERCENT = 0.15
NULL_SCORE = 0.5  # NAB's null detector: the same anomaly score on every row


@dataclass(frozen=True)
class CostMatrix:
    """One NAB application profile: the weight of a true positive, a false positive and a miss."""

    tp_weight: float
    fp_weight: float
    fn_weight: float


PROFILES: dict[str, CostMatrix] = {  # NAB's config/profiles.json
    "standard": CostMatrix(tp_weight=1.0, fp_weight=0.11, fn_weight=1.0),
    "reward_low_FP_rate": CostMatrix(tp_weight=1.0, fp_weight=0.22, fn_weight=1.0),
    "reward_low_FN_rate": CostMatrix(tp_weight=1.0, fp_weight=0.11, fn_weight=2.0),
}


def load_profiles(path: str | os.PathLike[str]) -> dict[str, CostMatrix]:
    """Profiles from a NAB ``profiles.json`` (``{name: {"CostMatrix": {"tpWeight": ...}}}``)."""
    with open(path) as fh:
        raw = json.load(fh)
    return {name: CostMatrix(float(p["CostMatrix"]["tpWeight"]), float(p["CostMatrix"]["fpWeight"]),
                             float(p["CostMatrix"]["fnWeight"])) for name, p in raw.items()}


def probation_length(rows: int, percent: float = PROBATION_PERCENT) -> float:
    """Rows at the start of a series whose detections are not scored (NAB's ``getProbationPeriod``).

    A float, as in NAB (``0.15 x 5000 = 750.0``); row ``i`` is probationary when ``i < length``."""
    return min(math.floor(percent * rows), percent * 5000)


def scaled_sigmoid(position: np.ndarray) -> np.ndarray:
    """NAB's ``scaledSigmoid``: ``2 sigmoid(-5 p) - 1``, and -1 beyond ``p = 3``."""
    p = np.asarray(position, dtype=np.float64)
    with np.errstate(over="ignore"):
        val = 2.0 / (1.0 + np.exp(5.0 * p)) - 1.0
    return np.where(p > 3.0, -1.0, val)


MAX_TP = float(scaled_sigmoid(np.array(-1.0)))


@dataclass
class Series:
    """One scored series: an anomaly score per row and its labelled windows as row indices.

    ``windows``: ``(first_row, last_row)`` pairs, inclusive, in time order, not overlapping."""

    name: str
    scores: np.ndarray
    windows: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.scores = np.asarray(self.scores, dtype=np.float64)
        n = len(self.scores)
        for a, b in self.windows:
            if not 0 <= a <= b < n:
                raise ValueError(f"{self.name}: window rows ({a}, {b}) outside 0..{n - 1}")

    def labels(self) -> np.ndarray:
        """1 on every row inside a window (NAB's ``label`` column)."""
        out = np.zeros(len(self.scores), dtype=np.int64)
        for a, b in self.windows:
            out[a:b + 1] = 1
        return out


def parse_times(values: Iterable[Any]) -> np.ndarray:
    """Timestamps (``YYYY-MM-DD HH:MM:SS[.ffffff]`` strings, datetimes or datetime64) as datetime64[ns]."""
    return np.array([np.datetime64(str(v).strip().replace("T", " "), "ns") if not isinstance(v, np.datetime64)
                     else v.astype("datetime64[ns]") for v in values], dtype="datetime64[ns]")


def window_rows(timestamps: Sequence[Any], windows: Sequence[Sequence[Any]], name: str = "") -> list[tuple[int, int]]:
    """NAB window limits (timestamps, as in ``labels/combined_windows.json``) -> row indices.

    As NAB, each limit must be a timestamp of the series (the first row with it is taken)."""
    times = parse_times(timestamps)
    out = []
    for start, end in windows:
        rows = []
        for limit in (start, end):
            hit = np.flatnonzero(times == parse_times([limit])[0])
            if len(hit) == 0:
                raise ValueError(f"{name}: window limit {limit} is not a timestamp of the series")
            rows.append(int(hit[0]))
        out.append((rows[0], rows[1]))
    return out


def windows_from_labels(labels: Sequence[int]) -> list[tuple[int, int]]:
    """Contiguous runs of labelled rows as windows (for a CSV with a 0/1 label per row)."""
    y = np.asarray(labels).astype(bool)
    if not y.any():
        return []
    edges = np.diff(np.r_[0, y.astype(np.int8), 0])
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1) - 1
    return [(int(a), int(b)) for a, b in zip(starts, ends)]


PROBATIONARY = -2  # window id of a row in the probationary period
OUTSIDE = -1  # window id of a scored row outside every window


def sweep(series: Series, cost: CostMatrix, probation_percent: float = PROBATION_PERCENT
          ) -> tuple[np.ndarray, np.ndarray]:
    """NAB's ``calcSweepScore``: per row, what a detection there would be worth, and its window.

    Returns ``(weighted score, window id)``; the id is the window's index in ``series.windows``,
    :data:`OUTSIDE`, or :data:`PROBATIONARY`."""
    n = len(series.scores)
    weighted = np.empty(n, dtype=np.float64)
    window_id = np.full(n, OUTSIDE, dtype=np.int64)
    idx = np.arange(n, dtype=np.float64)
    # Outside every window, before the first one: a plain false positive.
    previous_end: int | None = None
    previous_width = 0.0
    cursor = 0
    bounds = list(series.windows) + [(n, n)]
    for k, (a, b) in enumerate(bounds):
        gap = slice(cursor, min(a, n))
        if previous_end is None:
            weighted[gap] = -1.0 * cost.fp_weight
        else:
            with np.errstate(divide="ignore", invalid="ignore"):
                position = np.abs(previous_end - idx[gap]) / (previous_width - 1.0)
            weighted[gap] = scaled_sigmoid(position) * cost.fp_weight
        if a >= n:
            break
        width = float(b - a + 1)
        position = -(b - idx[a:b + 1] + 1) / width
        weighted[a:b + 1] = scaled_sigmoid(position) * cost.tp_weight / MAX_TP
        window_id[a:b + 1] = k
        previous_end, previous_width, cursor = b, width, b + 1
    probation = probation_length(n, probation_percent)
    window_id[idx < probation] = PROBATIONARY
    return weighted, window_id


@dataclass
class ThresholdScores:
    """NAB's ``calcScoreByThreshold`` rows: one per distinct anomaly score (and 1.1, no detection)."""

    threshold: np.ndarray
    score: np.ndarray
    tp: np.ndarray
    tn: np.ndarray
    fp: np.ndarray
    fn: np.ndarray

    def best(self) -> int:
        """The optimizer's choice: the highest score; the first (highest threshold) on ties."""
        return int(np.argmax(self.score))


def score_by_threshold(series: Sequence[Series], cost: CostMatrix,
                       probation_percent: float = PROBATION_PERCENT) -> ThresholdScores:
    """Every threshold's corpus score: detections are rows scoring at or above it (outside probation)."""
    scores, weighted, windows = [], [], []
    offset = 0
    for s in series:
        w, wid = sweep(s, cost, probation_percent)
        keep = wid != PROBATIONARY
        scores.append(s.scores[keep])
        weighted.append(w[keep])
        windows.append(np.where(wid[keep] >= 0, wid[keep] + offset, OUTSIDE))
        offset += len(s.windows)
    a = np.concatenate(scores) if scores else np.zeros(0)
    w = np.concatenate(weighted) if weighted else np.zeros(0)
    wid = np.concatenate(windows) if windows else np.zeros(0, np.int64)
    order = np.argsort(-a, kind="stable")
    a, w, wid = a[order], w[order], wid[order]
    scorable_windows = np.unique(wid[wid >= 0])
    best_in_window = {int(k): -cost.fn_weight for k in scorable_windows}
    window_total = -cost.fn_weight * len(scorable_windows)
    fp_total = 0.0
    tn = int((wid < 0).sum())
    fn = int((wid >= 0).sum())
    tp = fp = 0
    rows: list[tuple[float, float, int, int, int, int]] = []
    current = 1.1
    for value, weight, k in zip(a.tolist(), w.tolist(), wid.tolist()):
        if value != current:
            rows.append((current, fp_total + window_total, tp, tn, fp, fn))
            current = value
        if k >= 0:
            tp += 1
            fn -= 1
            if weight > best_in_window[k]:
                window_total += weight - best_in_window[k]
                best_in_window[k] = weight
        else:
            fp += 1
            tn -= 1
            fp_total += weight
    rows.append((current, fp_total + window_total, tp, tn, fp, fn))
    cols = list(zip(*rows))
    return ThresholdScores(np.array(cols[0]), np.array(cols[1]), *(np.array(c, dtype=np.int64) for c in cols[2:]))


@dataclass
class SeriesScore:
    """One series' share of the corpus score at a threshold (NAB's per-file scores CSV row)."""

    name: str
    score: float
    tp: int
    tn: int
    fp: int
    fn: int
    windows: int  # windows with at least one scorable row
    detected_windows: int


def score_series(series: Series, cost: CostMatrix, threshold: float,
                 probation_percent: float = PROBATION_PERCENT) -> SeriesScore:
    """A series' score when rows scoring at or above ``threshold`` are detections (NAB's scorer step)."""
    w, wid = sweep(series, cost, probation_percent)
    keep = wid != PROBATIONARY
    detected = keep & (series.scores >= threshold)
    outside = wid == OUTSIDE
    score = float(w[detected & outside].sum())
    window_ids = np.unique(wid[keep & (wid >= 0)])
    found = 0
    for k in window_ids:
        hits = detected & (wid == k)
        if hits.any():
            score += float(w[hits].max())
            found += 1
        else:
            score -= cost.fn_weight
    inside = keep & (wid >= 0)
    return SeriesScore(series.name, score, tp=int((detected & inside).sum()),
                       tn=int((keep & outside & ~detected).sum()), fp=int((detected & outside).sum()), fn=int((inside & ~detected).sum()),
                       windows=len(window_ids), detected_windows=found)


@dataclass
class ProfileResult:
    """One profile's NAB result over a corpus."""

    profile: str
    threshold: float
    raw: float
    null: float
    perfect: float
    per_series: list[SeriesScore]

    @property
    def normalised(self) -> float:
        return normalise(self.raw, self.null, self.perfect)

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "raw": self.raw, "null": self.null, "perfect": self.perfect,
                "score": self.normalised,
                "per_series": {s.name: {"score": s.score, "tp": s.tp, "fp": s.fp, "fn": s.fn, "tn": s.tn,
                                        "windows": s.windows, "detected_windows": s.detected_windows}
                               for s in self.per_series}}


def normalise(raw: float, null: float, perfect: float) -> float:
    """NAB's normalisation: the null detector scores 0, a perfect one 100."""
    return 100.0 * (raw - null) / (perfect - null) if perfect != null else math.nan


def null_score(series: Sequence[Series], cost: CostMatrix, probation_percent: float = PROBATION_PERCENT) -> float:
    """NAB's null detector (a constant anomaly score), threshold optimised as any detector's."""
    nulls = [Series(s.name, np.full(len(s.scores), NULL_SCORE), s.windows) for s in series]
    table = score_by_threshold(nulls, cost, probation_percent)
    return float(table.score[table.best()])


def nab_scores(series: Sequence[Series], profiles: Mapping[str, CostMatrix] | None = None,
               threshold: float | None = None, probation_percent: float = PROBATION_PERCENT
               ) -> dict[str, ProfileResult]:
    """NAB's optimise, score and normalise steps for one detector over a corpus, per profile.

    ``threshold=None``: NAB's threshold optimisation per profile. A number: detections are the rows
    scoring at or above it, as they stand (for a detector's own binary decisions: scores 1 and 0,
    threshold 1)."""
    profiles = PROFILES if profiles is None else profiles
    windows = sum(len(s.windows) for s in series)
    out: dict[str, ProfileResult] = {}
    for name, cost in profiles.items():
        if threshold is None:
            table = score_by_threshold(series, cost, probation_percent)
            chosen = float(table.threshold[table.best()])
        else:
            chosen = float(threshold)
        per_series = [score_series(s, cost, chosen, probation_percent) for s in series]
        raw = float(sum(p.score for p in per_series))
        out[name] = ProfileResult(name, chosen, raw, null_score(series, cost, probation_percent),
                                  windows * cost.tp_weight, per_series)
    return out


def severity_to_anomaly_score(severity: np.ndarray) -> np.ndarray:
    """A detector's severity (score / its key's threshold, >= 0) as a NAB anomaly score in [0, 1).

    ``r / (1 + r)``: monotone, so NAB's threshold optimisation sees the detector's own ranking, and
    severity 1 (the alert threshold) maps to 0.5. Unscored rows (NaN) get 0."""
    r = np.asarray(severity, dtype=np.float64)
    r = np.where(np.isfinite(r), np.maximum(r, 0.0), 0.0)
    return r / (1.0 + r)


def read_windows(path: str | os.PathLike[str]) -> dict[str, list[list[str]]]:
    """A NAB windows JSON: ``{"category/series.csv": [[start, end], ...]}``."""
    with open(path) as fh:
        raw = json.load(fh)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a NAB windows file maps series names to lists of [start, end]")
    return {str(k): [list(w) for w in v] for k, v in raw.items()}
