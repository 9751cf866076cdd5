"""Drift: per-feature shift of scored windows from the training data, and keys held at their
threshold bounds; both exported per feature or as one number, never per key."""

from __future__ import annotations

import numpy as np
import pytest

from stream_detector.detector import Detector
from stream_detector.drift import FeatureDrift, standardised_means, training_reference
from stream_detector.metrics import WorkerMetrics
from stream_detector.preprocessing import ScalerParams
from stream_detector.thresholds import AdaptiveThreshold, GlobalThreshold

from test_alert_lifecycle import T0, WINDOW, artifact, newest_a, rec  # noqa: F401 (fixture)

SCALER = ScalerParams(center=(10.0, 0.0), scale=(2.0, 1.0))


def windows(n: int, a: float, b: float, rng: np.random.Generator) -> np.ndarray:
    out = np.empty((n, 4, 2), dtype=np.float32)
    out[..., 0] = rng.normal(a, 2.0, (n, 4))
    out[..., 1] = rng.normal(b, 1.0, (n, 4))
    return out


def test_drift_stays_near_zero_on_training_like_windows_and_measures_a_shift_in_training_units():
    rng = np.random.default_rng(0)
    drift = FeatureDrift(SCALER, halflife=500)
    assert drift.drift().tolist() == [0.0, 0.0]  # nothing scored yet
    for _ in range(20):
        drift.observe(windows(256, 10.0, 0.0, rng))
    assert np.all(drift.drift() < 0.1)
    for _ in range(40):  # feature a moves by 3 training deviations (6 units of scale 2); b stays
        drift.observe(windows(256, 16.0, 0.0, rng))
    assert drift.drift()[0] == pytest.approx(3.0, abs=0.1) and drift.drift()[1] < 0.1


def test_the_moving_mean_halves_its_distance_every_halflife_whatever_the_batch_size():
    for batch in (1, 100, 1000):
        drift = FeatureDrift(SCALER, halflife=1000)
        drift.observe(np.full((20_000, 4, 2), 14.0, dtype=np.float32))  # feature a settled at +2 deviations
        before = drift.drift()[0]
        assert before == pytest.approx(2.0)
        calm = np.zeros((batch, 4, 2), dtype=np.float32)
        calm[..., 0] = 10.0
        for _ in range(1000 // batch):
            drift.observe(calm)
        assert drift.drift()[0] == pytest.approx(before / 2, rel=0.01)


def test_missing_and_absurd_values_count_as_the_model_sees_them():
    drift = FeatureDrift(SCALER, halflife=10)
    rows = np.array([[[np.nan, 1e9]]], dtype=np.float32).repeat(4, axis=1)
    drift.observe(rows)
    assert drift.drift().tolist() == [0.0, SCALER.clip]  # NaN is the training median; clipped like the scaler


def test_the_training_reference_is_read_from_the_artifact_and_ignored_when_malformed():
    assert training_reference({"training": {"standardised_means": [0.5, -0.25]}}, 2).tolist() == [0.5, -0.25]
    assert training_reference({"training": {"standardised_means": [0.5]}}, 2) is None
    assert training_reference({}, 2) is None
    rng = np.random.default_rng(1)
    train = windows(500, 10.0, 0.0, rng)
    train[..., 1] = np.abs(train[..., 1])  # a skewed feature: its mean is not the median
    reference = standardised_means(train, SCALER)
    drift = FeatureDrift(SCALER, halflife=200, reference=reference)
    test = windows(2000, 10.0, 0.0, rng)
    test[..., 1] = np.abs(test[..., 1])
    drift.observe(test)
    assert np.all(drift.drift() < 0.1) and reference[1] > 0.5


def test_the_detector_tracks_drift_of_the_windows_it_scores_and_restarts_with_a_new_model(artifact):
    detector = Detector(artifact, newest_a, clock=lambda: T0, threshold=GlobalThreshold(100.0))
    shifted = artifact.scaler.center[0] + 5 * artifact.scaler.scale[0]
    detector.process([rec("k", i, shifted) for i in range(WINDOW + 50)])
    assert detector.drift.windows == 51 and detector.drift.drift()[0] == pytest.approx(5.0, rel=1e-3)
    detector.swap_model(artifact, newest_a)
    detector.process([rec("k", 100, 0.0)])
    assert detector.drift.windows == 1


def calibrated(threshold: AdaptiveThreshold, key: str, score: float) -> None:
    threshold.assess([key] * threshold.warmup, np.full(threshold.warmup, score))


def test_share_of_keys_on_threshold_bounds_counts_only_calibrated_keys():
    threshold = AdaptiveThreshold(1.0, 0.5, warmup=4, history=8, min_ratio=0.5, max_ratio=2.0, learn_ceiling=0.9)
    assert threshold.share_at_bounds() == 0.0
    calibrated(threshold, "quiet", 0.01)  # far below the reference: held at min_ratio
    calibrated(threshold, "normal", 0.5)  # at the reference: ratio 1
    threshold.assess(["warming"], np.array([0.01]))  # not calibrated: not counted
    assert threshold.share_at_bounds() == pytest.approx(0.5)
    threshold.restart_warmup("quiet")
    assert threshold.share_at_bounds() == 0.0 and threshold.calibrated_keys == 1
    assert GlobalThreshold(1.0).share_at_bounds() == 0.0


def test_the_gauges_have_a_series_per_feature_and_none_per_key():
    metrics = WorkerMetrics()
    drift = FeatureDrift(SCALER, halflife=10)
    for i, name in enumerate(("a", "b")):
        metrics.feature_drift.labels(feature=name).set_function(lambda i=i: drift.value(i))
    drift.observe(np.full((3, 4, 2), 16.0, dtype=np.float32))
    samples = {s.labels["feature"]: s.value for f in metrics.registry.collect() if f.name == "stream_detector_feature_drift"
               for s in f.samples}
    assert samples == {"a": pytest.approx(3.0), "b": pytest.approx(10.0)}
