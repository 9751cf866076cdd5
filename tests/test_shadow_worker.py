"""Integration: the real worker shadows its champion with the challenger, and promotes it without a restart."""

from __future__ import annotations

import shutil

import pytest

from stream_detector.artifacts import load_artifact, resolve_version_dir, save_artifact
from stream_detector.kafka.local_broker import ensure_topics
from stream_detector.producer import iter_messages, produce_events
from stream_detector.registry import CHALLENGER, CHAMPION, set_alias
from stream_detector.synthetic import generate
from trainer.cli import main as trainer_main

from test_delivery import expected_scored, with_obvious_anomalies
from worker_harness import WorkerProcess

pytestmark = pytest.mark.integration

CHALLENGER_VERSION = "zzzz-challenger"


def test_challenger_alerts_only_on_the_shadow_topic_and_a_promotion_serves_it_with_its_warm_thresholds(
        kafka_broker, sensor_model_dir, tmp_path):
    model_dir = tmp_path / "models"
    original = resolve_version_dir(sensor_model_dir)
    shutil.copytree(original, model_dir / original.name)
    artifact = load_artifact(original)
    # The same weights as another version: both models judge every window alike, each on its own topic.
    save_artifact(model_dir, artifact.model, artifact.profile, artifact.scaler, artifact.metadata["threshold"],
                  version=CHALLENGER_VERSION)
    set_alias(model_dir, CHAMPION, artifact.version)
    set_alias(model_dir, CHALLENGER, CHALLENGER_VERSION)
    worker = WorkerProcess(kafka_broker.bootstrap_servers, model_dir, tmp_path / "worker.log",
                           extra_env={"STREAM_DETECTOR_MODEL_POLL_S": "0.5"})
    shadow_topic = f"{worker.alerts_topic}.shadow"
    ensure_topics(kafka_broker.bootstrap_servers, {worker.input_topic: 1, worker.alerts_topic: 1})
    worker.start()
    try:
        def serving() -> str:
            info = next(k for k in worker.metrics() if k.startswith("stream_detector_model_info{"))
            return info.split('version="')[1].split('"')[0]

        def shadowing() -> list[str]:
            return [k.split('version="')[1].split('"')[0] for k, v in worker.metrics().items()
                    if k.startswith("stream_detector_challenger_info{") and v == 1.0]

        assert serving() == artifact.version and shadowing() == [CHALLENGER_VERSION]
        events = with_obvious_anomalies(generate("sensors", 8, 200, anomaly_rate=0.05, seed=71))
        produce_events(kafka_broker.bootstrap_servers, worker.input_topic, events, rate=0)
        worker.wait_for_metric("stream_detector_events_consumed_total", len(events))
        scored = len(expected_scored(events))
        worker.wait_for_metric("stream_detector_windows_scored_total", scored)
        alerts = list(iter_messages(kafka_broker.bootstrap_servers, worker.alerts_topic, idle_timeout=5.0))
        shadow = list(iter_messages(kafka_broker.bootstrap_servers, shadow_topic, idle_timeout=5.0))
        assert alerts and {a["model_version"] for a in alerts} == {artifact.version}
        assert shadow and {a["model_version"] for a in shadow} == {CHALLENGER_VERSION}
        # The same weights, the same windows, thresholds of their own built alike: the same incidents.
        assert {a["incident_id"] for a in shadow} == {a["incident_id"] for a in alerts}

        metrics = worker.metrics()
        counted = {(model, outcome): metrics[f'stream_detector_shadow_windows_total{{model="{model}",'
                                             f'outcome="{outcome}"}}']
                   for model in ("champion", "challenger") for outcome in ("over", "under")}
        assert counted[("champion", "over")] + counted[("champion", "under")] == scored
        assert counted[("challenger", "over")] + counted[("challenger", "under")] == scored
        agreement = {name: metrics[f'stream_detector_shadow_agreement_total{{agreement="{name}"}}']
                     for name in ("both", "champion_only", "challenger_only", "neither")}
        assert agreement["both"] == counted[("champion", "over")] > 0
        assert agreement["champion_only"] == agreement["challenger_only"] == 0
        calibrated = metrics["stream_detector_keys_calibrated"]
        assert calibrated > 2  # more than the later keys below: a restarted warm-up would show

        assert trainer_main(["promote", CHALLENGER_VERSION, "--model-dir", str(model_dir)]) == 0
        worker.wait_for_metric("stream_detector_model_reloads_total", 1, timeout=60)
        assert serving() == CHALLENGER_VERSION and shadowing() == []
        later = with_obvious_anomalies(generate("sensors", 2, 200, anomaly_rate=0.05, seed=72, key_prefix="later"))
        produce_events(kafka_broker.bootstrap_servers, worker.input_topic, later, rate=0)
        worker.wait_for_metric("stream_detector_events_consumed_total", len(events) + len(later))
        alerts = list(iter_messages(kafka_broker.bootstrap_servers, worker.alerts_topic, idle_timeout=5.0))
        later_alerts = [a for a in alerts if a["key"].startswith("later")]
        assert later_alerts and {a["model_version"] for a in later_alerts} == {CHALLENGER_VERSION}
        shadow = list(iter_messages(kafka_broker.bootstrap_servers, shadow_topic, idle_timeout=2.0))
        assert not [a for a in shadow if a["key"].startswith("later")]  # nothing shadows the champion now
        # The keys calibrated by the challenger stay calibrated under it as champion.
        assert worker.metrics()["stream_detector_keys_calibrated"] >= calibrated
        worker.assert_alive()
    finally:
        worker.stop()
