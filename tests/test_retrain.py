"""`trainer retrain` and `trainer compare` against the real broker: a challenger trained from the
topic with the champion's recipe, compared on what the alerts, shadow and feedback topics hold,
promoted by the gate, and a false-positive verdict reaching the next training run."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import orjson
import pytest

from stream_detector.cli import main as detector_main
from stream_detector.kafka.local_broker import LocalBroker
from stream_detector.producer import produce_events, publish_message
from stream_detector.registry import CHALLENGER, CHAMPION, read_aliases
from stream_detector.synthetic import generate
from trainer.cli import main as trainer_main

SMALL = ["--profile", "sensors", "--epochs", "2", "--hidden", "8", "--latent", "4", "--window", "8",
         "--no-progress", "--threads", "1", "--read-timeout", "20"]


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=timezone.utc).isoformat()


def _incident_alert(incident: str, events: list, version: str) -> dict:
    """An `open` alert message (the fields compare and training read) naming ``events``."""
    return {"incident_id": incident, "key": events[0].key, "state": "open", "model_version": version,
            "event_id": events[-1].event_id, "event_ids": [e.event_id for e in events],
            "incident": {"first_event_timestamp": _iso(events[0].timestamp),
                         "last_event_timestamp": _iso(events[-1].timestamp), "windows_over": len(events),
                         "peak_severity": 1.5}}


def _version_data(model_dir: Path, version: str) -> dict:
    return json.loads((model_dir / version / "metadata.json").read_text())["training"]["data"]


@pytest.mark.integration
def test_retrain_sets_a_challenger_gates_it_on_the_shadow_record_and_feeds_verdicts_to_the_next_run(
        kafka_broker: LocalBroker, make_topic: Callable[..., str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    bootstrap = kafka_broker.bootstrap_servers
    topic, alerts = make_topic("retrain-in"), make_topic("retrain-alerts")
    monkeypatch.setenv("STREAM_DETECTOR_BOOTSTRAP_SERVERS", bootstrap)
    monkeypatch.setenv("STREAM_DETECTOR_ALERTS_TOPIC", alerts)
    events = generate("sensors", 3, 120, seed=5)
    by_key: dict[str, list] = {}
    for e in events:
        by_key.setdefault(e.key, []).append(e)
    keys = sorted(by_key)
    produce_events(bootstrap, topic, events)
    models = tmp_path / "models"

    assert trainer_main(["train", *SMALL, "--from-topic", topic, "--out", str(models)]) == 0
    (v1,) = read_aliases(models)["aliases"].values()

    # No challenger: one run trains a candidate from the topic with v1's recipe and sets it as challenger.
    retrain = ["retrain", "--from-topic", topic, "--model-dir", str(models), "--no-progress", "--threads", "1",
               "--read-timeout", "20"]
    assert trainer_main([*retrain, "--json", str(tmp_path / "r1.json")]) == 0
    aliases = read_aliases(models)["aliases"]
    v2 = aliases[CHALLENGER]
    assert aliases[CHAMPION] == v1 and v2 != v1
    recipe = json.loads((models / v2 / "metadata.json").read_text())["training"]["config"]
    assert (recipe["window"], recipe["hidden"], recipe["latent"]) == (8, 8, 4)  # the champion's, not defaults
    assert json.loads((tmp_path / "r1.json").read_text())["action"] == "challenger_set"

    # What the worker would have published while v2 shadowed v1: three champion incidents, one of them
    # also raised by the challenger; operators marked one a false alarm and one a real anomaly.
    fp_events, tp_events, third = by_key[keys[0]][60:64], by_key[keys[1]][60:64], by_key[keys[2]][60:64]
    for incident, evs in (("i-fp", fp_events), ("i-tp", tp_events), ("i-3", third)):
        publish_message(bootstrap, alerts, evs[0].key.encode(), orjson.dumps(_incident_alert(incident, evs, v1)))
    publish_message(bootstrap, f"{alerts}.shadow", tp_events[0].key.encode(),
                    orjson.dumps(_incident_alert("x-tp", tp_events[1:3], v2)))
    assert detector_main(["ack", "i-fp", "--verdict", "false_positive", "--key", fp_events[0].key]) == 0
    assert detector_main(["ack", "i-tp", "--verdict", "true_positive", "--key", tp_events[0].key]) == 0
    capsys.readouterr()

    assert trainer_main(["compare", "--model-dir", str(models), "--min-shadow-s", "0",
                         "--json", str(tmp_path / "cmp.json")]) == 0
    report = capsys.readouterr().out
    assert "the challenger would have opened fewer incidents and missed no confirmed anomaly" in report
    cmp = json.loads((tmp_path / "cmp.json").read_text())
    c = cmp["comparison"]
    assert (c["champion"]["incidents"], c["challenger"]["incidents"], c["matched"]) == (3, 1, 1)
    assert (c["false_positives_avoided"], c["true_positives_missed"]) == (1, 0)
    assert cmp["gate"]["passes"] is True

    # Not shadowed long enough: nothing moves.
    assert trainer_main([*retrain, "--min-shadow-s", "3600"]) == 0
    assert read_aliases(models)["aliases"] == {CHAMPION: v1, CHALLENGER: v2}
    # Long enough: the gate promotes v2.
    assert trainer_main([*retrain, "--min-shadow-s", "0"]) == 0
    assert read_aliases(models)["aliases"] == {CHAMPION: v2}

    # The next run trains v3; the false alarm's events are normal training data, the other alerted ones are left out.
    assert trainer_main(retrain) == 0
    v3 = read_aliases(models)["aliases"][CHALLENGER]
    data = _version_data(models, v3)
    assert data["feedback"]["verdicts"] == 2
    assert data["feedback"]["false_positive_events"] == 4
    assert data["alerted_events_left_out"] == 8  # the three incidents' 12 events, less the false alarm's 4
    assert data["labelled_anomalies"] == 8

    assert trainer_main(["rollback", "--model-dir", str(models)]) == 0
    assert read_aliases(models)["aliases"][CHAMPION] == v1

    # Evaluating on the topic labelled by verdicts: the true positive's events are the anomalies, the
    # incident nobody reviewed is replayed but left out.
    assert trainer_main(["evaluate", "--model-dir", str(models), "--from-topic", topic, "--with-feedback",
                         "--read-timeout", "20", "--threads", "1", "--json", str(tmp_path / "eval.json")]) == 0
    metrics = json.loads((tmp_path / "eval.json").read_text())["metrics"]
    assert (metrics["events"], metrics["anomalous_events"]) == (len(events) - 4, 4)
    assert "4 events of incidents without a verdict replayed but not evaluated" in capsys.readouterr().out


def test_retrain_without_a_challenger_needs_the_input_topic(tmp_path: Path, capsys) -> None:
    from test_artifacts import save_tiny
    from stream_detector.registry import set_alias

    save_tiny(tmp_path, version="v1")
    set_alias(tmp_path, CHAMPION, "v1")
    assert trainer_main(["retrain", "--model-dir", str(tmp_path)]) == 2
    assert "needs --from-topic" in capsys.readouterr().err


def test_retrain_with_min_drift_trains_nothing_while_the_workers_drift_is_below_it(tmp_path: Path, capsys) -> None:
    from prometheus_client import CollectorRegistry, Gauge, start_http_server

    from stream_detector.registry import set_alias
    from test_artifacts import save_tiny

    save_tiny(tmp_path, version="v1")
    set_alias(tmp_path, CHAMPION, "v1")
    registry = CollectorRegistry()
    drift = Gauge("stream_detector_feature_drift", "drift", ["feature"], registry=registry)
    drift.labels("a").set(0.4)
    drift.labels("b").set(-1.2)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        args = ["retrain", "--model-dir", str(tmp_path), "--from-topic", "events", "--metrics-url", url,
                "--json", str(tmp_path / "run.json")]
        assert trainer_main([*args, "--min-drift", "2"]) == 0
        assert "largest feature drift 1.200 < --min-drift 2: no candidate trained" in capsys.readouterr().out
        assert json.loads((tmp_path / "run.json").read_text())["action"] == "no_drift"
        assert CHALLENGER not in read_aliases(tmp_path)["aliases"]
    finally:
        server.shutdown()
        thread.join(5)
    assert trainer_main(["retrain", "--model-dir", str(tmp_path), "--from-topic", "events", "--min-drift", "2"]) == 2
    assert "--min-drift needs --metrics-url" in capsys.readouterr().err
