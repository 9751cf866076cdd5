"""Alert thresholds: a global one fitted by the trainer, and per-key adaptive ones on top of it.

The trainer fits the global threshold as a high quantile of held-out normal scores and stores it in
the artifact, with the median of those scores (``reference_median``). A :class:`GlobalThreshold`
applies it to every key. An :class:`AdaptiveThreshold` gives each key its own threshold, in the
same units:

- warm-up: a key uses the global threshold until ``warmup`` of its windows scored at or below it;
- then its threshold is the global one scaled by how the key's recent normal scores compare with
  the normal scores the global threshold was fitted on::

      threshold(key) = global * clamp(level(key's last `history` normal scores) / reference_median,
                                      min_ratio, max_ratio)

  a quiet key gets a lower threshold (more sensitive), a noisy one a higher threshold (fewer false
  alarms), and a key whose normal behaviour drifts slowly is followed as it drifts;
- only clearly normal scores enter a key's history: those at or below the key's *learning
  ceiling*, the key's equivalent of the 90th percentile of the normal scores the global threshold
  was fitted on (``learn_ceiling`` in the artifact; the threshold itself when it is lower). So an
  anomaly, even one scoring under the alert threshold (a long, moderate fault against a 0.999
  quantile threshold), neither raises the threshold while it lasts nor makes it jump when it
  leaves the history (the sliding-window problem of e.g. NASA telemanom's dynamic threshold), and
  a sudden jump of the normal level is not learned either: it stays an incident until a retrained
  model. Since the history is cut at the ceiling, the key's level is read as its
  ``0.5 / learn_share`` quantile (``learn_share`` = 0.9 of normal scores lie under the ceiling),
  which is the median of the uncut scores;
- ``min_ratio``/``max_ratio`` bound how far any key can move from the global threshold.

State per key is fixed: a ring of ``history`` float32 scores plus a count and the current
threshold (``history * 4 + 12`` bytes), in preallocated arrays grown by doubling; a key's state is
dropped with its window (:meth:`AdaptiveThreshold.evict`). Decisions are vectorised over a
micro-batch and equal to deciding event by event, whatever the batching (a key appearing several
times in one batch is handled in rounds).
"""

from __future__ import annotations

import logging
import math
import struct
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from .keyrows import KeyRows, rows_and_occurrences
from .surprise import TailCalibration, TailConfig

log = logging.getLogger(__name__)


# One key's adaptive calibration in a snapshot: the global threshold it was made for, the normal
# scores absorbed, the key's threshold; then its score history (float32).
_KEY_STATE = struct.Struct("<dif")


class ThresholdPolicy(Protocol):
    value: float  # the global threshold

    def exceeds(self, keys: list[str], scores: np.ndarray) -> np.ndarray:
        """A boolean mask: which scored windows are over their key's threshold."""

    def value_for(self, key: str) -> float: ...


@dataclass
class GlobalThreshold:
    """One threshold for every key: a high quantile of held-out normal scores."""

    value: float

    def assess(self, keys: Sequence[str], scores: np.ndarray) -> np.ndarray:
        """The threshold each scored window is judged against."""
        return np.full(len(keys), self.value, dtype=np.float64)

    def exceeds(self, keys: list[str], scores: np.ndarray) -> np.ndarray:
        return scores > self.value

    def value_for(self, key: str) -> float:
        return self.value

    def evict(self, key: str) -> None:
        pass

    def restart_warmup(self, key: str) -> None:
        pass

    def share_at_bounds(self) -> float:
        return 0.0

    calibrated_keys = 0


@dataclass(frozen=True)
class ThresholdConfig:
    """How the worker (and the replay evaluator) builds its threshold policy from an artifact."""

    adaptive: bool = True
    warmup: int = 64
    history: int = 128
    min_ratio: float = 0.5
    max_ratio: float = 2.0
    override: float | None = None  # replaces the artifact's global threshold
    # Per-key tail calibration (stream_detector/surprise.py); when enabled it replaces ``adaptive``.
    tail: TailConfig = field(default_factory=TailConfig)

    @classmethod
    def from_settings(cls, settings: Any) -> "ThresholdConfig":
        tail = TailConfig(enabled=settings.tail_calibration, alert_surprise=settings.tail_alert_surprise,
                          horizon=settings.tail_horizon, warmup=settings.tail_warmup, values=settings.tail_values,
                          values_tail=settings.tail_values_tail, spike_after=settings.tail_spike_after,
                          score_tail=settings.tail_score_tail, seasonal=settings.tail_seasonal,
                          season_max=settings.tail_season_max, season_min_acf=settings.tail_season_min_acf,
                          season_max_features=settings.tail_season_max_features)
        return cls(adaptive=settings.adaptive_thresholds, warmup=settings.threshold_warmup_windows,
                   history=settings.threshold_history, min_ratio=settings.threshold_min_ratio,
                   max_ratio=settings.threshold_max_ratio, override=settings.threshold, tail=tail)

    def __post_init__(self) -> None:
        if self.history < 1 or not 1 <= self.warmup <= self.history:
            raise ValueError("threshold history must be at least 1 and warmup in [1, history]")
        if not 0 < self.min_ratio <= 1.0 <= self.max_ratio < math.inf:
            raise ValueError("threshold ratios must satisfy 0 < min_ratio <= 1 <= max_ratio < inf")


class AdaptiveThreshold(KeyRows):
    """Per-key thresholds from the key's recent normal scores (see the module docstring)."""

    def __init__(self, value: float, reference_median: float, warmup: int = 64, history: int = 128,
                 min_ratio: float = 0.5, max_ratio: float = 2.0, initial_capacity: int = 1024,
                 max_keys: int | None = None, learn_ceiling: float | None = None, learn_share: float = 0.9):
        if not (value > 0 and reference_median > 0 and math.isfinite(value) and math.isfinite(reference_median)):
            raise ValueError("adaptive thresholds need a positive global threshold and reference median")
        ThresholdConfig(warmup=warmup, history=history, min_ratio=min_ratio, max_ratio=max_ratio)  # validates
        self.value = float(value)
        self.reference_median = float(reference_median)
        if learn_ceiling is not None and not (math.isfinite(learn_ceiling) and learn_ceiling >= reference_median):
            raise ValueError("the learning ceiling must be a finite score at or above the reference median")
        if not 0.5 < learn_share <= 1.0:
            raise ValueError("learn_share must be in (0.5, 1]")
        if learn_ceiling is None or learn_ceiling >= self.value:
            # No ceiling below the threshold: the history is cut at the threshold itself (a high quantile).
            self.learn_fraction, self.level_quantile = 1.0, 0.5
        else:
            self.learn_fraction = float(learn_ceiling) / self.value  # ceiling(key) = threshold(key) * this
            self.level_quantile = 0.5 / learn_share
        self.warmup = warmup
        self.history = history
        self.min_ratio = min_ratio
        self.max_ratio = max_ratio
        self.max_keys = max_keys  # caps growth; keys beyond it still work (rows are added one block at a time)
        self._rows: dict[str, int] = {}
        self._calibrated = 0
        self._free: list[int] = []
        self._capacity = 0
        self._ring = np.zeros((0, history), dtype=np.float32)
        self._count = np.zeros(0, dtype=np.int32)  # normal scores absorbed so far
        self._threshold = np.zeros(0, dtype=np.float32)
        self._grow(max(min(initial_capacity, max_keys or initial_capacity), 1))

    # -- the policy ---------------------------------------------------------------------------

    def assess(self, keys: Sequence[str], scores: np.ndarray) -> np.ndarray:
        """The threshold each window is judged against; absorbs the windows at or below it."""
        n = len(keys)
        out = np.empty(n, dtype=np.float64)
        if n == 0:
            return out
        scores = np.asarray(scores, dtype=np.float64)
        rows, occurrence, distinct = rows_and_occurrences(keys, self._rows, self._allocate)
        # Round r holds each key's r-th window of the batch, so a key's windows go in event order.
        # Rounds shrink (a key in round r is in every earlier one): once a round is small, the rest
        # (a few hot keys) go window by window, in batch order, cheaper than many tiny numpy rounds.
        if distinct:
            sizes, order = np.array([n]), np.arange(n)
        else:
            sizes, order = np.bincount(occurrence), np.argsort(occurrence, kind="stable")
        start = 0
        for size in sizes.tolist():
            if size <= 4:
                for i in np.sort(order[start:]).tolist():
                    out[i] = self._one(int(rows[i]), float(scores[i]))
                break
            idx = order[start:start + size]
            start += size
            rr = rows[idx]
            limit = self._threshold[rr].astype(np.float64)
            out[idx] = limit
            s = scores[idx]
            normal = np.isfinite(s) & (s <= limit * self.learn_fraction)
            self._absorb(rr[normal], s[normal])
        return out

    def exceeds(self, keys: list[str], scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores) > self.assess(keys, scores)

    def value_for(self, key: str) -> float:
        row = self._rows.get(key)
        return self.value if row is None else float(self._threshold[row])

    def share_at_bounds(self) -> float:
        """Share of the calibrated keys whose threshold sits at ``min_ratio`` or ``max_ratio`` of the
        global one: keys the bounds hold back from following their scores (0 when none is calibrated).

        One pass over the preallocated arrays; safe to call from the metrics thread (it only reads).
        """
        count, threshold = self._count, self._threshold
        n = min(len(count), len(threshold))
        calibrated = count[:n] >= self.warmup
        total = int(calibrated.sum())
        if total == 0:
            return 0.0
        limits = threshold[:n][calibrated]
        low = np.float32(self.value * self.min_ratio)
        high = np.float32(self.value * self.max_ratio)
        return float(((limits <= low) | (limits >= high)).sum()) / total

    @property
    def bytes_per_key(self) -> int:
        return self.history * 4 + 4 + 4

    def export_key(self, key: str) -> bytes | None:
        """The key's calibration (for its changelog snapshot), so a restarted worker does not start
        the key's warm-up over; None for a key not seen."""
        row = self._rows.get(key)
        if row is None:
            return None
        return _KEY_STATE.pack(self.value, int(self._count[row]), float(self._threshold[row])) + self._ring[row].tobytes()

    def adopt_key(self, key: str, blob: bytes) -> bool:
        """Takes over a key's calibration from :meth:`export_key`. False (and the key starts its
        warm-up) when it was made for another global threshold (another model) or history length."""
        if len(blob) != _KEY_STATE.size + 4 * self.history:
            return False
        value, count, threshold = _KEY_STATE.unpack_from(blob)
        if value != self.value or count < 0 or not (math.isfinite(threshold) and threshold > 0):
            return False
        row = self._adopted_row(key)
        self._ring[row] = np.frombuffer(blob, dtype=np.float32, offset=_KEY_STATE.size)
        self._count[row] = count
        self._threshold[row] = threshold
        if count >= self.warmup:
            self._calibrated += 1
        return True

    # -- internals ----------------------------------------------------------------------------

    def _one(self, row: int, score: float) -> float:
        """:meth:`assess` for a single window (same result as a round of one)."""
        limit = float(self._threshold[row])
        if not score <= limit * self.learn_fraction:  # over the learning ceiling, or NaN
            return limit
        count = int(self._count[row])
        self._ring[row, count % self.history] = score
        count += 1
        self._count[row] = count
        if count == self.warmup:
            self._calibrated += 1
        if count >= self.warmup:
            filled = min(count, self.history)
            position = self.level_quantile * (filled - 1)
            lo, hi = math.floor(position), math.ceil(position)
            part = self._ring[row, :filled].copy()
            part.partition((lo, hi))
            level = float(part[lo]) + (float(part[hi]) - float(part[lo])) * (position - lo)
            ratio = level / self.reference_median
            self._threshold[row] = self.value * min(max(ratio, self.min_ratio), self.max_ratio)
        return limit

    def _absorb(self, rows: np.ndarray, scores: np.ndarray) -> None:
        if rows.size == 0:
            return
        self._ring[rows, self._count[rows] % self.history] = scores  # rows are distinct within a round
        self._count[rows] += 1
        counts = self._count[rows]
        self._calibrated += int((counts == self.warmup).sum())
        ready = rows[counts >= self.warmup]
        if ready.size:
            ratio = self._level(ready) / self.reference_median
            self._threshold[ready] = self.value * np.clip(ratio, self.min_ratio, self.max_ratio)

    def _level(self, rows: np.ndarray) -> np.ndarray:
        """Each key's ``level_quantile`` of its history (the median when nothing is cut off)."""
        ring = self._ring[rows]
        filled = np.minimum(self._count[rows], self.history).astype(np.int64)
        if int(filled.min()) < self.history:
            ring[np.arange(self.history)[None, :] >= filled[:, None]] = np.inf
        ring.sort(axis=1)
        position = self.level_quantile * (filled - 1)
        lo = np.floor(position).astype(np.int64)
        hi = np.ceil(position).astype(np.int64)
        pick = np.arange(len(rows))
        low = ring[pick, lo].astype(np.float64)
        return low + (ring[pick, hi].astype(np.float64) - low) * (position - lo)

    def _allocate(self, key: str) -> int:
        if not self._free:
            grown = self._capacity * 2
            if self.max_keys is not None and self._capacity < self.max_keys:
                grown = min(grown, self.max_keys)
            self._grow(grown)
        row = self._free.pop()
        self._count[row] = 0
        self._threshold[row] = self.value
        self._rows[key] = row
        return row

    def _grow(self, capacity: int) -> None:
        old = self._capacity
        if capacity <= old:
            return
        for name in ("_ring", "_count", "_threshold"):
            array = getattr(self, name)
            grown = np.zeros((capacity,) + array.shape[1:], dtype=array.dtype)
            grown[:old] = array
            setattr(self, name, grown)
        self._free.extend(range(capacity - 1, old - 1, -1))
        self._capacity = capacity


def reference_median(metadata: Mapping[str, Any]) -> float | None:
    """Median of the normal scores the artifact's threshold was fitted on, when it is known."""
    record = metadata.get("threshold") or {}
    value = record.get("reference_median") if isinstance(record, Mapping) else None
    if value is None:  # artifacts from before the record carried it
        quantiles = (metadata.get("training") or {}).get("val_score_quantiles") or {}
        value = quantiles.get("0.5")
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def build_threshold_policy(artifact: Any, config: ThresholdConfig | None = None,
                           max_keys: int | None = None) -> GlobalThreshold | AdaptiveThreshold | TailCalibration:
    """The policy the worker serves an artifact with; the replay evaluator gets the same one."""
    config = config or ThresholdConfig()
    value = float(config.override if config.override is not None else artifact.threshold)
    record = artifact.metadata.get("threshold") or {}
    # Per-key tail calibration reads unsupervised scores (a quantile threshold of normal ones); a
    # supervised classifier's probability keeps its fitted threshold.
    if config.tail.enabled and record.get("method", "quantile") == "quantile" and math.isfinite(value) and value > 0:
        return TailCalibration(value, artifact.profile.n_features, config.tail, max_keys=max_keys)
    if not config.adaptive:
        return GlobalThreshold(value)
    reference = reference_median(artifact.metadata)
    if record.get("method", "quantile") != "quantile" or reference is None or not value > 0:
        log.info("per-key adaptive thresholds need a quantile threshold with its reference median; "
                 "model %s is served with its global threshold", getattr(artifact, "version", "?"))
        return GlobalThreshold(value)
    ceiling = learn_ceiling(artifact.metadata, reference)
    return AdaptiveThreshold(value, reference, warmup=config.warmup, history=config.history,
                             min_ratio=config.min_ratio, max_ratio=config.max_ratio, max_keys=max_keys,
                             learn_ceiling=ceiling, learn_share=LEARN_SHARE)


LEARN_SHARE = 0.9  # the learning ceiling is this quantile of the normal scores the threshold was fitted on


def learn_ceiling(metadata: Mapping[str, Any], reference: float) -> float | None:
    """The artifact's learning ceiling (its normal scores' 0.9 quantile), when it is known."""
    record = metadata.get("threshold") or {}
    value = record.get("learn_ceiling") if isinstance(record, Mapping) else None
    if value is None:  # artifacts from before the record carried it
        value = ((metadata.get("training") or {}).get("val_score_quantiles") or {}).get(str(LEARN_SHARE))
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value >= reference else None


def fit_quantile_threshold(scores: np.ndarray, quantile: float = 0.995, margin: float = 1.0) -> dict[str, Any]:
    """The artifact's threshold record: a quantile of normal scores, optionally widened by a margin.

    ``reference_median`` (the median of the same scores) lets per-key adaptive thresholds compare
    a key's normal scores with the ones the threshold was fitted on; ``learn_ceiling`` (their 0.9
    quantile) bounds which scores a key's history learns from.
    """
    if not 0.0 < quantile < 1.0:
        raise ValueError("quantile must be in (0, 1)")
    scores = np.asarray(scores, dtype=np.float64)
    scores = scores[np.isfinite(scores)]
    if scores.size == 0:
        raise ValueError("no finite scores to fit a threshold on")
    value = float(np.quantile(scores, quantile)) * margin
    return {"method": "quantile", "quantile": quantile, "margin": margin, "value": value,
            "fitted_on": int(scores.size), "reference_median": float(np.median(scores)),
            "learn_ceiling": float(np.quantile(scores, LEARN_SHARE))}
