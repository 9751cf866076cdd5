"""Integration: the whole model lifecycle on the real broker, with one worker that never restarts.

A worker serves v1, trained from the input topic. The stream's regime shifts to a new normal; the
feature drift rises and v1 alarms. An operator marks those alarms false positives. `trainer retrain`
trains v2 from the topic (the verdicts make the alarmed events normal training data) and sets it as
challenger; v2 shadows v1 on the new regime and `trainer compare` shows it alarms less; the next
`trainer retrain` promotes it through the gate and the worker serves it without a restart; `trainer
rollback` returns the worker to v1.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from stream_detector.cli import main as detector_main
from stream_detector.kafka.local_broker import ensure_topics
from stream_detector.producer import iter_messages, produce_events
from stream_detector.registry import CHALLENGER, CHAMPION, read_aliases
from stream_detector.synthetic import LabelledEvent, generate
from trainer.cli import main as trainer_main

from worker_harness import WorkerProcess

pytestmark = pytest.mark.integration

KEYS, PER_PART = 6, 300
SHIFTED = {"Pressure": 4.0, "Temperature": -4.0, "Current": 3.0}  # the new normal's level changes


def part(seed: int, start_index: int, shifted: bool) -> list[LabelledEvent]:
    """Each key's next ``PER_PART`` readings (one per second after the previous part's)."""
    events = generate("sensors", KEYS, PER_PART, seed=seed)
    out = []
    for e in events:
        fields = {k: (v + SHIFTED.get(k, 0.0) if shifted else v) for k, v in e.fields.items()}
        out.append(LabelledEvent(e.key, e.event_id, e.timestamp + start_index, fields, 0))
    return out


def served(worker: WorkerProcess, gauge: str = "stream_detector_model_info") -> set[str]:
    return {k.split('version="')[1].split('"')[0] for k, v in worker.metrics().items()
            if k.startswith(gauge + "{") and v == 1.0}


def wait_until(condition, timeout: float, what: str, worker: WorkerProcess) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        worker.assert_alive()
        if condition():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}; log:\n{worker.log_tail()}")


def max_drift(worker: WorkerProcess) -> float:
    return max((abs(v) for k, v in worker.metrics().items() if k.startswith("stream_detector_feature_drift{")),
               default=0.0)


def test_drift_retrain_shadow_compare_promote_and_rollback_on_one_running_worker(kafka_broker, tmp_path: Path,
                                                                                 monkeypatch) -> None:
    bootstrap = kafka_broker.bootstrap_servers
    models = tmp_path / "models"
    worker = WorkerProcess(bootstrap, models, tmp_path / "worker.log",
                           extra_env={"STREAM_DETECTOR_MODEL_POLL_S": "0.5",
                                      "STREAM_DETECTOR_DRIFT_HALFLIFE_WINDOWS": "300"})
    ensure_topics(bootstrap, {worker.input_topic: 2, worker.alerts_topic: 1})
    for name, value in worker.env().items():
        if name.startswith("STREAM_DETECTOR_"):
            monkeypatch.setenv(name, value)  # the CLI commands read the same settings as the worker

    normal = part(71, 0, shifted=False)
    produce_events(bootstrap, worker.input_topic, normal)
    train = ["--epochs", "4", "--hidden", "16", "--latent", "8", "--window", "16", "--no-progress", "--threads", "1",
             "--read-timeout", "20"]
    assert trainer_main(["train", "--profile", "sensors", "--from-topic", worker.input_topic, *train,
                         "--out", str(models)]) == 0
    v1 = read_aliases(models)["aliases"][CHAMPION]

    worker.start()
    try:
        worker.wait_for_metric("stream_detector_events_consumed_total", len(normal), timeout=120)
        drift_before = max_drift(worker)

        # The regime shifts: a new normal the worker has never seen.
        time.sleep(0.05)
        shift_at = time.time()
        new_normal = part(72, PER_PART, shifted=True)
        produce_events(bootstrap, worker.input_topic, new_normal)
        worker.wait_for_metric("stream_detector_events_consumed_total", len(normal) + len(new_normal), timeout=120)
        drift_after = max_drift(worker)
        assert drift_after > drift_before + 1.0, (drift_before, drift_after)

        # v1 alarms on it; the operator says these are false alarms.
        alerts = list(iter_messages(bootstrap, worker.alerts_topic, idle_timeout=5.0))
        opened = {a["incident_id"]: a["key"] for a in alerts if a["state"] == "open" and a["model_version"] == v1}
        assert opened, "v1 raised no incident on the new regime"
        for incident, key in opened.items():
            assert detector_main(["ack", incident, "--verdict", "false_positive", "--key", key]) == 0

        # Retrain from the topic since the shift: v2, set as challenger; the verdicts reached its training.
        retrain = ["retrain", "--from-topic", worker.input_topic, "--model-dir", str(models), "--since", str(shift_at),
                   "--no-progress", "--threads", "1", "--read-timeout", "20", "--metrics-url", worker.metrics_url]
        assert trainer_main(retrain) == 0
        v2 = read_aliases(models)["aliases"][CHALLENGER]
        data = json.loads((models / v2 / "metadata.json").read_text())["training"]["data"]
        assert data["feedback"]["verdicts"] == len(opened)
        assert data["feedback"]["false_positive_events"] > 0
        wait_until(lambda: served(worker, "stream_detector_challenger_info") == {v2}, 60, "the challenger", worker)

        # v2 shadows v1 on more of the new regime.
        more = part(73, 2 * PER_PART, shifted=True)
        produce_events(bootstrap, worker.input_topic, more)
        worker.wait_for_metric("stream_detector_events_consumed_total",
                               len(normal) + len(new_normal) + len(more), timeout=120)
        assert trainer_main(["compare", "--model-dir", str(models), "--metrics-url", worker.metrics_url,
                             "--min-shadow-s", "0", "--json", str(tmp_path / "compare.json")]) == 0
        report = json.loads((tmp_path / "compare.json").read_text())
        champion, challenger = report["comparison"]["champion"], report["comparison"]["challenger"]
        assert (champion["version"], challenger["version"]) == (v1, v2)
        assert challenger["windows_judged"] >= KEYS * (PER_PART - 16)
        assert challenger["over_threshold_rate"] < champion["over_threshold_rate"], report
        assert challenger["incidents"] <= champion["incidents"], report
        assert report["gate"]["passes"], report["gate"]

        # The gate promotes v2; the same worker process serves it.
        pid = worker.process.pid
        assert trainer_main([*retrain, "--min-shadow-s", "1"]) == 0
        assert read_aliases(models)["aliases"] == {CHAMPION: v2}
        wait_until(lambda: served(worker) == {v2}, 60, "v2 served", worker)
        # A rollback returns it to v1.
        assert trainer_main(["rollback", "--model-dir", str(models)]) == 0
        wait_until(lambda: served(worker) == {v1}, 60, "v1 served again", worker)
        assert worker.process.pid == pid
        worker.assert_alive()
    finally:
        worker.stop()
