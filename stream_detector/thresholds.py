"""Alert thresholds: fitted from training scores and stored in the artifact."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


class ThresholdPolicy(Protocol):
    def exceeds(self, keys: list[str], scores: np.ndarray) -> np.ndarray:
        """A boolean mask: which scored windows raise an alert."""

    def value_for(self, key: str) -> float: ...


@dataclass
class GlobalThreshold:
    """One threshold for every key: a high quantile of held-out normal scores."""

    value: float

    def exceeds(self, keys: list[str], scores: np.ndarray) -> np.ndarray:
        return scores > self.value

    def value_for(self, key: str) -> float:
        return self.value


def fit_quantile_threshold(scores: np.ndarray, quantile: float = 0.995, margin: float = 1.0) -> dict[str, Any]:
    """The artifact's threshold record: a quantile of normal scores, optionally widened by a margin."""
    if not 0.0 < quantile < 1.0:
        raise ValueError("quantile must be in (0, 1)")
    scores = np.asarray(scores, dtype=np.float64)
    scores = scores[np.isfinite(scores)]
    if scores.size == 0:
        raise ValueError("no finite scores to fit a threshold on")
    value = float(np.quantile(scores, quantile)) * margin
    return {"method": "quantile", "quantile": quantile, "margin": margin, "value": value,
            "fitted_on": int(scores.size)}
