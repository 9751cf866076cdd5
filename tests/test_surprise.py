"""Per-key tail calibration: every key judged against its own running statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stream_detector.surprise import TailCalibration, TailConfig, surprise_two_sided, surprise_upper

GLOBAL = 5.0  # the artifact's threshold, used during a key's warm-up


def judge_one_by_one(policy: TailCalibration, keys, scores, values=None):
    limits, surprise = [], []
    for i, key in enumerate(keys):
        v = None if values is None else values[i:i + 1]
        limits.append(policy.judge([key], np.array([scores[i]]), v)[0])
        surprise.append(policy.last_surprise[0])
    return np.array(limits), np.array(surprise)


def normal_scores(rng, n, level=1.0, spread=0.1):
    return np.abs(rng.normal(level, spread, n))


def test_surprise_is_minus_log10_of_the_normal_tail():
    assert surprise_upper(np.array([0.0]))[0] == pytest.approx(math.log10(2))
    assert surprise_upper(np.array([3.0]))[0] == pytest.approx(-math.log10(0.0013498980316301), rel=1e-9)
    assert np.isfinite(surprise_upper(np.array([1e9, np.inf])).all())  # capped, never infinite
    assert surprise_two_sided(np.array([0.0]), 4)[0] == 0.0  # never negative


def test_warm_up_judges_by_the_global_threshold():
    policy = TailCalibration(GLOBAL, 1, TailConfig(warmup=50, horizon=100))
    limits = policy.judge(["k"] * 49, np.full(49, 1.0), None)
    assert (limits == GLOBAL).all() and not policy.calibrated("k")
    policy.judge(["k"], np.array([1.0]), None)
    assert policy.calibrated("k") and policy.calibrated_keys == 1


def test_severity_is_surprise_over_the_alert_level():
    rng = np.random.default_rng(0)
    config = TailConfig(warmup=100, horizon=500, values=False)
    policy = TailCalibration(GLOBAL, 1, config)
    policy.judge(["k"] * 300, normal_scores(rng, 300), None)
    scores = np.array([1.05, 1.3, 2.5])
    limits, surprise = judge_one_by_one(policy, ["k"] * 3, scores)
    np.testing.assert_allclose(scores / limits, surprise / config.alert_surprise, rtol=1e-9)
    assert (scores > limits).tolist() == [False, False, True]


def test_keys_in_different_regimes_get_the_same_surprise():
    """A key whose scores and values are another's times 100 plus an offset is judged identically."""
    rng = np.random.default_rng(1)
    n = 600
    scores = normal_scores(rng, n)
    scores[450] = 3.0  # one anomaly
    values = rng.normal(0, 1, (n, 2))
    values[500] = (8.0, 0.0)
    policy = TailCalibration(GLOBAL, 2, TailConfig(warmup=100, horizon=400))
    keys = ["quiet", "loud"] * n
    both_scores = np.repeat(scores, 2) * np.tile([1.0, 100.0], n)
    both_values = np.repeat(values, 2, axis=0) * np.tile([[1.0], [100.0]], (n, 1)) + np.tile([[0.0], [50.0]], (n, 1))
    policy.judge(keys, both_scores, both_values)
    quiet, loud = policy.last_surprise[0::2], policy.last_surprise[1::2]
    np.testing.assert_allclose(quiet, loud, rtol=1e-6, atol=1e-9)
    assert quiet[450] > 10 and quiet[500] > 10 and np.median(quiet[100:]) < 1


def test_decisions_do_not_depend_on_batching():
    rng = np.random.default_rng(2)
    keys = [f"k{i % 3}" for i in range(900)]
    scores = normal_scores(rng, 900)
    scores[700:720] = 4.0
    values = rng.normal(0, 1, (900, 3))
    whole = TailCalibration(GLOBAL, 3, TailConfig(warmup=50, horizon=200))
    limits = whole.judge(keys, scores, values)
    one = TailCalibration(GLOBAL, 3, TailConfig(warmup=50, horizon=200))
    single, _ = judge_one_by_one(one, keys, scores, values)
    np.testing.assert_allclose(limits, single, rtol=1e-12)


def test_a_step_change_alerts_then_becomes_the_keys_new_normal():
    rng = np.random.default_rng(3)
    policy = TailCalibration(GLOBAL, 1, TailConfig(warmup=100, horizon=200, values=False, over_weight=1.0))
    policy.judge(["k"] * 400, normal_scores(rng, 400), None)
    step = normal_scores(rng, 2000, level=2.0)
    limits = policy.judge(["k"] * 2000, step, None)
    over = step > limits
    assert over[0] and not over[-500:].any()


def test_a_long_fault_is_learned_slowly():
    """Winsorised updates, slowed while the key alerts, keep a fault 300 windows long over the
    threshold for most of it; plain running statistics learn it as normal within a few windows."""
    outcomes = {}
    for weight, clip in ((0.1, 3.0), (1.0, 0.0)):
        rng = np.random.default_rng(4)
        config = TailConfig(warmup=100, horizon=300, values=False, over_weight=weight, learn_clip=clip)
        policy = TailCalibration(GLOBAL, 1, config)
        policy.judge(["k"] * 400, normal_scores(rng, 400), None)
        fault = normal_scores(rng, 300, level=2.0)
        outcomes[weight] = (fault > policy.judge(["k"] * 300, fault, None)).mean()
    assert outcomes[0.1] > 0.5 and outcomes[1.0] < 0.1


def test_the_values_check_sees_a_level_the_model_does_not():
    rng = np.random.default_rng(5)
    policy = TailCalibration(GLOBAL, 2, TailConfig(warmup=100, horizon=500))
    values = rng.normal(0, 1, (301, 2))
    values[300, 1] = 9.0
    scores = np.full(301, 1.0)  # a model that sees nothing
    limits = policy.judge(["k"] * 301, scores, values)
    assert scores[300] > limits[300] and not (scores[:300] > limits[:300]).any()
    off = TailCalibration(GLOBAL, 2, TailConfig(warmup=100, horizon=500, values=False))
    assert not (scores > off.judge(["k"] * 301, scores, values)).any()


def test_a_non_finite_score_is_not_learned():
    rng = np.random.default_rng(6)
    policy = TailCalibration(GLOBAL, 1, TailConfig(warmup=50, horizon=100, values=False))
    policy.judge(["k"] * 100, normal_scores(rng, 100), None)
    before = policy.export_key("k")
    policy.judge(["k", "k"], np.array([np.nan, np.inf]), None)
    assert policy.export_key("k") == before


def test_a_snapshot_carries_a_keys_statistics_to_another_worker():
    rng = np.random.default_rng(7)
    config = TailConfig(warmup=50, horizon=100)
    first = TailCalibration(GLOBAL, 2, config)
    first.judge(["k"] * 200, normal_scores(rng, 200), rng.normal(0, 1, (200, 2)))
    second = TailCalibration(GLOBAL, 2, config)
    assert second.adopt_key("k", first.export_key("k")) and second.calibrated("k")
    scores, values = normal_scores(rng, 20), rng.normal(0, 1, (20, 2))
    np.testing.assert_array_equal(first.judge(["k"] * 20, scores, values), second.judge(["k"] * 20, scores, values))
    other = TailCalibration(GLOBAL, 2, TailConfig(warmup=50, horizon=300))
    assert not other.adopt_key("k", first.export_key("k"))  # learned under another horizon
    assert not TailCalibration(GLOBAL, 3, config).adopt_key("k", first.export_key("k"))


def test_an_expected_change_restarts_the_keys_warm_up():
    policy = TailCalibration(GLOBAL, 1, TailConfig(warmup=10, horizon=20))
    policy.judge(["k"] * 10, np.ones(10), None)
    policy.restart_warmup("k")
    assert not policy.calibrated("k") and policy.judge(["k"], np.array([1.0]), None)[0] == GLOBAL


def test_an_evicted_key_warms_up_again():
    policy = TailCalibration(GLOBAL, 1, TailConfig(warmup=10, horizon=20))
    policy.judge(["k"] * 10, np.ones(10), None)
    assert policy.calibrated_keys == 1
    policy.evict("k")
    assert policy.calibrated_keys == 0 and "k" not in policy and policy.value_for("k") == GLOBAL


@pytest.mark.parametrize("bad", [dict(alert_surprise=0.0), dict(horizon=1), dict(warmup=1),
                                 dict(warmup=50, horizon=20), dict(over_weight=2.0)])
def test_invalid_tail_settings_are_refused(bad):
    with pytest.raises(ValueError):
        TailConfig(**bad)

