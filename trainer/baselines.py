"""Baselines, for comparison only (never served by the worker).

Each baseline sees exactly what the models see: the windows of the worker's own feature code
(:func:`trainer.fit.windows_from_events`), scaled by the same robust scaler
(:meth:`stream_detector.preprocessing.ScalerParams.transform`, the numpy twin of the worker's
preprocessing). Each is fitted on normal training windows and scores one window per event:

- :class:`IsolationForestBaseline`: scikit-learn's isolation forest on the flattened window
  (``mode="window"``) or on the newest event's features only (``mode="newest"``);
- :class:`RollingZScoreBaseline`: a per-key rolling z-score: how far the newest event lies from the
  mean of the key's previous ``W - 1`` events (the rest of its window), per feature in units of
  their standard deviation (floored by the feature's training spread), averaged over features;
- :class:`HalfSpaceTreesBaseline`: River's streaming Half-Space Trees on the newest event's
  features, scaled to [0, 1] by the training range (River's requirement), learnt one event at a
  time on the training windows (``learn_one``) and frozen for scoring (``score_one``).

Thresholds are fitted like the models' (:func:`fit_baseline_threshold`): a quantile of the
baseline's scores on held-out normal training windows, one global threshold for every key.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stream_detector.preprocessing import ScalerParams
from stream_detector.thresholds import fit_quantile_threshold


class Baseline:
    name: str = "baseline"

    def fit(self, windows: np.ndarray) -> "Baseline":
        """Fits on scaled normal training windows (N, W, F)."""
        raise NotImplementedError

    def score(self, windows: np.ndarray) -> np.ndarray:
        """Anomaly scores (N,) of scaled windows; higher = more anomalous."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


class IsolationForestBaseline(Baseline):
    def __init__(self, mode: str = "window", n_estimators: int = 200, max_samples: int | str = 256, seed: int = 0,
                 max_fit: int = 100_000):
        if mode not in ("window", "newest"):
            raise ValueError("mode must be 'window' or 'newest'")
        self.mode, self.n_estimators, self.max_samples, self.seed, self.max_fit = mode, n_estimators, max_samples, \
            seed, max_fit
        self.name = f"isolation_forest_{mode}"
        self.model = None

    def _rows(self, windows: np.ndarray) -> np.ndarray:
        return windows.reshape(len(windows), -1) if self.mode == "window" else windows[:, -1, :]

    def fit(self, windows: np.ndarray) -> "IsolationForestBaseline":
        from sklearn.ensemble import IsolationForest

        rows = self._rows(windows)
        if len(rows) > self.max_fit:
            rows = rows[np.random.default_rng(self.seed).choice(len(rows), self.max_fit, replace=False)]
        self.model = IsolationForest(n_estimators=self.n_estimators, max_samples=self.max_samples,
                                     random_state=self.seed, n_jobs=1).fit(rows)
        return self

    def score(self, windows: np.ndarray) -> np.ndarray:
        out = [-self.model.score_samples(self._rows(windows[i:i + 50_000])) for i in range(0, len(windows), 50_000)]
        return np.concatenate(out) if out else np.zeros(0)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "n_estimators": self.n_estimators, "max_samples": self.max_samples}


class RollingZScoreBaseline(Baseline):
    name = "rolling_zscore"

    def __init__(self, min_std: float = 0.05):
        self.min_std = min_std
        self.floor: np.ndarray | None = None

    def fit(self, windows: np.ndarray) -> "RollingZScoreBaseline":
        # Floor each feature's rolling std at a share of its typical within-window spread, so a
        # key whose recent history is flat (binary flags, idle sensors) does not divide by ~0.
        spread = windows[:, :-1, :].std(axis=1)
        self.floor = np.maximum(np.median(spread, axis=0), self.min_std)
        return self

    def score(self, windows: np.ndarray) -> np.ndarray:
        history = windows[:, :-1, :]
        z = np.abs(windows[:, -1, :] - history.mean(axis=1)) / np.maximum(history.std(axis=1), self.floor)
        return z.mean(axis=1)


class HalfSpaceTreesBaseline(Baseline):
    name = "half_space_trees"

    def __init__(self, n_trees: int = 10, height: int = 8, window_size: int = 250, seed: int = 0,
                 max_fit: int = 50_000):
        self.n_trees, self.height, self.window_size, self.seed, self.max_fit = n_trees, height, window_size, seed, \
            max_fit
        self.model = None
        self.low: np.ndarray | None = None
        self.high: np.ndarray | None = None

    def _dicts(self, windows: np.ndarray):
        x = np.clip((windows[:, -1, :] - self.low) / (self.high - self.low), 0.0, 1.0)
        for row in x:
            yield {i: float(v) for i, v in enumerate(row)}

    def fit(self, windows: np.ndarray) -> "HalfSpaceTreesBaseline":
        from river.anomaly import HalfSpaceTrees

        newest = windows[:, -1, :]
        self.low = np.quantile(newest, 0.001, axis=0)
        self.high = np.maximum(np.quantile(newest, 0.999, axis=0), self.low + 1e-6)
        self.model = HalfSpaceTrees(n_trees=self.n_trees, height=self.height, window_size=self.window_size,
                                    seed=self.seed)
        if len(windows) > self.max_fit:  # the most recent ones: a stream learner forgets the rest anyway
            windows = windows[-self.max_fit:]
        for x in self._dicts(windows):
            self.model.learn_one(x)
        return self

    def score(self, windows: np.ndarray) -> np.ndarray:
        return np.fromiter((self.model.score_one(x) for x in self._dicts(windows)), dtype=np.float64,
                           count=len(windows))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "n_trees": self.n_trees, "height": self.height, "window_size": self.window_size}


BASELINES = {
    "isolation_forest_window": lambda: IsolationForestBaseline("window"),
    "isolation_forest_newest": lambda: IsolationForestBaseline("newest"),
    "rolling_zscore": RollingZScoreBaseline,
    "half_space_trees": HalfSpaceTreesBaseline,
}


def fit_baseline_threshold(baseline: Baseline, held_out: np.ndarray, quantile: float) -> dict[str, Any]:
    """A quantile of the baseline's scores on held-out normal (scaled) training windows."""
    return fit_quantile_threshold(baseline.score(held_out), quantile)


def scale_windows(scaler: ScalerParams, windows: np.ndarray, batch: int = 100_000) -> np.ndarray:
    return np.concatenate([scaler.transform(windows[i:i + batch]) for i in range(0, len(windows), batch)]) \
        if len(windows) else windows.astype(np.float32)
