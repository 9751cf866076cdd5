"""Integration: the real worker serves the champion and switches only when the alias moves."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from stream_detector.artifacts import load_artifact, resolve_version_dir, save_artifact
from stream_detector.kafka.local_broker import ensure_topics
from stream_detector.producer import iter_messages, produce_events
from stream_detector.registry import CHAMPION, set_alias
from stream_detector.synthetic import generate

from test_delivery import with_obvious_anomalies
from worker_harness import WorkerProcess

pytestmark = pytest.mark.integration


def test_worker_serves_the_champion_not_a_newer_version_and_swaps_when_promoted(kafka_broker, sensor_model_dir,
                                                                                tmp_path):
    model_dir = tmp_path / "models"
    original = resolve_version_dir(sensor_model_dir)
    shutil.copytree(original, model_dir / original.name)
    artifact = load_artifact(original)
    set_alias(model_dir, CHAMPION, artifact.version)
    worker = WorkerProcess(kafka_broker.bootstrap_servers, model_dir, tmp_path / "worker.log",
                           extra_env={"STREAM_DETECTOR_MODEL_POLL_S": "0.5"})
    ensure_topics(kafka_broker.bootstrap_servers, {worker.input_topic: 1, worker.alerts_topic: 1})
    worker.start()
    try:
        def serving() -> str:
            info = next(k for k in worker.metrics() if k.startswith("stream_detector_model_info{"))
            return info.split('version="')[1].split('"')[0]

        assert serving() == artifact.version
        # A newer version, named to sort last: registered, not served.
        save_artifact(model_dir, artifact.model, artifact.profile, artifact.scaler, artifact.metadata["threshold"],
                      version="zzzz-newer")
        events = with_obvious_anomalies(generate("sensors", 8, 200, anomaly_rate=0.05, seed=61))
        produce_events(kafka_broker.bootstrap_servers, worker.input_topic, events, rate=0)
        worker.wait_for_metric("stream_detector_events_consumed_total", len(events))
        assert serving() == artifact.version
        assert worker.metrics().get("stream_detector_model_reloads_total", 0.0) == 0

        set_alias(model_dir, CHAMPION, "zzzz-newer")
        worker.wait_for_metric("stream_detector_model_reloads_total", 1, timeout=60)
        assert serving() == "zzzz-newer"
        later = with_obvious_anomalies(generate("sensors", 8, 200, anomaly_rate=0.05, seed=62, key_prefix="later"))
        produce_events(kafka_broker.bootstrap_servers, worker.input_topic, later, rate=0)
        worker.wait_for_metric("stream_detector_events_consumed_total", len(events) + len(later))
        alerts = list(iter_messages(kafka_broker.bootstrap_servers, worker.alerts_topic, idle_timeout=5.0))
        later_alerts = [a for a in alerts if a["key"].startswith("later")]
        assert later_alerts and {a["model_version"] for a in later_alerts} == {"zzzz-newer"}
        worker.assert_alive()
    finally:
        worker.stop()


def test_worker_refuses_to_start_on_a_champion_that_fails_to_load(kafka_broker, sensor_model_dir, tmp_path):
    model_dir = tmp_path / "models"
    original = resolve_version_dir(sensor_model_dir)
    shutil.copytree(original, model_dir / original.name)
    champion = load_artifact(original).version
    set_alias(model_dir, CHAMPION, champion)
    metadata = model_dir / champion / "metadata.json"
    doc = json.loads(metadata.read_text())
    doc["threshold"]["value"] *= 1e6  # the silencing edit of issue 21
    metadata.write_text(json.dumps(doc))
    worker = WorkerProcess(kafka_broker.bootstrap_servers, model_dir, tmp_path / "worker.log")
    process = subprocess.run([sys.executable, "-m", "stream_detector", "worker"], env=worker.env(),
                             capture_output=True, text=True, timeout=120)
    assert process.returncode == 2
    assert "cannot start" in process.stderr + process.stdout
    assert "metadata checksum mismatch" in process.stderr + process.stdout
