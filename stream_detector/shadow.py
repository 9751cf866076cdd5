"""Shadow scoring: a challenger model judged beside the champion on the same windows.

When the model directory names a ``challenger`` (see :mod:`~stream_detector.registry`), the
worker scores every micro-batch's windows with it too, in the same step on the inference thread
(one more model call per batch part, no second consumer), and judges them with the challenger's
own threshold policy and incident tracker, built from the same settings as the champion's. Its
alert messages (the alert schema, ``model_version`` the challenger's) go only to the shadow topic;
per scored window both verdicts are counted, and whether they agree, so the two models can be
compared on the live traffic before the challenger is promoted.

The challenger's per-key state lives in memory only: it is not written to the window changelog,
so after a restart or a rebalance it starts its warm-up again (the champion's does not). When
the champion moves to the version shadowing, its threshold policy, warm by then, serves on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .artifacts import ModelArtifact
from .incidents import AlertPolicy, IncidentTracker
from .scoring import Scores
from .thresholds import ThresholdPolicy

CHAMPION_MODEL, CHALLENGER_MODEL = "champion", "challenger"
OVER, UNDER = "over", "under"
BOTH, CHAMPION_ONLY, CHALLENGER_ONLY, NEITHER = "both", "champion_only", "challenger_only", "neither"
AGREEMENTS = (BOTH, CHAMPION_ONLY, CHALLENGER_ONLY, NEITHER)


@dataclass
class ShadowCounts:
    """Windows judged by both models since the last drain: each model's verdicts and their agreement."""

    champion_over: int = 0
    challenger_over: int = 0
    both: int = 0
    neither: int = 0
    judged: int = 0  # windows both models judged (a non-finite challenger score is not judged)

    @property
    def champion_only(self) -> int:
        return self.champion_over - self.both

    @property
    def challenger_only(self) -> int:
        return self.challenger_over - self.both

    def add(self, champion_over: np.ndarray, challenger_over: np.ndarray) -> None:
        """One judged part: boolean verdicts per window, aligned."""
        both = int(np.count_nonzero(champion_over & challenger_over))
        champion = int(np.count_nonzero(champion_over))
        challenger = int(np.count_nonzero(challenger_over))
        self.judged += len(champion_over)
        self.champion_over += champion
        self.challenger_over += challenger
        self.both += both
        self.neither += len(champion_over) - champion - challenger + both

    def agreement(self) -> dict[str, int]:
        return {BOTH: self.both, CHAMPION_ONLY: self.champion_only, CHALLENGER_ONLY: self.challenger_only,
                NEITHER: self.neither}


@dataclass
class Challenger:
    """The model shadowing the champion: its scorer, threshold policy and incidents, per key."""

    artifact: ModelArtifact
    scorer: Callable[[np.ndarray], Scores]
    threshold: ThresholdPolicy
    incidents: IncidentTracker
    score_failures: int = 0  # model calls that raised (the batch was judged by the champion alone)
    closed: list[dict[str, Any]] = field(default_factory=list)  # close messages not tied to a window

    @classmethod
    def build(cls, artifact: ModelArtifact, scorer: Callable[[np.ndarray], Scores], threshold: ThresholdPolicy,
              alerting: AlertPolicy) -> "Challenger":
        return cls(artifact, scorer, threshold, IncidentTracker(alerting))

    @property
    def version(self) -> str:
        return self.artifact.version
