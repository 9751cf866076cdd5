"""Each key judged against its own normal: scores calibrated to a per-key tail probability.

A model's raw score (a reconstruction error) means different things on different keys: a noisy key's
normal error is another key's fault. :class:`TailCalibration` turns every window into a *surprise*,
``-log10`` of how unlikely the window is under the key's own recent behaviour, so one number means
the same on every key and ranks windows within and across keys (the idea of Numenta's anomaly
likelihood, which calibrates HTM's raw prediction errors per stream; Merlion calibrates every
detector's scores to a common scale the same way). Two checks (three with ``seasonal``), the
largest surprise wins:

- **the model's score** against the key's running mean and spread of its own scores (upper tail of a
  normal distribution fitted to them; with ``score_tail="empirical"`` the empirical rule below, on
  the score's upper tail);
- **the newest event's values** against the key's running mean and spread of each feature (both
  tails, Bonferroni-corrected over the features): a cheap robust statistic that sees what a model
  trained on a short warm-up may not, a level never seen before (the windowed Gaussian of NAB).

A normal tail on the running spread is too light for values that spike as part of a key's normal
life: on unit noise with a spike of 20 every hundred events, every spike keeps a surprise over 60
however often it recurs (alerting windows are learned slowly, so spikes barely widen the spread). With ``values_tail="empirical"`` (the default) the key also keeps, per feature, the running
share of its windows whose value reached each of :data:`TAIL_LEVELS` (distances from the mean in
spreads); a value is then no rarer than the share of past windows that reached its level, once at
least ``spike_after`` windows of the horizon did. A value beyond every level the key reached keeps
its normal tail, as does every far-out window after the ``spike_width``-th in a row (a shift, not a
spike), so the empirical tail forgives recurring spikes, not new levels or held ones.

With ``seasonal`` (models of at most ``season_max_features`` features), a key buffers its first
``2 * season_max + 1`` windows' values and looks for a period (the lag, after the autocorrelation
first turns negative, where it peaks, if at least ``season_min_acf``); a key with one learns each
phase's values (moved ``season_rate`` of the way per window, slower while alerting) and is also
judged by its values' distance from their phase's (both tails, against the running mean and spread
of those distances): a missing peak or a flat stretch where the key usually moves, whose values are
all ones the key has. Phases count windows (a regular cadence is assumed).

A window alerts when its surprise reaches ``alert_surprise`` (8 means a tail probability of 1e-8).
Running statistics follow each key with an exponential horizon of ``horizon`` windows (the exact mean
and variance until then), so slow drift is followed and a step change stops alerting once it is the
key's new normal. Alerting windows are learned at ``over_weight`` of the usual rate. A short run
of them (a spike, even one that recurs) is learned as it is, so spikes that are part of a key's
normal life stop alerting; once a run (ended only by a calm window, one under ``calm_share`` of the
alert level) holds more than ``sustain`` alerting windows (a fault), its updates are slowed and
winsorised (a window moves the statistics as if it were at most ``learn_clip`` spreads away), so a
long fault does not quickly become normal.

During a key's first ``warmup`` windows there are no statistics to judge by: the artifact's global
threshold applies to the model's score, as without calibration.

The policy reports, for each window, the threshold the incident lifecycle compares the raw score
with: ``score * alert_surprise / surprise``, so that ``score / threshold`` (the alert's severity) is
``surprise / alert_surprise`` and every downstream rule (opening, peaks, updates) reads calibrated
severities. State per key is fixed (a count, two floats for the score, two per feature; with the
empirical values tail a streak and one share per level and feature), in
preallocated arrays grown by doubling; decisions are vectorised over a micro-batch and equal to
deciding window by window.
"""

from __future__ import annotations

import math
import struct
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch

from .keyrows import KeyRows, rows_and_occurrences

_LN10 = math.log(10.0)
# One key's statistics in a snapshot: the configuration they were learned under (horizon, features),
# windows seen, score mean and variance, current run of alerting windows; then the features' means and
# variances (float64).
_STATE_HEADER = struct.Struct("<iiqddi")
_MAX_SURPRISE = 300.0  # beyond float64's tail resolution; a cap keeps severities finite
# The empirical tail of the values check: levels of |z| (3 spreads times powers of sqrt 2, up to 68)
# at which each key and feature keeps the running share of its windows that reached them.
TAIL_LEVELS = 3.0 * np.sqrt(2.0) ** np.arange(10)
_TAIL_HEADER = struct.Struct("<ii")  # levels, current streak of far-out windows; then float32 shares
# The seasonal check: windows buffered, period (-1 buffering, 0 none), windows seen; then the residuals'
# mean and variance (float64 x features) and the buffered windows or the period's values (float32)
_SEASON_HEADER = struct.Struct("<iiq")
VALUES_TAILS = ("normal", "empirical")


@dataclass(frozen=True)
class TailConfig:
    """How scores are calibrated to per-key tail probabilities (see the module docstring)."""

    enabled: bool = True
    alert_surprise: float = 8.0  # -log10 of the tail probability at which a window alerts
    horizon: int = 2000  # windows: the exponential memory of a key's statistics
    warmup: int = 100  # windows of a key before it is judged by its own statistics
    values: bool = True  # also judge the newest event's values against the key's own
    over_weight: float = 0.1  # learning rate of windows at or over the alert level, relative to others
    rel_floor: float = 0.01  # a spread is at least this share of its mean's magnitude
    learn_clip: float = 3.0  # a window moves the statistics as if at most this many spreads away (0: no clip)
    sustain: int = 8  # consecutive alerting windows after which a key's run counts as sustained
    calm_share: float = 0.5  # an open incident's windows count towards closing it under this share of alert_surprise
    # The values check's tail: "normal" (a Gaussian on the running spread) or "empirical" (no rarer
    # than the running share of the key's past windows at least as far out, for isolated ones)
    values_tail: str = "empirical"
    spike_width: int = 3  # empirical tail: consecutive far-out windows still judged as a (recurring) spike
    spike_after: float = 4.0  # empirical tail: windows of the horizon that reached a level before it is not rare
    # The model-score check's tail: "normal" (a Gaussian on the running spread of the key's scores) or
    # "empirical" (the same rule as the values' empirical tail, on the upper tail of the score)
    score_tail: str = "normal"
    # The seasonal check (off by default): a key whose first 2 x season_max windows repeat with a period
    # (autocorrelation at least season_min_acf) is also judged by how far its newest values are from
    # the same phase of its learned period
    seasonal: bool = False
    season_max: int = 300  # windows: the longest period looked for (the key's first 2x this many are buffered)
    season_min_acf: float = 0.8  # autocorrelation at the period below which a key has no period
    season_rate: float = 0.2  # how far each window moves its phase's learned value
    season_max_features: int = 1  # the check runs only for models with at most this many features (memory)

    def __post_init__(self) -> None:
        if self.values_tail not in VALUES_TAILS or self.score_tail not in VALUES_TAILS:
            raise ValueError(f"tail values_tail and score_tail must be one of {', '.join(VALUES_TAILS)}")
        if (self.season_max < 2 or not 0 < self.season_min_acf <= 1 or not 0 < self.season_rate <= 1
                or self.season_max_features < 1):
            raise ValueError("tail season_max must be at least 2, season_min_acf and season_rate in (0, 1], "
                             "season_max_features at least 1")
        if self.spike_width < 0 or not self.spike_after > 0:
            raise ValueError("tail spike_width must not be negative and spike_after must be positive")
        if not (self.alert_surprise > 0 and math.isfinite(self.alert_surprise)):
            raise ValueError("tail alert_surprise must be a positive number")
        if self.horizon < 2 or not 2 <= self.warmup <= self.horizon:
            raise ValueError("tail horizon must be at least 2 and warmup in [2, horizon]")
        if self.sustain < 0:
            raise ValueError("tail sustain must not be negative")
        if not 0.0 < self.calm_share <= 1.0:
            raise ValueError("tail calm_share must be in (0, 1]")
        if not 0.0 <= self.over_weight <= 1.0 or not self.rel_floor >= 0 or not self.learn_clip >= 0:
            raise ValueError("tail over_weight must be in [0, 1], rel_floor and learn_clip not negative")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def surprise_upper(z: np.ndarray) -> np.ndarray:
    """``-log10 P(Z > z)`` for a standard normal Z (0 for z <= -inf, capped for huge z)."""
    z = np.clip(np.nan_to_num(np.asarray(z, dtype=np.float64), nan=0.0), -1e6, 1e6)
    out = -torch.special.log_ndtr(torch.from_numpy(-z)).numpy() / _LN10
    return np.minimum(out, _MAX_SURPRISE)


def surprise_two_sided(z_abs: np.ndarray, tests: int) -> np.ndarray:
    """``-log10`` of the Bonferroni-corrected two-sided tail of the largest of ``tests`` |z| values."""
    return np.maximum(surprise_upper(z_abs) - math.log10(2.0 * max(tests, 1)), 0.0)


class TailCalibration(KeyRows):
    """Per-key tail calibration of scores (see the module docstring); a threshold policy."""

    def __init__(self, value: float, n_features: int, config: TailConfig | None = None,
                 initial_capacity: int = 1024, max_keys: int | None = None):
        if not (math.isfinite(value) and value > 0):
            raise ValueError("tail calibration needs a positive global threshold for the warm-up")
        self.value = float(value)  # the artifact's global threshold (warm-up)
        self.config = config or TailConfig()
        self.warmup = self.config.warmup
        self.n_features = int(n_features)
        self.calm_below = self.config.calm_share  # severity (surprise / alert level) under which a window is calm
        self._z_alert = float(-_inverse_upper(self.config.alert_surprise))
        self._rows: dict[str, int] = {}
        self._free: list[int] = []
        self._calibrated = 0
        self._count = np.zeros(0, dtype=np.int64)
        self._run = np.zeros(0, dtype=np.int64)  # consecutive alerting windows
        self._score = np.zeros((0, 2), dtype=np.float64)  # mean, variance
        self._values = np.zeros((0, 2, self.n_features), dtype=np.float64)
        self._empirical = self.config.values and self.config.values_tail == "empirical" and self.n_features > 0
        levels = len(TAIL_LEVELS) if self._empirical else 0
        self._streak = np.zeros(0, dtype=np.int64)  # consecutive windows with a far-out value
        self._share = np.zeros((0, self.n_features, levels), dtype=np.float32)  # share of windows at each level
        self._score_empirical = self.config.score_tail == "empirical"
        score_levels = len(TAIL_LEVELS) if self._score_empirical else 0
        self._score_streak = np.zeros(0, dtype=np.int64)  # consecutive windows with a far-out score
        self._score_share = np.zeros((0, score_levels), dtype=np.float32)  # share of windows whose score reached each level
        self._seasonal = (self.config.seasonal and self.config.values
                          and 0 < self.n_features <= self.config.season_max_features)
        self._season_len = 2 * self.config.season_max + 1 if self._seasonal else 0  # windows buffered
        self._season_period = np.zeros(0, dtype=np.int64)  # -1 while buffering, 0: no period, else the period
        self._season_pos = np.zeros(0, dtype=np.int64)  # windows seen by the seasonal check
        self._season_res = np.zeros((0, 2, self.n_features if self._seasonal else 0))  # residuals' mean, variance
        # the key's first windows' values while buffering, then the learned value of each phase
        self._season_buf = np.zeros((0, self._season_len, self.n_features if self._seasonal else 0), dtype=np.float32)
        self._grow(max(min(initial_capacity, max_keys or initial_capacity), 1))
        self.last_surprise = np.zeros(0, dtype=np.float64)  # of the last judged batch, per window

    # -- the policy ---------------------------------------------------------------------------

    def judge(self, keys: Sequence[str], scores: np.ndarray, newest: np.ndarray | None) -> np.ndarray:
        """The threshold each window's raw score is compared with (see the module docstring);
        learns from the windows. ``newest``: the newest event's (scaled) values per window."""
        n = len(keys)
        limits = np.empty(n, dtype=np.float64)
        surprise = np.zeros(n, dtype=np.float64)
        if n == 0:
            self.last_surprise = surprise
            return limits
        scores = np.asarray(scores, dtype=np.float64)
        values = None
        if self.config.values and newest is not None and self.n_features:
            values = np.asarray(newest, dtype=np.float64).reshape(n, self.n_features)
        rows, occurrence, distinct = rows_and_occurrences(keys, self._rows, self._allocate)
        # Round r holds each key's r-th window of the batch, so a key's windows go in event order.
        if distinct:
            rounds = [np.arange(n)]
        else:
            order = np.argsort(occurrence, kind="stable")
            bounds = np.cumsum(np.bincount(occurrence))[:-1]
            rounds = np.split(order, bounds)
        for idx in rounds:
            self._round(idx, rows[idx], scores, values, limits, surprise)
        self.last_surprise = surprise
        return limits

    def assess(self, keys: Sequence[str], scores: np.ndarray) -> np.ndarray:
        """:meth:`judge` without the values check (callers that have no windows)."""
        return self.judge(keys, scores, None)

    def exceeds(self, keys: list[str], scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores) > self.assess(keys, scores)

    def value_for(self, key: str) -> float:
        """The raw score at which the key's next window would alert by the model check alone."""
        row = self._rows.get(key)
        if row is None or self._count[row] < self.warmup:
            return self.value
        mean, var = self._score[row]
        return float(mean + self._z_alert * self._spread(np.array([mean]), np.array([var]))[0])

    @property
    def bytes_per_key(self) -> int:
        return (8 + 8 + 16 + 16 * self.n_features
                + (8 + 4 * self._share.shape[2] * self.n_features if self._empirical else 0)
                + (8 + 4 * self._score_share.shape[1] if self._score_empirical else 0)
                + (16 + 16 * self.n_features + 4 * self._season_len * self.n_features if self._seasonal else 0))

    def export_key(self, key: str) -> bytes | None:
        """The key's statistics, for its changelog snapshot; None for a key not seen."""
        row = self._rows.get(key)
        if row is None:
            return None
        mean, var = self._score[row]
        blob = (_STATE_HEADER.pack(self.config.horizon, self.n_features, int(self._count[row]), mean, var,
                                   int(self._run[row])) + self._values[row].tobytes())
        if self._empirical:
            blob += _TAIL_HEADER.pack(len(TAIL_LEVELS), int(self._streak[row])) + self._share[row].tobytes()
        if self._score_empirical:
            blob += _TAIL_HEADER.pack(len(TAIL_LEVELS), int(self._score_streak[row])) + self._score_share[row].tobytes()
        if self._seasonal:
            period, pos = int(self._season_period[row]), int(self._season_pos[row])
            held = min(pos, self._season_len) if period < 0 else max(period, 0)
            blob += (_SEASON_HEADER.pack(self._season_len, period, pos) + self._season_res[row].tobytes()
                     + self._season_buf[row, :held].tobytes())
        return blob

    def adopt_key(self, key: str, blob: bytes) -> bool:
        """Takes over a key's statistics from :meth:`export_key`; False (the key warms up again) when
        they were learned under another horizon or feature count, or with another values or score tail."""
        size = _STATE_HEADER.size + 16 * self.n_features
        tail_size = _TAIL_HEADER.size + 4 * len(TAIL_LEVELS) * self.n_features if self._empirical else 0
        score_size = _TAIL_HEADER.size + 4 * len(TAIL_LEVELS) if self._score_empirical else 0
        season = None
        if self._seasonal:
            at = size + tail_size + score_size
            if len(blob) < at + _SEASON_HEADER.size + 16 * self.n_features:
                return False
            length, period, pos = _SEASON_HEADER.unpack_from(blob, at)
            held = min(pos, length) if period < 0 else max(period, 0)
            body = at + _SEASON_HEADER.size
            if (length != self._season_len or pos < 0 or period > self.config.season_max
                    or len(blob) != body + 16 * self.n_features + 4 * held * self.n_features):
                return False
            res = np.frombuffer(blob, dtype=np.float64, offset=body, count=2 * self.n_features).reshape(2, -1)
            buf = np.frombuffer(blob, dtype=np.float32, offset=body + 16 * self.n_features,
                                count=held * self.n_features).reshape(held, -1)
            if not (np.isfinite(res).all() and np.isfinite(buf).all()):
                return False
            season = (period, pos, res, buf)
            blob = blob[:at]
        if len(blob) != size + tail_size + score_size:
            return False
        score_streak, score_share = 0, None
        if self._score_empirical:
            at = size + tail_size
            levels, score_streak = _TAIL_HEADER.unpack_from(blob, at)
            score_share = np.frombuffer(blob, dtype=np.float32, offset=at + _TAIL_HEADER.size, count=len(TAIL_LEVELS))
            if levels != len(TAIL_LEVELS) or score_streak < 0 or not (
                    np.isfinite(score_share).all() and ((score_share >= 0) & (score_share <= 1)).all()):
                return False
        streak, share = 0, None
        if self._empirical:
            levels, streak = _TAIL_HEADER.unpack_from(blob, size)
            share = np.frombuffer(blob, dtype=np.float32, offset=size + _TAIL_HEADER.size,
                                  count=len(TAIL_LEVELS) * self.n_features).reshape(self.n_features, -1)
            if levels != len(TAIL_LEVELS) or streak < 0 or not (np.isfinite(share).all() and
                                                                ((share >= 0) & (share <= 1)).all()):
                return False
        horizon, features, count, mean, var, run = _STATE_HEADER.unpack_from(blob)
        if horizon != self.config.horizon or features != self.n_features or count < 0 or run < 0:
            return False
        stats = np.frombuffer(blob, dtype=np.float64, offset=_STATE_HEADER.size,
                              count=2 * self.n_features).reshape(2, self.n_features)
        if not (math.isfinite(mean) and math.isfinite(var) and np.isfinite(stats).all()):
            return False
        row = self._adopted_row(key)
        self._count[row] = count
        self._run[row] = run
        self._score[row] = (mean, var)
        self._values[row] = stats
        if share is not None:
            self._streak[row] = streak
            self._share[row] = share
        if score_share is not None:
            self._score_streak[row] = score_streak
            self._score_share[row] = score_share
        if season is not None:
            period, pos, res, buf = season
            self._season_period[row], self._season_pos[row], self._season_res[row] = period, pos, res
            self._season_buf[row] = 0.0
            self._season_buf[row, :len(buf)] = buf
        if count >= self.warmup:
            self._calibrated += 1
        return True

    # -- internals ----------------------------------------------------------------------------

    def _spread(self, mean: np.ndarray, var: np.ndarray) -> np.ndarray:
        return np.maximum(np.sqrt(np.maximum(var, 0.0)), np.maximum(self.config.rel_floor * np.abs(mean), 1e-9))

    def _round(self, idx: np.ndarray, rr: np.ndarray, scores: np.ndarray, values: np.ndarray | None,
               limits: np.ndarray, surprise: np.ndarray) -> None:
        """Judges then learns one window per key (rows distinct)."""
        cfg = self.config
        s = scores[idx]
        finite = np.isfinite(s)
        count = self._count[rr]
        ready = count >= cfg.warmup
        mean, var = self._score[rr, 0], self._score[rr, 1]
        zs = (s - mean) / self._spread(mean, var)
        sp = surprise_upper(zs)
        if self._score_empirical:
            sp = self._empirical_score_surprise(rr, np.nan_to_num(zs, nan=0.0), sp, ready & finite)
        z = None
        if values is not None:
            x = values[idx]
            vm, vv = self._values[rr, 0], self._values[rr, 1]
            z = np.nan_to_num(np.abs(x - vm) / self._spread(vm, vv), nan=0.0)
            if self._empirical:
                sp = np.maximum(sp, self._empirical_surprise(rr, z, ready))
            else:
                sp = np.maximum(sp, surprise_two_sided(z.max(axis=1), self.n_features))
        season = None
        if self._seasonal and values is not None:
            season = self._season_judge(rr, values[idx])
            sp = np.maximum(sp, season[0])
        sp = np.where(ready & finite, sp, 0.0)
        surprise[idx] = sp
        with np.errstate(divide="ignore", invalid="ignore"):
            calibrated = np.where(sp > 0, np.maximum(s, 1e-12) * cfg.alert_surprise / sp, np.inf)
        limits[idx] = np.where(ready, calibrated, self.value)
        # Learn: exact running moments until the horizon, exponential after; slower while alerting.
        learn = finite
        if not learn.any():
            return
        rl, sl = rr[learn], s[learn]
        n_new = count[learn] + 1
        rate = 1.0 / np.minimum(n_new, cfg.horizon).astype(np.float64)
        # Alerting windows are learned at over_weight of the rate. A key's run of alerting windows (it
        # ends at a calm window, surprise under calm_share of the alert level): a short one (a spike,
        # even a recurring one) is learned as it is, so recurring spikes become normal; in a sustained
        # one (a fault) updates are slowed and winsorised, so the fault stays visible.
        alerting = ready[learn] & (sp[learn] >= cfg.alert_surprise)
        unsettled = ready[learn] & (sp[learn] >= cfg.alert_surprise * cfg.calm_share)  # not calm
        run = np.where(alerting, self._run[rl] + 1, np.where(unsettled, self._run[rl], 0))
        self._run[rl] = run
        sustained = unsettled & (run > cfg.sustain)
        rate = np.where(alerting | sustained, rate * cfg.over_weight, rate)
        clip = cfg.learn_clip
        moments = self._score[rl]
        if clip > 0 and sustained.any():
            band = clip * self._spread(moments[:, 0], moments[:, 1])
            sl = np.where(sustained, np.clip(sl, moments[:, 0] - band, moments[:, 0] + band), sl)
        self._score[rl] = _update(moments, sl, rate)
        if self._score_empirical:
            # As the values' shares below: the share of windows whose score reached each level.
            zl = np.maximum(np.nan_to_num(zs[learn], nan=0.0), 0.0)
            if clip > 0:
                zl = np.where(sustained, np.minimum(zl, clip), zl)
            reached = np.searchsorted(TAIL_LEVELS, zl, side="right")[:, None] > np.arange(len(TAIL_LEVELS))
            base = 1.0 / np.minimum(n_new, cfg.horizon).astype(np.float64)
            step = np.where(sustained, rate, base) * ready[learn]
            share = self._score_share[rl]
            share += step[:, None] * (reached - share)
            self._score_share[rl] = share
        if values is not None:
            xl = values[idx][learn]
            ok = np.isfinite(xl)
            vm = self._values[rl]
            if clip > 0 and sustained.any():
                band = clip * self._spread(vm[:, 0], vm[:, 1])
                xl = np.where(sustained[:, None], np.clip(xl, vm[:, 0] - band, vm[:, 0] + band), xl)
            upd = _update_many(vm, np.where(ok, xl, vm[:, 0]), rate)
            self._values[rl] = np.where(ok[:, None, :], upd, self._values[rl])
            if self._empirical and z is not None:
                # The share of windows at each level moves like the means (same rate), from the end
                # of the warm-up (before it the spreads are not yet known); a sustained run's windows
                # count as at most learn_clip spreads away, as they move the means.
                zl = z[learn]
                if clip > 0:
                    zl = np.where(sustained[:, None], np.minimum(zl, clip), zl)
                reached = np.searchsorted(TAIL_LEVELS, zl, side="right")[:, :, None] > np.arange(len(TAIL_LEVELS))
                base = 1.0 / np.minimum(n_new, cfg.horizon).astype(np.float64)  # an alerting window counts fully
                step = np.where(sustained, rate, base)[:, None] * (ok & ready[learn][:, None])
                share = self._share[rl]
                share += step[:, :, None] * (reached - share)
                self._share[rl] = share
        if season is not None:
            self._season_learn(rr, values[idx], season, learn, np.where(alerting | sustained, cfg.over_weight, 1.0),
                               rate)
        self._count[rl] = n_new
        self._calibrated += int((n_new == cfg.warmup).sum())

    def _empirical_surprise(self, rr: np.ndarray, z: np.ndarray, ready: np.ndarray) -> np.ndarray:
        """The values check with the empirical tail: per feature, a value's tail probability is the
        Gaussian one or, if larger, the running share of the key's past windows that reached the
        highest level the value reaches, once at least ``spike_after`` windows did, so a spike as
        large as ones the key had before is not rare (``-log10`` of that share is at most
        ``log10(horizon / spike_after)``); a value beyond every level seen keeps its Gaussian tail.
        Only isolated far-out windows are judged so: from the ``spike_width``-th consecutive one on
        (a shift, not a spike) the Gaussian tail alone counts. Bonferroni over the features as for
        the normal tail. Updates the streak of far-out windows.

        The Gaussian tail is evaluated for each window's largest |z| and, per feature, only where a
        value reaches a level (rare), so the check costs about what the normal tail costs."""
        cfg = self.config
        bonferroni = math.log10(self.n_features)
        normal = np.maximum(surprise_upper(z.max(axis=1)) - math.log10(2.0), 0.0) - bonferroni
        streak = np.where(ready & (normal >= cfg.alert_surprise * cfg.calm_share), self._streak[rr] + 1, 0)
        self._streak[rr] = streak
        levels = np.searchsorted(TAIL_LEVELS, z, side="right")  # levels each value reached
        candidate = (levels > 0) & (streak <= cfg.spike_width)[:, None]
        rows = np.flatnonzero(candidate.any(axis=1))
        if len(rows) == 0:
            return np.maximum(normal, 0.0)
        cand, zs = candidate[rows], z[rows]
        r, f = np.nonzero(cand)
        share = self._share[rr[rows][r], f, levels[rows][r, f] - 1]
        # windows that reached the level (shares are float32: a relative tolerance of 1e-4)
        seen = share.astype(np.float64) * np.minimum(self._count[rr[rows][r]], cfg.horizon)
        with np.errstate(divide="ignore"):
            empirical = np.where(seen >= cfg.spike_after * (1 - 1e-4), -np.log10(share.astype(np.float64)), np.inf)
        relieved = np.full(cand.shape, -np.inf)
        relieved[r, f] = np.minimum(surprise_upper(zs[r, f]) - math.log10(2.0), empirical)
        others = surprise_upper(np.where(cand, 0.0, zs).max(axis=1)) - math.log10(2.0)
        out = normal.copy()
        out[rows] = np.maximum(np.maximum(others, relieved.max(axis=1)), 0.0) - bonferroni
        return np.maximum(out, 0.0)

    def _empirical_score_surprise(self, rr: np.ndarray, z: np.ndarray, normal: np.ndarray,
                                  ready: np.ndarray) -> np.ndarray:
        """The model-score check with the empirical tail: the rule of :meth:`_empirical_surprise` on
        the upper tail of the score (one feature, one-sided). An isolated far-out score is no rarer
        than the running share of the key's past windows whose score reached its level, once at least
        ``spike_after`` windows did; from the ``spike_width``-th far-out window in a row, or beyond
        every level reached, the normal tail. Updates the streak of far-out scores."""
        cfg = self.config
        streak = np.where(ready & (normal >= cfg.alert_surprise * cfg.calm_share), self._score_streak[rr] + 1, 0)
        self._score_streak[rr] = streak
        levels = np.searchsorted(TAIL_LEVELS, z, side="right")
        rows = np.flatnonzero((levels > 0) & (streak <= cfg.spike_width))
        if len(rows) == 0:
            return normal
        share = self._score_share[rr[rows], levels[rows] - 1].astype(np.float64)
        seen = share * np.minimum(self._count[rr[rows]], cfg.horizon)
        with np.errstate(divide="ignore"):
            empirical = np.where(seen >= cfg.spike_after * (1 - 1e-4), -np.log10(share), np.inf)
        out = normal.copy()
        out[rows] = np.minimum(normal[rows], empirical)
        return out

    def _season_judge(self, rr: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The seasonal check's surprise per window (0 where the key has no period yet), the phase of
        each window and its residual (the values minus the phase's learned values)."""
        period = self._season_period[rr]
        active = period > 0
        phase = np.where(active, self._season_pos[rr] % np.maximum(period, 1), 0)
        surprise = np.zeros(len(rr))
        resid = np.zeros_like(x)
        rows = np.flatnonzero(active)
        if len(rows):
            ra = rr[rows]
            resid[rows] = x[rows] - self._season_buf[ra, phase[rows]]
            mean, var = self._season_res[ra, 0], self._season_res[ra, 1]
            # a residual's spread is at least rel_floor of the key's spread of values
            floor = np.maximum(self.config.rel_floor * np.sqrt(np.maximum(self._values[ra, 1], 0.0)), 1e-9)
            spread = np.maximum(np.sqrt(np.maximum(var, 0.0)), floor)
            z = np.nan_to_num(np.abs(resid[rows] - mean) / spread, nan=0.0)
            surprise[rows] = surprise_two_sided(z.max(axis=1), self.n_features)
        return surprise, phase, resid

    def _season_learn(self, rr: np.ndarray, x: np.ndarray, season: tuple[np.ndarray, np.ndarray, np.ndarray],
                      learn: np.ndarray, weight: np.ndarray, rate: np.ndarray) -> None:
        """Buffers a key's first windows and finds its period once the buffer is full; then moves each
        window's phase value ``season_rate`` of the way to its values and its residuals' moments like
        the other statistics (both slowed by ``weight`` while alerting). ``weight`` and ``rate`` are
        per learnt window (``learn``)."""
        cfg = self.config
        _, phase, resid = season
        ok = learn & np.isfinite(x).all(axis=1)
        wl = np.zeros(len(rr))
        rt = np.zeros(len(rr))
        wl[learn], rt[learn] = weight, rate
        period = self._season_period[rr]
        pos = self._season_pos[rr]
        buffering = ok & (period < 0)
        if buffering.any():
            rb = rr[buffering]
            self._season_buf[rb, pos[buffering]] = x[buffering]
            for row in rb[pos[buffering] + 1 >= self._season_len]:
                self._season_detect(int(row))
        active = ok & (period > 0)
        if active.any():
            ra = rr[active]
            old = self._season_buf[ra, phase[active]].astype(np.float64)
            self._season_buf[ra, phase[active]] = old + (cfg.season_rate * wl[active])[:, None] * (x[active] - old)
            self._season_res[ra] = _update_many(self._season_res[ra], resid[active], rt[active])
        self._season_pos[rr[ok]] += 1

    def _season_detect(self, row: int) -> None:
        """The key's period from its buffered windows: the shortest lag (after the autocorrelation first
        turns negative) where the autocorrelation, averaged over the features, peaks within 0.05 of its
        highest there (not a multiple of the period), if that reaches
        ``season_min_acf``; the phase values are then the buffer's means per phase and the residuals'
        moments those of the buffer's later periods."""
        buf = self._season_buf[row].astype(np.float64)
        n = len(buf)
        var = buf.var(axis=0)
        period = 0
        if (var > 0).all():
            # autocorrelation as 1 - (mean squared difference at the lag) / (2 x variance): an average over
            # the pairs the lag has, so no lag is favoured for having fewer of them
            lags = np.arange(1, n // 2 + 1)
            acf = np.array([(1.0 - ((buf[lag:] - buf[:-lag]) ** 2).mean(axis=0) / (2.0 * var)).mean() for lag in lags])
            negative = np.flatnonzero(acf < 0)
            if len(negative):
                start = negative[0]
                best = float(acf[start:].max())
                # multiples of the period peak about as high: the shortest peak within 0.05 of the best
                peaks = [i for i in range(start + 1, len(acf))
                         if acf[i] >= max(best - 0.05, self.config.season_min_acf) and acf[i] >= acf[i - 1]
                         and (i + 1 == len(acf) or acf[i] >= acf[i + 1])]
                if peaks:
                    period = int(lags[peaks[0]])
        self._season_period[row] = period
        self._season_pos[row] = n - 1  # the caller counts the window that filled the buffer
        if not period:
            self._season_buf[row] = 0.0
            return
        phases = np.arange(n) % period
        profile = np.stack([buf[phases == p].mean(axis=0) for p in range(period)])
        resid = buf[period:] - profile[phases[period:]]
        self._season_res[row] = np.stack([resid.mean(axis=0), resid.var(axis=0)])
        self._season_buf[row] = 0.0
        self._season_buf[row, :period] = profile

    def _allocate(self, key: str) -> int:
        if self._free:
            row = self._free.pop()
        else:
            row = len(self._rows)
            if row >= len(self._count):
                self._grow(2 * len(self._count))
        self._rows[key] = row
        self._count[row] = 0
        self._run[row] = 0
        self._score[row] = 0.0
        self._values[row] = 0.0
        self._streak[row] = 0
        self._share[row] = 0.0
        self._score_streak[row] = 0
        self._score_share[row] = 0.0
        self._season_period[row] = -1
        self._season_pos[row] = 0
        self._season_res[row] = 0.0
        self._season_buf[row] = 0.0
        return row

    def _grow(self, capacity: int) -> None:
        old = len(self._count)
        self._count = np.concatenate([self._count, np.zeros(capacity - old, np.int64)])
        self._run = np.concatenate([self._run, np.zeros(capacity - old, np.int64)])
        self._score = np.concatenate([self._score, np.zeros((capacity - old, 2))])
        self._values = np.concatenate([self._values, np.zeros((capacity - old, 2, self.n_features))])
        self._streak = np.concatenate([self._streak, np.zeros(capacity - old, np.int64)])
        self._share = np.concatenate([self._share, np.zeros((capacity - old, *self._share.shape[1:]), np.float32)])
        self._score_streak = np.concatenate([self._score_streak, np.zeros(capacity - old, np.int64)])
        self._score_share = np.concatenate([self._score_share, np.zeros((capacity - old, *self._score_share.shape[1:]),
                                                                        np.float32)])
        self._season_period = np.concatenate([self._season_period, np.full(capacity - old, -1, np.int64)])
        self._season_pos = np.concatenate([self._season_pos, np.zeros(capacity - old, np.int64)])
        self._season_res = np.concatenate([self._season_res, np.zeros((capacity - old, *self._season_res.shape[1:]))])
        self._season_buf = np.concatenate([self._season_buf, np.zeros((capacity - old, *self._season_buf.shape[1:]),
                                                                      np.float32)])


def _update(moments: np.ndarray, x: np.ndarray, rate: np.ndarray) -> np.ndarray:
    """Exponentially weighted mean and variance (West's update), rows of (mean, variance)."""
    mean, var = moments[:, 0], moments[:, 1]
    delta = x - mean
    new_mean = mean + rate * delta
    new_var = (1.0 - rate) * (var + rate * delta * delta)
    return np.stack([new_mean, new_var], axis=1)


def _update_many(moments: np.ndarray, x: np.ndarray, rate: np.ndarray) -> np.ndarray:
    """:func:`_update` per feature: moments (n, 2, F), x (n, F)."""
    mean, var = moments[:, 0], moments[:, 1]
    r = rate[:, None]
    delta = x - mean
    return np.stack([mean + r * delta, (1.0 - r) * (var + r * delta * delta)], axis=1)


def _inverse_upper(surprise: float) -> float:
    """``-z`` such that ``-log10 P(Z > z) == surprise`` (bisection; called once per policy)."""
    lo, hi = -40.0, 40.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if float(surprise_upper(np.array([mid]))[0]) < surprise:
            lo = mid
        else:
            hi = mid
    return -(lo + hi) / 2
