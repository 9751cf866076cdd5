"""Shadow scoring of a challenger beside the champion, with fake models and a fake producer (no broker).

The challenger scores the same windows in the same step as the champion, is judged with its own
threshold policy and incidents, publishes only to the shadow topic, and is counted against the
champion window by window; a challenger that fails never stops the worker.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import orjson
import pytest
import torch

from stream_detector.artifacts import ArtifactError, load_artifact, save_artifact
from stream_detector.detector import Detector, RawRecord
from stream_detector.events import encode_event
from stream_detector.incidents import AlertPolicy
from stream_detector.models import build_model
from stream_detector.preprocessing import ScalerParams
from stream_detector.profiles import SensorProfile
from stream_detector.registry import CHALLENGER, CHAMPION, set_alias
from stream_detector.scoring import Scores
from stream_detector.settings import Settings
from stream_detector.thresholds import GlobalThreshold, fit_quantile_threshold
from stream_detector.worker import DetectorService

from test_artifacts import save_tiny
from test_pipeline_failures import BATCH, CHANNELS, KEYS, T0, WINDOW, Harness, _events
from test_registry import corrupt_weights

CHAMPION_VERSION, CHALLENGER_VERSION = "20260101T000000Z-champ1", "20260102T000000Z-chall2"


def _save(root: Path, version: str, seed: int, window: int = WINDOW) -> Path:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_model("lstm_ae", {"n_features": len(CHANNELS), "window": window, "hidden": 8, "latent": 4})
    scaler = ScalerParams.fit(rng.normal(0.0, 1.0, (100, len(CHANNELS))))
    threshold = fit_quantile_threshold(rng.gamma(2.0, 1.0, 100), 0.99)
    return save_artifact(root, model, SensorProfile(CHANNELS), scaler, threshold, version=version)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("shadow-models")
    return (load_artifact(_save(root, CHAMPION_VERSION, 0)), load_artifact(_save(root, CHALLENGER_VERSION, 1)),
            load_artifact(_save(root, "20260103T000000Z-wider", 2, window=WINDOW + 2)))


class ByNewestValue:
    """A fake model: each window's score is its newest value of channel `a` over ``divisor`` (so
    which windows are over a threshold of 1 is known from the windows); counts its calls."""

    def __init__(self, divisor: float):
        self.divisor = divisor
        self.calls = 0
        self.newest: list[float] = []

    def __call__(self, windows: np.ndarray) -> Scores:
        self.calls += 1
        newest = windows[:, -1, 0].astype(np.float64)
        self.newest.extend(newest.tolist())
        return Scores((newest / self.divisor).astype(np.float32), np.ones((len(windows), len(CHANNELS)), np.float32))


def _shadowed(models, champion: ByNewestValue, challenger) -> Harness:
    harness = Harness(models[0], scorer=champion)
    harness.detector.set_challenger(models[1], challenger, GlobalThreshold(1.0))
    return harness


def _messages(harness: Harness, topic: str) -> list[dict]:
    return [orjson.loads(m[2]) for m in harness.out.topic(topic)]


def _sample(harness: Harness, name: str, **labels: str) -> float:
    value = harness.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_the_challenger_scores_every_batch_beside_the_champion_and_alerts_only_to_the_shadow_topic(models):
    champion, challenger = ByNewestValue(10.0), ByNewestValue(1.5)  # the champion never over, the challenger often
    harness = _shadowed(models, champion, challenger)
    harness.run(_events(6 * BATCH))
    assert harness.exits == []
    assert challenger.calls == champion.calls > 0  # one more call per batch part, the same windows
    assert challenger.newest == champion.newest
    assert _messages(harness, "alerts") == []
    shadow = _messages(harness, "alerts.shadow")
    assert shadow and {m["model_version"] for m in shadow} == {CHALLENGER_VERSION}
    assert {m["state"] for m in shadow} >= {"open"}


def test_both_models_alert_each_on_its_own_topic_with_its_own_version(models):
    harness = _shadowed(models, ByNewestValue(1.5), ByNewestValue(1.5))
    harness.run(_events(6 * BATCH))
    alerts, shadow = _messages(harness, "alerts"), _messages(harness, "alerts.shadow")
    assert alerts and {m["model_version"] for m in alerts} == {CHAMPION_VERSION}
    assert shadow and {m["model_version"] for m in shadow} == {CHALLENGER_VERSION}
    # The same verdicts, judged by two trackers: the same incidents, each on its own topic.
    assert [(m["incident_id"], m["state"]) for m in alerts] == [(m["incident_id"], m["state"]) for m in shadow]
    assert _sample(harness, "stream_detector_shadow_alert_messages_total", state="open") == sum(
        m["state"] == "open" for m in shadow)


def test_verdicts_of_both_models_are_counted_window_by_window_with_their_agreement(models):
    champion, challenger = ByNewestValue(1.5), ByNewestValue(2.5)  # over from 2 and from 3 (threshold 1)
    harness = _shadowed(models, champion, challenger)
    harness.run(_events(6 * BATCH))
    newest = np.asarray(champion.newest)
    champion_over, challenger_over = newest / 1.5 > 1.0, newest / 2.5 > 1.0
    assert len(newest) == len(harness.judged)
    assert champion_over.any() and (champion_over & ~challenger_over).any() and (~champion_over).any()
    expected = {"both": champion_over & challenger_over, "champion_only": champion_over & ~challenger_over,
                "challenger_only": ~champion_over & challenger_over, "neither": ~champion_over & ~challenger_over}
    for agreement, mask in expected.items():
        assert _sample(harness, "stream_detector_shadow_agreement_total", agreement=agreement) == mask.sum()
    for model, over in (("champion", champion_over), ("challenger", challenger_over)):
        assert _sample(harness, "stream_detector_shadow_windows_total", model=model, outcome="over") == over.sum()
        assert _sample(harness, "stream_detector_shadow_windows_total", model=model, outcome="under") == (~over).sum()


def test_without_a_challenger_nothing_is_counted_and_the_shadow_topic_stays_empty(models):
    champion = ByNewestValue(1.5)
    harness = Harness(models[0], scorer=champion)
    harness.run(_events(6 * BATCH))
    assert _messages(harness, "alerts") and _messages(harness, "alerts.shadow") == []
    assert _sample(harness, "stream_detector_shadow_windows_total", model="champion", outcome="over") == 0
    assert not harness.detector.shadow_pending


def test_a_challenger_that_raises_leaves_the_champion_judging_alone_and_the_worker_running(models):
    def broken(windows: np.ndarray) -> Scores:
        raise RuntimeError("challenger out of memory")

    harness = _shadowed(models, ByNewestValue(1.5), broken)
    events = _events(6 * BATCH)
    harness.run(events)
    assert harness.exits == [] and sorted(harness.acked) == list(range(len(events)))
    assert _messages(harness, "alerts") and _messages(harness, "alerts.shadow") == []
    assert harness.detector.challenger is not None and harness.detector.challenger.score_failures > 0
    assert _sample(harness, "stream_detector_shadow_agreement_total", agreement="both") == 0


def test_a_challenger_nan_score_is_not_judged_and_never_dead_letters_the_event(models):
    def half_nan(windows: np.ndarray) -> Scores:
        scores = np.full(len(windows), 5.0, np.float32)
        scores[::2] = np.nan
        return Scores(scores, np.ones((len(windows), len(CHANNELS)), np.float32))

    harness = _shadowed(models, ByNewestValue(10.0), half_nan)
    harness.run(_events(6 * BATCH))
    assert harness.out.topic("dlq") == []
    judged = _sample(harness, "stream_detector_shadow_windows_total", model="challenger", outcome="over")
    assert 0 < judged < len(harness.judged)
    assert _sample(harness, "stream_detector_shadow_windows_total", model="challenger", outcome="under") == 0


def test_a_challenger_whose_windows_differ_from_the_champions_is_refused(models):
    detector = Detector(models[0], scorer=ByNewestValue(1.0), threshold=GlobalThreshold(1.0))
    with pytest.raises(ArtifactError, match="does not fit"):
        detector.set_challenger(models[2], ByNewestValue(1.0))
    assert detector.challenger is None and not detector.shadow_pending


def test_promoting_the_challenger_keeps_its_warm_threshold_policy_and_the_champions_incidents(models):
    champion, challenger = ByNewestValue(1.5), ByNewestValue(1.5)
    harness = _shadowed(models, champion, challenger)
    detector = harness.detector
    harness.run(_events(4 * BATCH))
    policy = detector.challenger.threshold
    champion_incidents = detector.incidents
    open_shadow = detector.challenger.incidents.open_count
    assert open_shadow > 0 and champion_incidents.open_count > 0
    detector.promote_challenger()
    detector.prepare([])  # the next micro-batch: the promotion applies
    assert detector.artifact.version == CHALLENGER_VERSION and detector.scorer is challenger
    assert detector.threshold is policy and detector.incidents is champion_incidents
    assert detector.challenger is None
    closed, _ = detector.drain_shadow()
    assert [m["incident"]["close_reason"] for m in closed] == ["stopped"] * open_shadow
    assert {m["model_version"] for m in closed} == {CHALLENGER_VERSION}


def test_an_evicted_key_closes_its_shadow_incident_on_the_shadow_topic(models):
    detector = Detector(models[0], scorer=ByNewestValue(10.0), threshold=GlobalThreshold(1.0), max_keys=2,
                        alerting=AlertPolicy(min_windows=1), max_batch=BATCH)
    detector.set_challenger(models[1], ByNewestValue(0.1), GlobalThreshold(1.0))  # always over
    records = [RawRecord(encode_event(key, f"{key}-{i}", T0 + i, {c: 1.0 + i for c in CHANNELS}), key.encode(),
                         T0 + i, 0, 2 * i + j) for i in range(WINDOW + 1) for j, key in enumerate(("k0", "k1"))]
    detector.process(records)
    opened, _ = detector.drain_shadow()
    assert sorted(m["key"] for m in opened if m["state"] == "open") == ["k0", "k1"]
    detector.process([RawRecord(encode_event("k2", "k2-0", T0 + 99, {c: 1.0 for c in CHANNELS}), b"k2", T0 + 99,
                                0, 99)])  # the least recently used key makes room for it
    closed, _ = detector.drain_shadow()
    assert [(m["key"], m["state"], m["incident"]["close_reason"]) for m in closed] == [("k0", "close", "evicted")]


# -- the worker's service: the challenger alias, followed on the model poll ---------------------------


def _service(model_dir: Path) -> DetectorService:
    return DetectorService(Settings(model_dir=str(model_dir), torch_threads=1, metrics_port=0))


def _challenger_info(service: DetectorService, version: str) -> float | None:
    return service.metrics.registry.get_sample_value("stream_detector_challenger_info", {"version": version})


def test_the_worker_loads_the_challenger_alias_and_follows_it_on_the_model_poll(tmp_path):
    save_tiny(tmp_path, version="v1")
    save_tiny(tmp_path, version="v2", seed=1)
    save_tiny(tmp_path, version="v3", seed=2)
    set_alias(tmp_path, CHAMPION, "v1")
    set_alias(tmp_path, CHALLENGER, "v2")
    service = _service(tmp_path)
    assert service.challenger_runner is not None and service.challenger_runner.version == "v2"
    assert service.detector._pending_challenger[0].version == "v2"  # from the next micro-batch on
    assert _challenger_info(service, "v2") == 1.0 and _challenger_info(service, "") is None
    assert not asyncio.run(service.maybe_reload_challenger())  # unchanged
    set_alias(tmp_path, CHALLENGER, "v3")
    assert asyncio.run(service.maybe_reload_challenger()) and service.challenger_runner.version == "v3"
    assert _challenger_info(service, "v2") is None and _challenger_info(service, "v3") == 1.0
    set_alias(tmp_path, CHALLENGER, "v1")  # the champion itself: nothing to shadow
    assert asyncio.run(service.maybe_reload_challenger())
    assert service.challenger_runner is None and service.detector._pending_challenger == (None,)
    assert _challenger_info(service, "v3") is None and _challenger_info(service, "") == 0.0


def test_a_challenger_that_fails_to_load_is_counted_and_ignored_and_the_champion_serves(tmp_path):
    save_tiny(tmp_path, version="v1")
    bad = save_tiny(tmp_path, version="v2", seed=1)
    set_alias(tmp_path, CHAMPION, "v1")
    set_alias(tmp_path, CHALLENGER, "v2")
    corrupt_weights(bad)
    service = _service(tmp_path)
    assert service.runner.version == "v1" and service.challenger_runner is None
    assert not asyncio.run(service.maybe_reload_challenger())  # refused once, not retried every poll
    assert service.metrics.registry.get_sample_value("stream_detector_challenger_load_failures_total") == 1.0


def test_promoting_the_version_shadowing_hands_its_threshold_policy_to_the_champion(tmp_path):
    save_tiny(tmp_path, version="v1")
    save_tiny(tmp_path, version="v2", seed=1)
    set_alias(tmp_path, CHAMPION, "v1")
    set_alias(tmp_path, CHALLENGER, "v2")
    service = _service(tmp_path)
    shadowing = service.detector._pending_challenger[0]
    set_alias(tmp_path, CHAMPION, "v2")
    assert asyncio.run(service.maybe_reload())
    assert not asyncio.run(service.maybe_reload_challenger())  # the challenger alias names the champion now
    assert service.runner.version == "v2" and service.challenger_runner is None
    artifact, _, threshold = service.detector._pending_model
    assert artifact.version == "v2" and threshold is shadowing.threshold
    assert service.metrics.registry.get_sample_value("stream_detector_model_reloads_total") == 1.0
