"""Input drift: how far recent windows have moved from the data the served model was trained on.

Per feature, the newest row of every scored window (the event that window was scored for) is
standardised with the artifact's own scaler (``(x - center) / scale``, NaN as 0, clipped, as the
model sees it), and the mean over a micro-batch enters an exponentially weighted mean with a
half-life of ``halflife`` windows. The drift of a feature is the distance of that mean from the
same mean over the model's normal training windows (``training.standardised_means`` in the
artifact; 0, the training median, for artifacts without it), in units of the feature's training
spread: 0 while the traffic looks like the training data, 1 when a feature's typical value has
moved by one robust standard deviation.

One numpy pass per micro-batch, nothing per event and nothing per key: the worker exports it as
``stream_detector_feature_drift{feature}``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from .preprocessing import ScalerParams


def training_reference(metadata: Mapping[str, Any], n_features: int) -> np.ndarray | None:
    """The artifact's mean standardised value of each feature on its normal training windows."""
    values = (metadata.get("training") or {}).get("standardised_means")
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if array.shape != (n_features,) or not np.isfinite(array).all():
        return None
    return array


def standardised_means(windows: np.ndarray, scaler: ScalerParams) -> np.ndarray:
    """Mean standardised value of each feature over the newest row of ``windows`` (N, W, F)."""
    if len(windows) == 0:
        return np.zeros(len(scaler.center))
    return scaler.transform(np.asarray(windows)[:, -1, :]).mean(axis=0, dtype=np.float64)


class FeatureDrift:
    """Exponentially weighted mean of each feature's standardised value over scored windows."""

    def __init__(self, scaler: ScalerParams, halflife: float = 10_000,
                 reference: Sequence[float] | np.ndarray | None = None):
        if not halflife >= 1:
            raise ValueError("the drift half-life must be at least one window")
        n = len(scaler.center)
        self.halflife = float(halflife)
        self.center = np.asarray(scaler.center, dtype=np.float32)
        self.inv_scale = (1.0 / np.asarray(scaler.scale, dtype=np.float64)).astype(np.float32)
        self.clip = np.float32(scaler.clip)
        self.reference = np.zeros(n) if reference is None else np.asarray(reference, dtype=np.float64)
        if self.reference.shape != (n,):
            raise ValueError(f"the drift reference needs {n} values, got {self.reference.shape}")
        self.mean = np.zeros(n)
        self.weight = 0.0  # total weight of the windows seen (-> 1): the mean is corrected for its start
        self.windows = 0

    @classmethod
    def for_artifact(cls, artifact: Any, halflife: float = 10_000) -> "FeatureDrift":
        return cls(artifact.scaler, halflife,
                   training_reference(artifact.metadata, len(artifact.scaler.center)))

    def observe(self, windows: np.ndarray) -> None:
        """Takes a micro-batch of scored windows (N, W, F), as the model was given them."""
        n = len(windows)
        if n == 0:
            return
        rows = np.asarray(windows)[:, -1, :] - self.center
        rows *= self.inv_scale
        np.clip(rows, -self.clip, self.clip, out=rows)
        nan = np.isnan(rows)  # the training median: 0, adds nothing to the sum
        total = rows.sum(axis=0, dtype=np.float64, where=~nan) if nan.any() else rows.sum(axis=0, dtype=np.float64)
        batch = total / n
        keep = 0.5 ** (n / self.halflife)  # the old mean's share: as if the windows came one by one
        weight = keep * self.weight + (1.0 - keep)
        # Replaced, not updated in place: the metrics thread reads it while the loop goes on.
        self.mean = (keep * self.weight * self.mean + (1.0 - keep) * batch) / weight
        self.weight = weight
        self.windows += n

    def drift(self) -> np.ndarray:
        """Per feature: |recent mean - training mean| of the standardised values (0 before any window)."""
        if self.windows == 0:
            return np.zeros_like(self.reference)
        return np.abs(self.mean - self.reference)

    def value(self, index: int) -> float:
        value = float(self.drift()[index])
        return value if math.isfinite(value) else 0.0
