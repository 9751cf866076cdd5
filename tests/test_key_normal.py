"""Each key judged against its own normal (stream_detector/calibration.py), and idle close by cadence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stream_detector.artifacts import load_artifact, save_artifact
from stream_detector.calibration import KeyNormal, KeyNormalConfig
from stream_detector.detector import Detector, RawRecord
from stream_detector.events import Event, encode_event
from stream_detector.incidents import AlertPolicy, IncidentTracker, WindowInfo
from stream_detector.models import build_model
from stream_detector.preprocessing import ScalerParams
from stream_detector.profiles import SensorProfile
from stream_detector.scoring import ModelRunner
from stream_detector.thresholds import GlobalThreshold, fit_quantile_threshold
from trainer.fit import score_windows, windows_from_events

WINDOW = 8
CHANNELS = ("flow", "temperature")
T0 = 1_767_225_600.0
CONFIG = KeyNormalConfig(blocks=4, scale=True)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("lstm_ae", {"n_features": len(CHANNELS), "window": WINDOW, "hidden": 8, "latent": 4})
    scaler = ScalerParams.fit(np.random.default_rng(0).normal(0.0, 1.0, (200, len(CHANNELS))))
    threshold = fit_quantile_threshold(np.linspace(0.0, 2.0, 101), 0.99)
    root = tmp_path_factory.mktemp("model")
    save_artifact(root, model, SensorProfile(CHANNELS), scaler, threshold,
                  training={"key_normal": CONFIG.to_dict()}, version="20260101T000000Z-abcdef")
    return load_artifact(root)


def series(n: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    return np.c_[32.0 + np.sin(t / 5.0) + rng.normal(0, 0.2, n), 70.0 + 0.5 * np.cos(t / 7.0) + rng.normal(0, 0.1, n)]


def records(key: str, values: np.ndarray, start: float = T0, step: float = 1.0) -> list[RawRecord]:
    return [RawRecord(encode_event(key, f"{key}-{i}", start + i * step, dict(zip(CHANNELS, map(float, row)))))
            for i, row in enumerate(values)]


def detector_for(artifact, **kwargs) -> Detector:
    runner = ModelRunner(artifact, device="cpu")
    return Detector(artifact, runner.score, threshold=GlobalThreshold(artifact.threshold), clock=lambda: T0, **kwargs)


def test_a_key_shifted_and_rescaled_per_channel_gets_the_same_scores(artifact):
    values = series(200)
    other = values * np.array([4.0, 1.3]) + np.array([95.0, 20.0])  # another regime: flow 127, temperature 111
    detector = detector_for(artifact)
    a, _ = detector.process(records("pump-a", values))
    b, _ = detector.process(records("pump-b", other))
    assert len(a) == len(b) == 200 - WINDOW + 1
    np.testing.assert_allclose([d.score for d in b], [d.score for d in a], rtol=2e-3, atol=2e-4)


def test_centring_only_makes_a_key_offset_by_constants_score_the_same(tmp_path):
    torch.manual_seed(0)
    model = build_model("lstm_ae", {"n_features": len(CHANNELS), "window": WINDOW, "hidden": 8, "latent": 4})
    scaler = ScalerParams.fit(np.random.default_rng(0).normal(0.0, 1.0, (200, len(CHANNELS))))
    save_artifact(tmp_path, model, SensorProfile(CHANNELS), scaler, fit_quantile_threshold(np.linspace(0, 2, 101), 0.99),
                  training={"key_normal": KeyNormalConfig(blocks=4, scale=False).to_dict()})
    detector = detector_for(load_artifact(tmp_path))
    values = series(150, seed=2)
    a, _ = detector.process(records("a", values))
    b, _ = detector.process(records("b", values + np.array([95.0, 20.0])))
    np.testing.assert_allclose([d.score for d in b], [d.score for d in a], rtol=2e-3, atol=2e-4)


def test_without_a_per_key_normal_the_other_regime_scores_differently(tmp_path):
    torch.manual_seed(0)
    model = build_model("lstm_ae", {"n_features": len(CHANNELS), "window": WINDOW, "hidden": 8, "latent": 4})
    scaler = ScalerParams.fit(series(200))
    save_artifact(tmp_path, model, SensorProfile(CHANNELS), scaler, fit_quantile_threshold(np.linspace(0, 2, 101), 0.99))
    plain = load_artifact(tmp_path)
    detector = detector_for(plain)
    assert detector.key_normal is None
    values = series(100)
    a, _ = detector.process(records("a", values))
    b, _ = detector.process(records("b", values * 4.0 + 95.0))
    assert np.median([d.score for d in b]) > 10 * np.median([d.score for d in a])


def test_the_trainer_scales_windows_exactly_as_the_detector(artifact):
    values = series(120, seed=3)
    detector = detector_for(artifact)
    decisions = []
    for part in np.array_split(np.arange(120), 7):  # batching must not matter either
        d, _ = detector.process(records("k", values)[part[0]:part[-1] + 1])
        decisions += d
    events = [Event("k", f"k-{i}", T0 + i, tuple(map(float, row))) for i, row in enumerate(values)]
    ws = windows_from_events(events, artifact.profile, WINDOW, key_normal=CONFIG)
    scores, _ = score_windows(artifact.model, artifact.scaler, ws.windows, torch.device("cpu"))
    np.testing.assert_allclose([d.score for d in decisions], scores, rtol=1e-5, atol=1e-6)


def warmed_up(config: KeyNormalConfig = CONFIG) -> KeyNormal:
    normal = KeyNormal(2, WINDOW, config)
    rng = np.random.default_rng(0)
    for _ in range(config.blocks):
        normal.learn_block("k", rng.normal([10.0, -5.0], [2.0, 0.5], (WINDOW, 2)))
    return normal


def test_the_level_and_spread_are_learned_from_the_warm_up():
    level, spread = warmed_up().level_and_spread("k")
    assert abs(level[0] - 10.0) < 1.0 and 1.2 < spread[0] < 3.0
    assert abs(level[1] + 5.0) < 0.3 and 0.3 < spread[1] < 0.75


def test_a_fault_after_the_warm_up_moves_the_level_by_at_most_drift_times_cap_spreads_per_block():
    normal = warmed_up()
    level, spread = normal.level_and_spread("k")
    for n in range(1, 6):
        normal.learn_block("k", np.full((WINDOW, 2), 1000.0))
        moved, spread_after = normal.level_and_spread("k")
        np.testing.assert_allclose(moved - level, n * CONFIG.drift * CONFIG.drift_cap * spread)
        np.testing.assert_array_equal(spread_after, spread)  # the spread is never re-learned


def test_the_level_follows_a_slow_drift():
    normal = warmed_up()
    level, spread = normal.level_and_spread("k")
    rng = np.random.default_rng(1)
    target = level.copy()
    for _ in range(300):  # a creep of 0.05 spreads per block, 15 spreads in all
        target += 0.05 * spread
        normal.learn_block("k", rng.normal(target, spread, (WINDOW, 2)))
    followed, _ = normal.level_and_spread("k")
    assert np.all(np.abs(followed - target) < 1.5 * spread)


def test_a_channel_constant_during_the_warm_up_gets_a_floored_spread():
    normal = KeyNormal(1, WINDOW, CONFIG)
    normal.learn_block("k", np.full((WINDOW, 1), 230.0))
    _, spread = normal.level_and_spread("k")
    assert spread[0] == pytest.approx(230.0 * CONFIG.rel_floor)


def test_the_learned_normal_survives_a_restart_in_the_keys_snapshot(artifact):
    values = series(80, seed=5)
    first = detector_for(artifact)
    first.process([RawRecord(r.value, b"k", T0, 0, i) for i, r in enumerate(records("k", values[:60]))])
    snapshots = {key: first.snapshot(key, slot) for key, slot in first.windows.drain_touched().items()}
    second = detector_for(artifact, restore=snapshots.get)
    rest = [RawRecord(r.value, b"k", T0, 0, 60 + i) for i, r in enumerate(records("k", values)[60:])]
    restored, _ = second.process(rest)
    expected, _ = first.process(rest)
    assert second.key_normal.learned_blocks("k") == first.key_normal.learned_blocks("k") == CONFIG.blocks
    np.testing.assert_allclose([d.score for d in restored], [d.score for d in expected], rtol=1e-5)


def test_a_snapshot_normal_for_another_configuration_is_not_taken_over():
    normal = KeyNormal(2, WINDOW, CONFIG)
    normal.learn_block("k", np.ones((WINDOW, 2)))
    blob = normal.export_key("k")
    assert KeyNormal(2, WINDOW, CONFIG).adopt_key("k", blob)
    assert not KeyNormal(2, WINDOW, KeyNormalConfig(blocks=8)).adopt_key("k", blob)
    assert not KeyNormal(2, WINDOW, KeyNormalConfig(blocks=4, scale=False)).adopt_key("k", blob)
    assert not KeyNormal(3, WINDOW, CONFIG).adopt_key("k", blob)


def test_evicted_keys_drop_their_normal(artifact):
    detector = detector_for(artifact, max_keys=1)
    detector.process(records("a", series(40)))
    assert "a" in detector.key_normal
    detector.process(records("b", series(3)))
    assert "a" not in detector.key_normal


def test_an_artifact_without_the_setting_is_served_without_per_key_scaling():
    assert not KeyNormalConfig.from_metadata({"training": {}}).enabled
    assert KeyNormalConfig.from_metadata({"training": {"key_normal": {"blocks": 8}}}) == KeyNormalConfig(blocks=8)


# --- idle close relative to the key's cadence ------------------------------------------------------

CONTEXT = {"model_version": "v", "model_kind": "lstm_ae", "window_size": WINDOW}


def info(i: int, t: float) -> WindowInfo:
    return WindowInfo(f"k-{i}", t, 5.0, 1.0, (("flow", 5.0),))


def test_an_hourly_keys_incident_is_not_closed_as_idle_after_600_s():
    tracker = IncidentTracker(AlertPolicy(min_windows=1, idle_close_s=600.0))
    now = T0
    opened = tracker.observe("k", True, info(0, now), now, CONTEXT, gap_s=3600.0)
    assert opened["state"] == "open"
    assert tracker.sweep_idle(now + 3601.0, CONTEXT) == []  # the next hourly event is simply not due yet
    tracker.observe("k", True, info(1, now + 3600), now + 3600, CONTEXT, gap_s=3600.0)
    assert tracker.sweep_idle(now + 3600 + 3 * 3600, CONTEXT) == []
    closed = tracker.sweep_idle(now + 3600 + 4 * 3600 + 1, CONTEXT)  # four of its gaps without an event
    assert [m["incident"]["close_reason"] for m in closed] == ["idle"]


def test_a_fast_keys_incident_still_closes_after_idle_close_s():
    tracker = IncidentTracker(AlertPolicy(min_windows=1, idle_close_s=600.0))
    tracker.observe("slow", True, info(0, T0), T0, CONTEXT, gap_s=3600.0)
    tracker.observe("fast", True, info(0, T0), T0 + 1, CONTEXT, gap_s=1.0)
    closed = tracker.sweep_idle(T0 + 602, CONTEXT)
    assert [m["key"] for m in closed] == ["fast"]  # the slow key ahead of it is kept, not a stop sign


def test_the_detector_gives_the_incident_its_keys_event_time_cadence(artifact):
    now = [T0]
    runner = ModelRunner(artifact, device="cpu")
    detector = Detector(artifact, runner.score, threshold=GlobalThreshold(0.0), clock=lambda: now[0],
                        alerting=AlertPolicy(min_windows=1, idle_close_s=600.0))
    detector.process(records("hourly", series(WINDOW + 2), step=3600.0))
    assert detector.incidents.get("hourly").idle_after == pytest.approx(4 * 3600.0)
    now[0] += 1200.0
    detector.process(records("other", series(WINDOW)))
    assert detector.drain_closed() == []
