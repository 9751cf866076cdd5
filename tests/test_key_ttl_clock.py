"""The key TTL runs on a monotonic clock: a step of the wall clock evicts no key."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from stream_detector.artifacts import load_artifact, save_artifact
from stream_detector.detector import Detector, RawRecord
from stream_detector.events import encode_event
from stream_detector.models import build_model
from stream_detector.preprocessing import ScalerParams
from stream_detector.profiles import SensorProfile
from stream_detector.settings import Settings
from stream_detector.thresholds import GlobalThreshold, fit_quantile_threshold
from stream_detector.worker import DetectorService

CHANNELS = ("a", "b", "c")
T0 = 1_767_225_600.0
DAY = 86_400.0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = build_model("lstm_ae", {"n_features": len(CHANNELS), "window": 4, "hidden": 8, "latent": 4})
    root = tmp_path_factory.mktemp("model")
    save_artifact(root, model, SensorProfile(CHANNELS), ScalerParams.fit(rng.normal(0.0, 1.0, (100, 3))),
                  fit_quantile_threshold(rng.gamma(2.0, 1.0, 100), 0.99), version="20260101T000000Z-abcdef")
    return root


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _record(key: str, i: int) -> RawRecord:
    return RawRecord(encode_event(key, f"{key}-{i}", T0 + i, {c: 1.0 for c in CHANNELS}), partition=0, offset=i)


def _detector(model_dir, wall: Clock, mono: Clock) -> Detector:
    return Detector(load_artifact(model_dir), scorer=lambda w: None, threshold=GlobalThreshold(1.0),
                    key_ttl_s=DAY, clock=wall, key_clock=mono)


def test_a_wall_clock_step_of_two_days_evicts_no_key(model_dir):
    wall, mono = Clock(T0), Clock(100.0)
    detector = _detector(model_dir, wall, mono)
    detector.prepare([_record(f"k{i}", i) for i in range(10)])
    wall.now += 2 * DAY  # NTP step, VM resume, operator error
    mono.now += 2.0
    detector.prepare([_record("other", 99)])
    assert len(detector.windows) == 11
    assert detector.stats.evicted["idle"] == 0


def test_keys_idle_longer_than_the_ttl_on_the_monotonic_clock_are_evicted(model_dir):
    wall, mono = Clock(T0), Clock(100.0)
    detector = _detector(model_dir, wall, mono)
    detector.prepare([_record(f"k{i}", i) for i in range(10)])
    mono.now += DAY + 2.0
    detector.prepare([_record("other", 99)])
    assert len(detector.windows) == 1


def test_the_worker_runs_the_key_ttl_on_the_monotonic_clock(model_dir):
    service = DetectorService(Settings(model_dir=str(model_dir), torch_threads=1, metrics_port=0))
    assert service.detector.key_clock is time.monotonic
    assert service.detector.clock is time.time  # event-time checks (future timestamps) stay on the wall clock
