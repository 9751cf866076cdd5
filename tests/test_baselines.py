"""The comparison baselines: isolation forest, per-key rolling z-score, River's Half-Space Trees."""

from __future__ import annotations

import numpy as np
import pytest

from stream_detector.preprocessing import ScalerParams
from trainer.baselines import (
    BASELINES, HalfSpaceTreesBaseline, IsolationForestBaseline, RollingZScoreBaseline, fit_baseline_threshold,
    scale_windows,
)
from trainer.metrics import roc_auc

W, F = 8, 3


def normal_windows(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(W)[None, :, None] + rng.integers(0, 1000, (n, 1, 1))
    base = np.sin(t / 5.0 + np.arange(F)[None, None, :])
    return (base + rng.normal(0, 0.1, (n, W, F))).astype(np.float32)


def with_spike(windows: np.ndarray, seed: int, size: float = 5.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = windows.copy()
    channels = rng.integers(0, F, len(out))
    out[np.arange(len(out)), -1, channels] += rng.choice([-size, size], len(out))
    return out


@pytest.fixture(scope="module")
def data():
    train = normal_windows(1500, 0)
    scaler = ScalerParams.fit(train.reshape(-1, F))
    test = normal_windows(300, 1)
    return scale_windows(scaler, train), scale_windows(scaler, test), scale_windows(scaler, with_spike(test, 2))


# Lowest ROC-AUC measured on these spikes over 5 seeds: isolation forest on windows 0.808 (one
# spiked value among 24 is a weak signal for axis-parallel random splits), on the newest event 0.995,
# rolling z-score 1.000, Half-Space Trees 0.809 (River's defaults, clipped unit-interval inputs).
# The bounds leave a margin.
AUC_BOUND = {"isolation_forest_window": 0.75, "isolation_forest_newest": 0.95, "rolling_zscore": 0.97,
             "half_space_trees": 0.75}


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_every_baseline_separates_obvious_spikes(data, name):
    train, normal, spiked = data
    baseline = BASELINES[name]().fit(train)
    scores = np.r_[baseline.score(normal), baseline.score(spiked)]
    assert scores.shape == (600,) and np.isfinite(scores).all()
    auc = roc_auc(np.r_[np.zeros(300), np.ones(300)], scores)
    assert auc > AUC_BOUND[name], f"{name}: ROC-AUC {auc:.3f}"
    threshold = fit_baseline_threshold(baseline, normal, 0.95)
    assert threshold["method"] == "quantile" and threshold["fitted_on"] == 300
    assert np.mean(baseline.score(normal) > threshold["value"]) <= 0.06


def test_rolling_zscore_by_hand():
    train = np.zeros((4, 5, 2), np.float32)
    train[:, :4, :] = np.array([0.5, -0.5, 0.5, -0.5])[None, :, None]  # within-window std 0.5
    baseline = RollingZScoreBaseline(min_std=0.01).fit(train)
    np.testing.assert_allclose(baseline.floor, [0.5, 0.5], rtol=1e-6)  # median training spread per feature
    window = np.zeros((1, 5, 2), np.float32)
    window[0, :4, 0] = [1.0, -1.0, 1.0, -1.0]  # history mean 0, std 1
    window[0, -1, 0] = 3.0  # z = 3
    window[0, :4, 1] = 2.0  # flat history: std 0, floored at 0.5
    window[0, -1, 1] = 2.5  # z = 0.5 / 0.5 = 1
    assert baseline.score(window)[0] == pytest.approx((3.0 + 1.0) / 2)


def test_isolation_forest_modes_read_the_window_or_the_newest_event(data):
    train, normal, _ = data
    window = IsolationForestBaseline("window", n_estimators=20).fit(train)
    newest = IsolationForestBaseline("newest", n_estimators=20).fit(train)
    assert window.model.n_features_in_ == W * F and newest.model.n_features_in_ == F
    assert window.score(normal).shape == newest.score(normal).shape == (300,)
    with pytest.raises(ValueError):
        IsolationForestBaseline("rows")


def test_half_space_trees_sees_inputs_scaled_to_the_unit_interval(data):
    train, _, spiked = data
    hst = HalfSpaceTreesBaseline(n_trees=5, height=6).fit(train)
    rows = list(hst._dicts(spiked * 100.0))
    values = np.array([list(r.values()) for r in rows])
    assert values.shape == (300, F)
    assert values.min() >= 0.0 and values.max() <= 1.0
    scores = hst.score(spiked)
    assert ((scores >= 0) & (scores <= 1)).all()  # River's HST scores lie in [0, 1]


def test_baselines_see_the_workers_preprocessing():
    """``ScalerParams.transform`` (numpy, the baselines') equals the worker's torch ``Preprocessor``:
    robust scaling, NaN imputed with the training median, clipping."""
    import torch

    from stream_detector.preprocessing import Preprocessor

    rng = np.random.default_rng(0)
    scaler = ScalerParams.fit(rng.normal(5.0, 3.0, (500, F)), clip=4.0)
    x = rng.normal(5.0, 9.0, (20, W, F)).astype(np.float32)
    x[0, 0, 0] = np.nan
    with torch.inference_mode():
        expected = Preprocessor(scaler)(torch.from_numpy(x.copy())).numpy()
    got = scale_windows(scaler, x)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert got[0, 0, 0] == 0.0 and np.abs(got).max() <= 4.0
