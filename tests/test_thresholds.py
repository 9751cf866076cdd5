"""Unit tests for stream_detector.thresholds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stream_detector.thresholds import GlobalThreshold, fit_quantile_threshold


def test_quantile_of_scores():
    scores = np.arange(101, dtype=np.float64)  # 0..100
    record = fit_quantile_threshold(scores, quantile=0.9)
    assert record["value"] == pytest.approx(90.0)
    assert record == {"method": "quantile", "quantile": 0.9, "margin": 1.0, "value": record["value"],
                      "fitted_on": 101}


def test_margin_widens_the_quantile():
    scores = np.arange(101, dtype=np.float64)
    assert fit_quantile_threshold(scores, 0.9, margin=1.5)["value"] == pytest.approx(135.0)


def test_default_quantile_is_high():
    scores = np.linspace(0.0, 1.0, 10_001)
    assert fit_quantile_threshold(scores)["value"] == pytest.approx(0.995)


def test_non_finite_scores_are_ignored():
    record = fit_quantile_threshold(np.array([1.0, np.nan, 2.0, np.inf, 3.0, -np.inf]), 0.5)
    assert record["value"] == pytest.approx(2.0)
    assert record["fitted_on"] == 3


def test_record_is_json_plain():
    record = fit_quantile_threshold(np.float32([0.5, 1.5]), 0.5)
    assert type(record["value"]) is float and type(record["fitted_on"]) is int


@pytest.mark.parametrize("quantile", [0.0, 1.0, -0.1, 1.5, math.nan])
def test_rejects_bad_quantile(quantile):
    with pytest.raises(ValueError, match="quantile"):
        fit_quantile_threshold(np.arange(10.0), quantile)


@pytest.mark.parametrize("scores", [np.array([]), np.array([np.nan, np.inf]), []])
def test_rejects_empty_input(scores):
    with pytest.raises(ValueError, match="no finite scores"):
        fit_quantile_threshold(scores)


def test_global_threshold_is_strictly_greater():
    t = GlobalThreshold(1.0)
    assert t.exceeds(["a", "b", "c"], np.float32([0.5, 1.0, 1.5])).tolist() == [False, False, True]
    assert t.value_for("anything") == 1.0
