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
                      "fitted_on": 101, "reference_median": 50.0,
                      "learn_ceiling": 90.0}


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


# --- per-key adaptive thresholds ------------------------------------------------------------------

from types import SimpleNamespace  # noqa: E402

from stream_detector.thresholds import (  # noqa: E402
    AdaptiveThreshold,
    ThresholdConfig,
    build_threshold_policy,
    learn_ceiling,
    reference_median,
)
from stream_detector.surprise import TailConfig  # noqa: E402

TAIL_OFF = TailConfig(enabled=False)
NO_TAIL = ThresholdConfig(tail=TAIL_OFF)  # the per-key adaptive policy (tail calibration replaces it by default)
T = 10.0  # global threshold
REF = 2.0  # median of the normal scores it was fitted on


def adaptive(**kwargs) -> AdaptiveThreshold:
    args = dict(warmup=16, history=32, min_ratio=0.5, max_ratio=2.0)
    args.update(kwargs)
    return AdaptiveThreshold(T, REF, **args)


def normal_scores(n: int, median: float, seed: int = 0) -> np.ndarray:
    """Right-skewed like reconstruction errors, with the given median."""
    return median * np.random.default_rng(seed).lognormal(0.0, 0.3, n)


CEIL = REF * float(np.exp(0.3 * 1.2815516))  # the 0.9 quantile of normal_scores(..., REF)


def feed(policy: AdaptiveThreshold, key: str, scores) -> np.ndarray:
    """One window at a time, as a stream of single-event batches; the thresholds applied."""
    return np.array([policy.assess([key], np.array([s]))[0] for s in scores])


def test_record_carries_the_reference_median():
    record = fit_quantile_threshold(np.arange(101, dtype=np.float64), 0.9)
    assert record["reference_median"] == pytest.approx(50.0)


def test_warm_up_uses_the_global_threshold_then_the_keys_own():
    policy = adaptive()
    quiet = np.full(40, 1.0)  # half the reference median
    applied = feed(policy, "k", quiet)
    assert np.all(applied[:16] == T)  # the first `warmup` windows are judged against the global threshold
    assert not policy.calibrated("other") and policy.value_for("other") == T
    assert policy.calibrated("k") and policy.calibrated_keys == 1
    assert applied[16:] == pytest.approx(T * 1.0 / REF)  # then scaled by median / reference
    assert policy.value_for("k") == pytest.approx(T * 0.5)


def test_scores_over_threshold_do_not_count_towards_warm_up():
    policy = adaptive()
    feed(policy, "k", np.full(30, 50.0))  # an anomaly from the key's very first window
    assert not policy.calibrated("k") and policy.value_for("k") == T


def test_threshold_ignores_an_anomaly_burst():
    policy = adaptive(warmup=32, history=64)
    before_scores = normal_scores(200, REF, seed=1)
    feed(policy, "k", before_scores)
    before = policy.value_for("k")
    burst = feed(policy, "k", np.full(100, 40.0))  # longer than the history
    assert np.all(burst == before)  # nothing of the burst is absorbed: the threshold does not move
    after = feed(policy, "k", normal_scores(64, REF, seed=2))
    assert after[0] == before  # it does not jump when the burst ends either
    assert policy.value_for("k") == pytest.approx(before, rel=0.15)  # only normal scores move it
    # A window history that absorbed the burst (telemanom-style) would sit at the burst's level.
    assert np.median(np.r_[before_scores, np.full(100, 40.0)][-64:]) == 40.0


@pytest.mark.parametrize("ceiling", [None, "q90"])
def test_threshold_follows_slow_drift_of_normal_scores(ceiling):
    policy = adaptive(warmup=32, history=64, max_ratio=3.0, learn_ceiling=CEIL if ceiling else None)
    n = 3000
    drift = np.linspace(1.0, 1.8, n)  # normal behaviour creeps up by 80 %
    applied = feed(policy, "k", normal_scores(n, REF, seed=3) * drift)
    assert applied[100] == pytest.approx(T, rel=0.15)
    assert applied[-300:].mean() == pytest.approx(T * drift[-300:].mean(), rel=0.05)
    segments = applied[:3000].reshape(6, 500).mean(axis=1)
    assert np.all(np.diff(segments) > 0)  # it tracks the drift as it happens


def test_a_long_fault_scoring_under_the_alert_threshold_does_not_raise_it():
    fault = np.full(400, 0.7 * T)  # over the key's learning ceiling, under its alert threshold
    with_ceiling = adaptive(warmup=32, history=64, learn_ceiling=CEIL)
    without = adaptive(warmup=32, history=64)
    for policy in (with_ceiling, without):
        feed(policy, "k", normal_scores(200, REF, seed=7))
    before = with_ceiling.value_for("k")
    applied = feed(with_ceiling, "k", fault)
    assert np.all(applied == before) and with_ceiling.value_for("k") == before
    # Learning every score under the threshold, the fault becomes the key's normal: 2x (the bound).
    feed(without, "k", fault)
    assert without.value_for("k") == pytest.approx(2.0 * T)


@pytest.mark.parametrize("scale", [0.7, 1.0, 1.6])
def test_the_keys_level_is_its_normal_median_although_its_history_is_cut_at_the_ceiling(scale):
    policy = adaptive(warmup=64, history=128, learn_ceiling=CEIL)
    applied = feed(policy, "k", normal_scores(3000, REF * scale, seed=8))
    assert applied[-1000:].mean() == pytest.approx(T * scale, rel=0.06)


def test_a_ceiling_above_the_threshold_cuts_the_history_at_the_threshold():
    policy = adaptive(learn_ceiling=3 * T)
    assert policy.learn_fraction == 1.0 and policy.level_quantile == 0.5
    with pytest.raises(ValueError):
        adaptive(learn_ceiling=REF / 2)  # below the reference median: not a ceiling


def test_threshold_stays_within_bounds():
    policy = adaptive(min_ratio=0.5, max_ratio=2.0)
    low = feed(policy, "quiet", np.full(100, 0.01))
    assert low.min() == pytest.approx(0.5 * T)
    n = 4000
    high = feed(policy, "noisy", normal_scores(n, REF, seed=4) * np.linspace(1.0, 6.0, n))
    assert high.max() == pytest.approx(2.0 * T)
    assert np.all((high >= 0.5 * T - 1e-9) & (high <= 2.0 * T + 1e-6))


def test_a_sudden_jump_of_the_normal_level_is_not_learned():
    policy = adaptive()
    feed(policy, "k", normal_scores(64, REF, seed=5))
    level = policy.value_for("k")
    feed(policy, "k", np.full(200, 5.0 * level))  # beyond the threshold: an incident, not a new normal
    assert policy.value_for("k") == level


@pytest.mark.parametrize("ceiling", [None, "q90"])
def test_batching_does_not_change_decisions(ceiling):
    rng = np.random.default_rng(6)
    keys = [f"k{i}" for i in rng.integers(0, 7, 3000)]
    medians = {f"k{i}": 0.5 + 0.5 * i for i in range(7)}
    scores = np.array([medians[k] * rng.lognormal(0, 0.4) for k in keys])
    scores[rng.random(3000) < 0.02] *= 20  # some anomalies
    one_by_one = adaptive(learn_ceiling=CEIL if ceiling else None)
    expected = np.array([one_by_one.assess([k], scores[i:i + 1])[0] for i, k in enumerate(keys)])
    batched = adaptive(learn_ceiling=CEIL if ceiling else None)
    got, start = [], 0
    for size in rng.integers(1, 300, 100):  # random micro-batches, a key often several times in one
        got.append(batched.assess(keys[start:start + size], scores[start:start + size]))
        start += size
        if start >= len(keys):
            break
    got = np.concatenate(got)
    np.testing.assert_array_equal(got, expected[:len(got)])
    assert batched.exceeds(keys[:5], scores[:5]).dtype == bool


def test_evicted_key_state_is_dropped_and_warms_up_again():
    policy = adaptive()
    feed(policy, "k", np.full(20, 1.0))
    assert policy.calibrated("k") and "k" in policy and len(policy) == 1
    policy.evict("k")
    assert "k" not in policy and len(policy) == 0 and policy.calibrated_keys == 0
    assert policy.value_for("k") == T
    assert feed(policy, "k", [1.0])[0] == T  # back to the global threshold
    policy.evict("never-seen")  # harmless


def test_state_per_key_is_small_and_fixed():
    policy = AdaptiveThreshold(T, REF)  # the defaults
    assert policy.bytes_per_key <= 2048 - 512  # leaves room for an incident's state within 2 KB
    for i in range(3000):
        policy.assess([f"k{i}"], np.array([1.0]))
    assert len(policy) == 3000
    for i in range(3000):
        policy.evict(f"k{i}")
    rows_before = policy._ring.shape[0]
    for i in range(3000):  # freed rows are reused: no growth for the same number of live keys
        policy.assess([f"n{i}"], np.array([1.0]))
    assert policy._ring.shape[0] == rows_before


def test_non_finite_scores_are_never_absorbed():
    policy = adaptive()
    applied = feed(policy, "k", [np.nan, np.inf] * 20)
    assert np.all(applied == T) and not policy.calibrated("k")


@pytest.mark.parametrize("kwargs", [dict(warmup=0), dict(warmup=40, history=32), dict(min_ratio=0.0),
                                    dict(min_ratio=1.5), dict(max_ratio=0.9), dict(max_ratio=math.inf)])
def test_rejects_bad_adaptive_settings(kwargs):
    with pytest.raises(ValueError):
        adaptive(**kwargs)


def _artifact(threshold_record=None, training=None, value=T):
    return SimpleNamespace(threshold=value, version="v", metadata={"threshold": threshold_record or {},
                                                                   "training": training or {}})


def test_policy_built_from_an_artifact():
    record = {"method": "quantile", "value": T, "reference_median": REF}
    policy = build_threshold_policy(_artifact(record), NO_TAIL)
    assert isinstance(policy, AdaptiveThreshold) and policy.value == T and policy.reference_median == REF
    config = ThresholdConfig(warmup=8, history=16, min_ratio=0.8, max_ratio=1.25, override=4.0, tail=TAIL_OFF)
    policy = build_threshold_policy(_artifact(record), config)
    assert (policy.value, policy.warmup, policy.history, policy.min_ratio, policy.max_ratio) == (4.0, 8, 16, 0.8, 1.25)
    assert type(build_threshold_policy(_artifact(record), ThresholdConfig(adaptive=False, tail=TAIL_OFF))) \
        is GlobalThreshold
    # No reference median, a supervised (F1) threshold, or a non-positive threshold: the global one.
    assert type(build_threshold_policy(_artifact({"method": "quantile", "value": T}), NO_TAIL)) is GlobalThreshold
    assert type(build_threshold_policy(_artifact({"method": "max_f1", "value": 0.5, "reference_median": 0.1}))) \
        is GlobalThreshold
    assert type(build_threshold_policy(_artifact(record, value=-1.0))) is GlobalThreshold


def test_the_learning_ceiling_comes_from_the_artifact():
    policy = build_threshold_policy(_artifact({"method": "quantile", "value": T, "reference_median": REF,
                                               "learn_ceiling": 4.0}), NO_TAIL)
    assert policy.learn_fraction == pytest.approx(4.0 / T) and policy.level_quantile == pytest.approx(0.5 / 0.9)
    assert learn_ceiling({"training": {"val_score_quantiles": {"0.9": 3.0}}}, REF) == 3.0  # older artifacts
    assert learn_ceiling({}, REF) is None
    assert learn_ceiling({"threshold": {"learn_ceiling": 1.0}}, REF) is None  # under the median: ignored


def test_reference_median_of_older_artifacts_comes_from_training_quantiles():
    assert reference_median({"threshold": {}, "training": {"val_score_quantiles": {"0.5": 1.5}}}) == 1.5
    assert reference_median({"threshold": {"reference_median": 2.5}}) == 2.5
    assert reference_median({"threshold": {"reference_median": 0.0}}) is None
    assert reference_median({}) is None


def test_global_threshold_assess_and_evict():
    t = GlobalThreshold(2.0)
    np.testing.assert_array_equal(t.assess(["a", "b"], np.float32([1, 3])), [2.0, 2.0])
    t.evict("a")
    assert t.calibrated_keys == 0
