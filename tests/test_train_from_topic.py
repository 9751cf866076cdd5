"""`trainer train --from-topic`: the input topic's history as training data."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import orjson
import pytest

from stream_detector.events import Envelope
from stream_detector.kafka.local_broker import LocalBroker
from stream_detector.producer import produce_events, publish_message
from stream_detector.synthetic import generate
from trainer.cli import main as trainer_main
from trainer.topic import parse_time_flag, sensor_channels

SMALL = ["--profile", "sensors", "--epochs", "2", "--hidden", "8", "--latent", "4", "--window", "8",
         "--no-progress", "--threads", "1", "--read-timeout", "20"]


def test_time_flag_reads_iso_8601_with_and_without_offset_and_epoch_seconds() -> None:
    assert parse_time_flag("2026-01-01T00:00:00Z") == 1767225600.0
    assert parse_time_flag("2026-01-01T01:00:00+01:00") == 1767225600.0
    assert parse_time_flag("2026-01-01T00:00:00") == 1767225600.0  # no offset: UTC
    assert parse_time_flag("1767225600") == 1767225600.0
    assert parse_time_flag(" 1767225600.5 ") == 1767225600.5


@pytest.mark.parametrize("text", ["yesterday", "", "-5", "2026-13-01T00:00:00Z"])
def test_time_flag_refuses_unreadable_times_with_the_text(text: str) -> None:
    with pytest.raises(ValueError, match="unreadable time"):
        parse_time_flag(text)


def test_sensor_channels_are_guessed_at_the_envelopes_fields_path() -> None:
    flat = Envelope(fields_path="", key_path="device", time_path="ts")
    values = [b"not json", b'{"device": "d1", "ts": 5, "Pressure": 1.0, "Temp": 2, "ok": true, "event_id": "e"}']
    assert sensor_channels(values, flat) == ["Pressure", "Temp"]
    assert sensor_channels([b'{"fields": {"a": 1.5}}'], Envelope()) == ["a"]
    with pytest.raises(ValueError, match="--fields"):
        sensor_channels([b'{"fields": {"a": "x"}}'], Envelope())


def _training_data(out: Path) -> dict:
    import json

    (version,) = [p for p in out.iterdir() if (p / "metadata.json").exists()]
    return json.loads((version / "metadata.json").read_text())["training"]["data"]


def _stamp() -> float:
    """A record-time boundary strictly between the records produced before and after it."""
    time.sleep(0.05)
    t = time.time()
    time.sleep(0.05)
    return t


@pytest.mark.integration
def test_train_from_topic_reads_the_window_of_record_times_and_counts_malformed_records(
        kafka_broker: LocalBroker, make_topic: Callable[..., str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    bootstrap = kafka_broker.bootstrap_servers
    topic = make_topic("from-topic", partitions=2)
    events = generate("sensors", 2, 200, seed=3)  # 400 events, keys' streams merged in time order
    produce_events(bootstrap, topic, events[:100])
    t1 = _stamp()
    produce_events(bootstrap, topic, events[100:300])
    publish_message(bootstrap, topic, b"device-0000", b"{not json")
    t2 = _stamp()
    produce_events(bootstrap, topic, events[300:])

    # Whole topic, bootstrap servers from the environment as for every command.
    monkeypatch.setenv("STREAM_DETECTOR_BOOTSTRAP_SERVERS", bootstrap)
    assert trainer_main(["train", *SMALL, "--from-topic", topic, "--out", str(tmp_path / "all")]) == 0
    whole = _training_data(tmp_path / "all")
    assert (whole["events"], whole["records_read"], whole["keys"]) == (400, 401, 2)
    assert whole["rejected_rows"] == {"malformed_json": 1}
    assert "401 records read from 2 partition(s); 1 refused (malformed_json 1); 400 events" in capsys.readouterr().out

    # --since/--until by record time (ISO-8601 and epoch seconds), flag overriding the environment.
    monkeypatch.setenv("STREAM_DETECTOR_BOOTSTRAP_SERVERS", "127.0.0.1:1")
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t1)) + f".{int(t1 % 1 * 1e6):06d}+00:00"
    assert trainer_main(["train", *SMALL, "--from-topic", topic, "--bootstrap-servers", bootstrap,
                         "--since", since, "--until", str(t2), "--out", str(tmp_path / "middle")]) == 0
    middle = _training_data(tmp_path / "middle")
    assert (middle["events"], middle["records_read"]) == (200, 201)
    assert middle["rejected_rows"] == {"malformed_json": 1}
    assert "alerted_events_left_out" not in middle


@pytest.mark.integration
def test_exclude_alerted_labels_the_events_named_on_the_alerts_topic(
        kafka_broker: LocalBroker, make_topic: Callable[..., str], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    bootstrap = kafka_broker.bootstrap_servers
    topic, alerts = make_topic("from-topic"), make_topic("alerts")
    events = generate("sensors", 2, 100, seed=4)
    produce_events(bootstrap, topic, events)
    named = [e.event_id for e in events[150:153]]
    alert = {"type": "open", "key": events[150].key, "event_id": named[-1], "event_ids": named}
    publish_message(bootstrap, alerts, events[150].key.encode(), orjson.dumps(alert))
    publish_message(bootstrap, alerts, events[150].key.encode(), b"")  # a tombstone: no event_ids
    assert trainer_main(["train", *SMALL, "--from-topic", topic, "--bootstrap-servers", bootstrap,
                         "--exclude-alerted", "--alerts-topic", alerts, "--out", str(tmp_path / "m")]) == 0
    data = _training_data(tmp_path / "m")
    assert (data["events"], data["alerted_events_left_out"], data["labelled_anomalies"]) == (200, 3, 3)
    assert f"2 alert message(s) on {alerts} (1 without event_ids); 3 events alerted on" in capsys.readouterr().out


def test_alerts_topic_without_exclude_alerted_is_refused() -> None:
    with pytest.raises(SystemExit, match="--alerts-topic needs --exclude-alerted"):
        trainer_main(["train", *SMALL, "--from-topic", "events", "--bootstrap-servers", "127.0.0.1:1",
                      "--alerts-topic", "alerts", "--read-timeout", "1"])
