"""Unit tests of the command line: generated flags, strict settings errors, --version, and the
reader and producer commands taking the same settings as the worker (no broker needed)."""

from __future__ import annotations

import dataclasses
import json
import socket

import pytest

from stream_detector import cli, producer
from stream_detector.settings import MAPPING_FIELDS, SECRET_FIELDS, Settings


def run(capsys, argv, env=None, monkeypatch=None):
    if env is not None:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith("STREAM_DETECTOR_"):
            monkeypatch.delenv(name)


def test_version_flag_prints_the_installed_version(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("stream-detector ") and out.split()[1][0].isdigit()


@pytest.mark.parametrize("command", ["worker", "settings", "produce", "alerts"])
def test_every_setting_has_a_flag_on_every_command_that_talks_to_kafka(command):
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    flags = {option for action in sub._actions for option in action.option_strings}
    for f in dataclasses.fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        assert (flag + "-file" if f.name in SECRET_FIELDS else flag) in flags, f.name


def test_flags_reach_the_settings_with_their_types(capsys, tmp_path):
    secret = tmp_path / "password"
    secret.write_text("hunter2\n")
    code, out, _ = run(capsys, ["settings", "--max-keys", "5", "--no-adaptive-thresholds", "--log-json",
                                "--threshold", "2.5", "--kafka-producer", "compression.type=zstd",
                                "--kafka-producer", "linger.ms=10", "--event-fields-path", "",
                                "--sasl-password-file", str(secret)])
    assert code == 0
    shown = json.loads(out)
    assert shown["max_keys"] == 5 and shown["adaptive_thresholds"] is False and shown["log_json"] is True
    assert shown["threshold"] == 2.5 and shown["event_fields_path"] == ""
    assert shown["kafka_producer"] == {"compression.type": "zstd", "linger.ms": "10"}
    assert shown["sasl_password"] == "***" and "hunter2" not in out


def test_flags_beat_the_environment(capsys, monkeypatch):
    code, out, _ = run(capsys, ["settings", "--max-keys", "7"], {"STREAM_DETECTOR_MAX_KEYS": "6"}, monkeypatch)
    assert code == 0 and json.loads(out)["max_keys"] == 7


@pytest.mark.parametrize("env, expected", [
    ({"STREAM_DETECTOR_LOG_JSON": "ture"},
     "setting log_json: cannot read 'ture' from environment variable STREAM_DETECTOR_LOG_JSON: not a boolean"),
    ({"STREAM_DETECTOR_BATCH_MAX": "abc"},
     "setting batch_max: cannot read 'abc' from environment variable STREAM_DETECTOR_BATCH_MAX: not a whole number"),
    ({"STREAM_DETECTOR_KAFKA_PRODUCER__ACKS": "1"}, "kafka_producer: acks=1 refused"),
])
def test_a_bad_setting_is_one_line_on_stderr_and_exit_code_2(capsys, monkeypatch, env, expected):
    code, out, err = run(capsys, ["worker"], env, monkeypatch)
    assert code == 2 and out == ""
    assert err.startswith("stream-detector: error: ") and expected in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_a_bad_flag_value_names_the_flag(capsys):
    code, _, err = run(capsys, ["settings", "--max-keys", "many"])
    assert code == 2 and "from flag --max-keys: not a whole number" in err


def test_an_unknown_variable_is_warned_about(capsys, monkeypatch, caplog):
    code, _, _ = run(capsys, ["settings"], {"STREAM_DETECTOR_FOO": "1", "STREAM_DETECTOR_MAX_KEY": "3"},
                     monkeypatch)
    assert code == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "unknown environment variable STREAM_DETECTOR_FOO ignored" in warnings
    assert ("unknown environment variable STREAM_DETECTOR_MAX_KEY ignored (did you mean "
            "STREAM_DETECTOR_MAX_KEYS?)") in warnings


def test_abbreviated_flags_are_refused():
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["worker", "--max-k", "5"])


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("command", [["alerts", "--idle-timeout", "1"], ["produce", "--keys", "1",
                                                                         "--events-per-key", "2"]])
def test_produce_and_alerts_use_the_configured_bootstrap_servers_and_fail_when_nothing_answers(
        capsys, monkeypatch, command):
    monkeypatch.setattr(producer, "REACHABLE_TIMEOUT_S", 2.0)
    address = f"127.0.0.1:{_closed_port()}"
    code, _, err = run(capsys, command, {"STREAM_DETECTOR_BOOTSTRAP_SERVERS": address}, monkeypatch)
    assert code == 1
    assert f"no Kafka broker answered at {address}" in err
