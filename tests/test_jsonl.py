"""Unit tests of `--jsonl`: a dump of the input topic read with the worker's own decoder."""

from __future__ import annotations

import gzip
import json

import orjson
import pytest

from stream_detector.artifacts import load_artifact, resolve_version_dir
from stream_detector.profiles import SensorProfile
from stream_detector.synthetic import generate
from trainer.cli import main as trainer_main
from trainer.jsonl import BLANK, load_jsonl

BAD_LINES = [
    b"{not json",
    b"[1, 2]",
    b'{"event_id": "x", "timestamp": 1, "fields": {}}',
    b"",
    b"\xff\xfe not utf-8",
]


def write_dump(path, events, bad: bool = True, gz: bool = False, label_every: int = 10) -> list[int]:
    """kcat-style dump: one JSON message per line, every ``label_every``-th labelled 1, bad lines
    mixed in; returns the labels of the valid lines."""
    messages = [dict(e.to_message(), label=int(i % label_every == 0)) for i, e in enumerate(events)]
    lines = [orjson.dumps(m) for m in messages]
    if bad:
        for i, line in enumerate(BAD_LINES):
            lines.insert(1 + i * 7, line)
    data = b"\n".join(lines) + b"\n"
    path.write_bytes(gzip.compress(data) if gz else data)
    return [m["label"] for m in messages]


def test_valid_events_are_decoded_and_invalid_lines_counted_by_reason(tmp_path):
    events = generate("sensors", 3, 40, anomaly_rate=0.05, seed=3)
    labels = write_dump(tmp_path / "dump.jsonl", events)
    data = load_jsonl([str(tmp_path / "dump.jsonl")], "sensors")
    assert len(data.events) == len(events)
    assert sum(data.labels) == sum(labels) == 12
    assert isinstance(data.profile, SensorProfile)
    assert list(data.profile.channels) == list(events[0].fields)
    assert data.rejected == {"malformed_json": 2, "not_an_object": 1, "missing_key": 1, BLANK: 1}
    timestamps = [e.timestamp for e in data.events]
    assert timestamps == sorted(timestamps)


def test_gzipped_dump_and_an_artifact_profile(tmp_path):
    events = generate("sensors", 2, 20, seed=4)
    write_dump(tmp_path / "dump.jsonl.gz", events, bad=False, gz=True)
    profile = SensorProfile(list(events[0].fields)[:3])
    data = load_jsonl([str(tmp_path / "dump.jsonl.gz")], profile)
    assert len(data.events) == len(events) and data.profile is profile and not data.rejected


def test_no_numeric_fields_is_a_clear_error(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"key": "k", "event_id": 1, "timestamp": 1, "fields": {"a": "x"}}\n')
    with pytest.raises(ValueError, match="--fields"):
        load_jsonl([str(tmp_path / "d.jsonl")], "sensors")
    with pytest.raises(FileNotFoundError, match="no JSON-lines file"):
        load_jsonl([str(tmp_path / "missing.jsonl")], "sensors")


def test_trainer_train_and_evaluate_read_a_topic_dump(tmp_path, capsys):
    write_dump(tmp_path / "train.jsonl", generate("sensors", 2, 80, seed=5))
    out = tmp_path / "model"
    assert trainer_main(["train", "--profile", "sensors", "--jsonl", str(tmp_path / "train.jsonl"), "--window", "8",
                         "--hidden", "4", "--latent", "2", "--epochs", "1", "--threads", "1", "--no-progress",
                         "--out", str(out)]) == 0
    assert f"{len(BAD_LINES)} line(s) skipped" in capsys.readouterr().out
    artifact = load_artifact(resolve_version_dir(out))
    assert artifact.metadata["training"]["data"]["rejected_rows"]["malformed_json"] == 2
    write_dump(tmp_path / "test.jsonl", generate("sensors", 2, 80, anomaly_rate=0.05, seed=6))
    report = tmp_path / "report.json"
    assert trainer_main(["evaluate", "--model-dir", str(out), "--jsonl", str(tmp_path / "test.jsonl"),
                         "--threads", "1", "--json", str(report)]) == 0
    payload = json.loads(report.read_text())
    assert payload["data"]["rejected_rows"]["missing_key"] == 1
    assert payload["metrics"]["events"] == 160 and payload["data"]["labelled_anomalies"] == 16
