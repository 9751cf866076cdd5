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


@pytest.mark.parametrize("values_tail", ["normal", "empirical"])
def test_keys_in_different_regimes_get_the_same_surprise(values_tail):
    """A key whose scores and values are another's times 100 plus an offset is judged identically."""
    rng = np.random.default_rng(1)
    n = 600
    scores = normal_scores(rng, n)
    scores[450] = 3.0  # one anomaly
    values = rng.normal(0, 1, (n, 2))
    values[500] = (8.0, 0.0)
    policy = TailCalibration(GLOBAL, 2, TailConfig(warmup=100, horizon=400, values_tail=values_tail))
    keys = ["quiet", "loud"] * n
    both_scores = np.repeat(scores, 2) * np.tile([1.0, 100.0], n)
    both_values = np.repeat(values, 2, axis=0) * np.tile([[1.0], [100.0]], (n, 1)) + np.tile([[0.0], [50.0]], (n, 1))
    policy.judge(keys, both_scores, both_values)
    quiet, loud = policy.last_surprise[0::2], policy.last_surprise[1::2]
    np.testing.assert_allclose(quiet, loud, rtol=1e-6, atol=1e-9)
    assert quiet[450] > 10 and quiet[500] > 10 and np.median(quiet[100:]) < 1


@pytest.mark.parametrize("values_tail", ["normal", "empirical"])
def test_decisions_do_not_depend_on_batching(values_tail):
    rng = np.random.default_rng(2)
    keys = [f"k{i % 3}" for i in range(900)]
    scores = normal_scores(rng, 900)
    scores[700:720] = 4.0
    values = rng.normal(0, 1, (900, 3))
    values[300::40, 1] += 15.0  # recurring spikes, which the empirical tail learns
    config = TailConfig(warmup=50, horizon=200, values_tail=values_tail)
    whole = TailCalibration(GLOBAL, 3, config)
    limits = whole.judge(keys, scores, values)
    one = TailCalibration(GLOBAL, 3, config)
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


@pytest.mark.parametrize("values_tail", ["normal", "empirical"])
def test_a_snapshot_carries_a_keys_statistics_to_another_worker(values_tail):
    rng = np.random.default_rng(7)
    config = TailConfig(warmup=50, horizon=100, values_tail=values_tail)
    first = TailCalibration(GLOBAL, 2, config)
    history = rng.normal(0, 1, (200, 2))
    history[60::30, 0] += 12.0  # spikes: the empirical tail's shares are part of the state
    first.judge(["k"] * 200, normal_scores(rng, 200), history)
    second = TailCalibration(GLOBAL, 2, config)
    assert second.adopt_key("k", first.export_key("k")) and second.calibrated("k")
    scores, values = normal_scores(rng, 20), rng.normal(0, 1, (20, 2))
    np.testing.assert_array_equal(first.judge(["k"] * 20, scores, values), second.judge(["k"] * 20, scores, values))
    other = TailCalibration(GLOBAL, 2, TailConfig(warmup=50, horizon=300, values_tail=values_tail))
    assert not other.adopt_key("k", first.export_key("k"))  # learned under another horizon
    assert not TailCalibration(GLOBAL, 3, config).adopt_key("k", first.export_key("k"))
    other_tail = "normal" if values_tail == "empirical" else "empirical"
    assert not TailCalibration(GLOBAL, 2, TailConfig(warmup=50, horizon=100, values_tail=other_tail)).adopt_key(
        "k", first.export_key("k"))  # learned with another values tail


def spiky_values(rng, n, every=50, height=20.0):
    """Unit noise with a one-event spike every ``every`` events from event 200 on."""
    values = rng.normal(0, 1, (n, 1))
    values[200::every, 0] += height
    return values


@pytest.mark.parametrize("after", [1, 4])
def test_recurring_spikes_stop_being_surprising_after_spike_after_occurrences(after):
    """The Gaussian on the running spread alerts on every spike of the same size however often it
    recurs; the empirical tail on the first ``spike_after`` only."""
    surprise = {}
    for tail in ("normal", "empirical"):
        rng = np.random.default_rng(8)
        values = spiky_values(rng, 1200)
        config = TailConfig(warmup=100, horizon=2000, values_tail=tail, spike_after=after)
        policy = TailCalibration(GLOBAL, 1, config)
        policy.judge(["k"] * 1200, np.ones(1200), values)
        surprise[tail] = policy.last_surprise[200::50]
    assert (surprise["normal"] >= 8).all()
    assert (surprise["empirical"][:after] >= 8).all() and (surprise["empirical"][after:] < 8 * 0.5).all()


def test_a_jump_beyond_every_past_spike_is_still_surprising():
    rng = np.random.default_rng(9)
    values = spiky_values(rng, 1001)
    values[1000, 0] = 200.0  # ten times the spikes
    policy = TailCalibration(GLOBAL, 1, TailConfig(warmup=100, horizon=2000, values_tail="empirical"))
    limits = policy.judge(["k"] * 1001, np.ones(1001), values)
    over = 1.0 > limits
    assert over[1000] and over[200:400:50].all() and not over[450:1000].any()


def test_a_shift_is_judged_by_the_normal_tail_after_spike_width_windows():
    """Far-out values that last longer than a spike are a shift: after ``spike_width`` windows they
    are judged by the Gaussian tail again, however often the key spiked that far before."""
    rng = np.random.default_rng(10)
    values = spiky_values(rng, 1100)
    values[1000:1100, 0] += 20.0  # the level of the spikes, now held
    config = TailConfig(warmup=100, horizon=2000, values_tail="empirical", spike_width=3)
    policy = TailCalibration(GLOBAL, 1, config)
    limits = policy.judge(["k"] * 1100, np.ones(1100), values)
    over = 1.0 > limits
    assert not over[1000:1003].any() and over[1003:1010].all()


def test_the_empirical_tail_never_raises_surprise_and_keeps_an_unseen_level():
    """The empirical tail only forgives what the key's past reached: a value beyond anything seen
    keeps its Gaussian surprise, and no window is more surprising than under the Gaussian tail."""
    rng = np.random.default_rng(11)
    values = rng.normal(0, 1, (600, 2))
    values[500, 1] = 9.0
    out = {}
    for tail in ("normal", "empirical"):
        policy = TailCalibration(GLOBAL, 2, TailConfig(warmup=100, horizon=500, values_tail=tail))
        policy.judge(["k"] * 600, np.ones(600), values)
        out[tail] = policy.last_surprise.copy()
    assert (out["empirical"] <= out["normal"] + 1e-12).all()
    assert out["empirical"][500] == pytest.approx(out["normal"][500], rel=1e-12) and out["normal"][500] >= 8


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
                                 dict(warmup=50, horizon=20), dict(over_weight=2.0),
                                 dict(values_tail="laplace"), dict(spike_width=-1)])
def test_invalid_tail_settings_are_refused(bad):
    with pytest.raises(ValueError):
        TailConfig(**bad)



def spiky_scores(rng, n, every=50, height=3.0):
    """Model scores around 1 (spread 0.1) with a one-window spike every ``every`` windows from window 200 on."""
    scores = normal_scores(rng, n)
    scores[200::every] += height
    return scores


@pytest.mark.parametrize("after", [1, 4])
def test_recurring_score_spikes_stop_being_surprising_with_the_empirical_score_tail(after):
    """The model-score check's Gaussian tail alerts on every score spike of the same size however
    often it recurs; the empirical score tail on the first ``spike_after`` only."""
    surprise = {}
    for tail in ("normal", "empirical"):
        rng = np.random.default_rng(12)
        scores = spiky_scores(rng, 1200)
        config = TailConfig(warmup=100, horizon=2000, values=False, score_tail=tail, spike_after=after)
        policy = TailCalibration(GLOBAL, 1, config)
        policy.judge(["k"] * 1200, scores, None)
        surprise[tail] = policy.last_surprise[200::50]
    assert (surprise["normal"] >= 8).all()
    assert (surprise["empirical"][:after] >= 8).all() and (surprise["empirical"][after:] < 8 * 0.5).all()


def test_a_score_beyond_every_past_spike_and_a_held_high_score_still_alert_with_the_empirical_score_tail():
    rng = np.random.default_rng(13)
    scores = spiky_scores(rng, 1300)
    scores[1000] = 30.0  # ten times the spikes
    scores[1100:1200] += 3.0  # the spikes' height, now held: a fault, not a spike
    config = TailConfig(warmup=100, horizon=2000, values=False, score_tail="empirical", spike_width=3)
    policy = TailCalibration(GLOBAL, 1, config)
    over = scores > policy.judge(["k"] * 1300, scores, None)
    assert over[1000] and not over[450:1000].any()
    assert not over[1100:1103].any() and over[1103:1110].all()


def test_the_empirical_score_tail_forgives_recurring_spikes_only_and_keeps_an_unseen_level():
    out = {}
    for tail in ("normal", "empirical"):
        rng = np.random.default_rng(14)
        scores = spiky_scores(rng, 800, every=37)
        scores[600] = 40.0  # beyond every level (in spreads) the spikes reached, the first ones included
        policy = TailCalibration(GLOBAL, 1, TailConfig(warmup=100, horizon=500, values=False, score_tail=tail))
        policy.judge(["k"] * 800, scores, None)
        out[tail] = policy.last_surprise.copy()
    spikes = np.arange(200, 800, 37)
    assert (out["empirical"][spikes] <= out["normal"][spikes] + 1e-12).all()
    assert (out["empirical"][spikes] < out["normal"][spikes] - 1).any()
    assert out["empirical"][600] >= 8 and out["normal"][600] >= 8


def test_decisions_with_the_empirical_score_tail_do_not_depend_on_batching():
    rng = np.random.default_rng(15)
    keys = [f"k{i % 3}" for i in range(900)]
    scores = spiky_scores(rng, 900, every=40)
    values = rng.normal(0, 1, (900, 2))
    config = TailConfig(warmup=50, horizon=200, score_tail="empirical")
    whole = TailCalibration(GLOBAL, 2, config)
    limits = whole.judge(keys, scores, values)
    single, _ = judge_one_by_one(TailCalibration(GLOBAL, 2, config), keys, scores, values)
    np.testing.assert_allclose(limits, single, rtol=1e-12)


def test_a_snapshot_carries_the_empirical_score_tail_and_is_refused_under_another_score_tail():
    rng = np.random.default_rng(16)
    config = TailConfig(warmup=50, horizon=100, score_tail="empirical")
    first = TailCalibration(GLOBAL, 2, config)
    first.judge(["k"] * 300, spiky_scores(rng, 300, every=30), rng.normal(0, 1, (300, 2)))
    second = TailCalibration(GLOBAL, 2, config)
    assert second.adopt_key("k", first.export_key("k")) and second.export_key("k") == first.export_key("k")
    scores, values = spiky_scores(rng, 40, every=7), rng.normal(0, 1, (40, 2))
    np.testing.assert_array_equal(first.judge(["k"] * 40, scores, values), second.judge(["k"] * 40, scores, values))
    assert second.bytes_per_key == TailCalibration(GLOBAL, 2, TailConfig()).bytes_per_key + 8 + 4 * 10
    assert not TailCalibration(GLOBAL, 2, TailConfig(warmup=50, horizon=100)).adopt_key("k", first.export_key("k"))
    assert not TailCalibration(GLOBAL, 2, config).adopt_key("k", TailCalibration(
        GLOBAL, 2, TailConfig(warmup=50, horizon=100)).export_key("k") or b"")


def test_an_unknown_score_tail_is_refused():
    with pytest.raises(ValueError):
        TailConfig(score_tail="laplace")


def daily(rng, periods, period=48, peak=10.0, noise=0.3):
    """A key with a period: low most of the time, a peak of ``peak`` during phases 20..29, unit-free noise."""
    phase = np.arange(periods * period) % period
    return (np.where((phase >= 20) & (phase < 30), peak, 0.0) + rng.normal(0, noise, len(phase)))[:, None]


SEASONAL = dict(warmup=100, horizon=2000, seasonal=True, season_max=60)


def test_the_seasonal_check_finds_a_keys_period_from_its_first_windows():
    rng = np.random.default_rng(20)
    policy = TailCalibration(GLOBAL, 1, TailConfig(**SEASONAL))
    values = daily(rng, 4)
    policy.judge(["k"] * 120, np.ones(120), values[:120])
    assert policy._season_period[policy._rows["k"]] == -1  # still buffering 2 x 60 + 1 windows
    policy.judge(["k"] * 72, np.ones(72), values[120:])
    assert policy._season_period[policy._rows["k"]] == 48
    noise = TailCalibration(GLOBAL, 1, TailConfig(**SEASONAL))
    noise.judge(["n"] * 192, np.ones(192), rng.normal(0, 1, (192, 1)))
    assert noise._season_period[noise._rows["n"]] == 0  # no period: the check stays silent for this key


def test_the_period_search_settles_on_the_period_not_a_multiple_of_it():
    """With room for several multiples of the period in the buffer, all peak about as high; the
    shortest is the key's period."""
    found = []
    for seed in range(5):
        rng = np.random.default_rng(30 + seed)
        phase = np.arange(400) % 48
        values = np.sin(2 * np.pi * phase / 48)[:, None] * 3.0 + rng.normal(0, 0.3, (400, 4))
        policy = TailCalibration(GLOBAL, 4, TailConfig(**{**SEASONAL, "season_max": 150, "season_max_features": 4}))
        policy.judge(["k"] * 400, np.ones(400), values)
        found.append(int(policy._season_period[policy._rows["k"]]))
    assert found == [48] * 5


def test_a_missing_peak_alerts_with_the_seasonal_check_and_not_by_the_values_alone():
    """A period without its usual peak: every value is one the key has (its low level), so the values
    check cannot see it; the same phase's learned value can."""
    rng = np.random.default_rng(21)
    values = daily(rng, 12)
    values[8 * 48 + 20:8 * 48 + 30, 0] = rng.normal(0, 0.3, 10)  # period 8: no peak
    over = {}
    for seasonal in (False, True):
        policy = TailCalibration(GLOBAL, 1, TailConfig(**{**SEASONAL, "seasonal": seasonal}))
        limits = policy.judge(["k"] * len(values), np.ones(len(values)), values)
        over[seasonal] = 1.0 > limits
    missing = np.arange(8 * 48 + 20, 8 * 48 + 30)
    assert not over[False][200:].any()
    assert over[True][missing].sum() >= 5
    assert not np.delete(over[True], missing)[200:].any()  # nothing else, the next period's peak included


def test_a_flat_stretch_where_the_key_usually_moves_alerts_with_the_seasonal_check():
    rng = np.random.default_rng(22)
    period = 48
    phase = np.arange(12 * period) % period
    values = (5.0 * np.sin(2 * np.pi * phase / period) + rng.normal(0, 0.2, len(phase)))[:, None]
    flat = np.arange(9 * period, 9 * period + period // 2)
    values[flat, 0] = 0.0  # half a period flat at the key's mean
    policy = TailCalibration(GLOBAL, 1, TailConfig(**SEASONAL))
    over = 1.0 > policy.judge(["k"] * len(values), np.ones(len(values)), values)
    assert over[flat].any() and not np.delete(over, flat)[200:].any()


def test_decisions_with_the_seasonal_check_do_not_depend_on_batching():
    rng = np.random.default_rng(23)
    a, b = daily(rng, 8), daily(rng, 8, peak=20.0)
    a[6 * 48 + 20:6 * 48 + 30] = 0.0
    keys = ["a", "b"] * len(a)
    values = np.stack([a, b], axis=1).reshape(-1, 1)
    config = TailConfig(**SEASONAL)
    whole = TailCalibration(GLOBAL, 1, config).judge(keys, np.ones(len(keys)), values)
    single, _ = judge_one_by_one(TailCalibration(GLOBAL, 1, config), keys, np.ones(len(keys)), values)
    np.testing.assert_allclose(whole, single, rtol=1e-12)
    assert (1.0 > whole).any()


@pytest.mark.parametrize("windows", [50, 300])  # while buffering, and once the period is learned
def test_a_snapshot_carries_the_seasonal_state(windows):
    rng = np.random.default_rng(24)
    values = daily(rng, 10)
    values[8 * 48 + 20:8 * 48 + 30] = 0.0
    config = TailConfig(**SEASONAL)
    first = TailCalibration(GLOBAL, 1, config)
    first.judge(["k"] * windows, np.ones(windows), values[:windows])
    second = TailCalibration(GLOBAL, 1, config)
    assert second.adopt_key("k", first.export_key("k"))
    rest = values[windows:]
    np.testing.assert_array_equal(first.judge(["k"] * len(rest), np.ones(len(rest)), rest),
                                  second.judge(["k"] * len(rest), np.ones(len(rest)), rest))
    assert not TailCalibration(GLOBAL, 1, TailConfig(**{**SEASONAL, "season_max": 50})).adopt_key(
        "k", first.export_key("k"))  # learned with another buffer
    assert not TailCalibration(GLOBAL, 1, TailConfig(**{**SEASONAL, "seasonal": False})).adopt_key(
        "k", first.export_key("k"))


def test_the_seasonal_check_costs_its_buffer_per_feature_and_key_and_only_up_to_season_max_features():
    plain = TailCalibration(GLOBAL, 3, TailConfig()).bytes_per_key
    seasonal = TailCalibration(GLOBAL, 3, TailConfig(seasonal=True, season_max=300, season_max_features=3)).bytes_per_key
    assert seasonal - plain == 16 + 16 * 3 + 4 * 601 * 3
    # by default only univariate models get the check (and its memory)
    assert TailCalibration(GLOBAL, 3, TailConfig(seasonal=True)).bytes_per_key == plain
    one = TailCalibration(GLOBAL, 1, TailConfig(seasonal=True)).bytes_per_key
    assert one - TailCalibration(GLOBAL, 1, TailConfig()).bytes_per_key == 16 + 16 + 4 * 601


@pytest.mark.parametrize("bad", [dict(season_max=1), dict(season_min_acf=0.0), dict(season_rate=1.5),
                                 dict(season_max_features=0)])
def test_invalid_seasonal_settings_are_refused(bad):
    with pytest.raises(ValueError):
        TailConfig(**bad)
