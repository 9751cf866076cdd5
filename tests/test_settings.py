"""Unit tests for stream_detector.settings: precedence, validation, redaction, docs table."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from stream_detector.settings import CONFIG_ENV, ENV_PREFIX, Settings, settings_table

README = Path(__file__).resolve().parent.parent / "README.md"


def write_toml(tmp_path: Path, text: str, name: str = "settings.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_without_file_or_environment():
    s = Settings.load(env={})
    assert s == Settings()
    assert s.bootstrap_servers == "127.0.0.1:9092"
    assert s.input_topic == "events" and s.alerts_topic == "alerts" and s.dead_letter_topic == "events.dlq"
    assert s.max_keys == 100_000 and s.threshold is None and s.key_field == ""
    assert s.model_path == Path("artifacts/model")


def test_toml_file_values_are_read_and_typed(tmp_path):
    path = write_toml(tmp_path, 'input_topic = "payments"\nmax_keys = 500\nbatch_within_s = 0.5\nthreshold = 2\n')
    s = Settings.load(config_file=path, env={})
    assert s.input_topic == "payments"
    assert s.max_keys == 500 and isinstance(s.max_keys, int)
    assert s.batch_within_s == 0.5
    assert s.threshold == 2.0 and isinstance(s.threshold, float)
    assert s.alerts_topic == "alerts"  # untouched fields keep defaults


def test_toml_file_may_use_a_stream_detector_table(tmp_path):
    path = write_toml(tmp_path, '[stream_detector]\nconsumer_group = "g2"\n')
    assert Settings.load(config_file=path, env={}).consumer_group == "g2"


def test_config_file_named_by_environment(tmp_path):
    path = write_toml(tmp_path, 'log_level = "debug"\n')
    assert Settings.load(env={CONFIG_ENV: str(path)}).log_level == "debug"


def test_explicit_config_file_beats_the_one_named_by_environment(tmp_path):
    env_file = write_toml(tmp_path, 'log_level = "debug"\n', "env.toml")
    cli_file = write_toml(tmp_path, 'log_level = "error"\n', "cli.toml")
    assert Settings.load(config_file=cli_file, env={CONFIG_ENV: str(env_file)}).log_level == "error"


def test_environment_overrides_file(tmp_path):
    path = write_toml(tmp_path, 'input_topic = "from-file"\nmax_keys = 10\ndevice = "cpu"\n')
    env = {ENV_PREFIX + "INPUT_TOPIC": "from-env", ENV_PREFIX + "MAX_KEYS": "20"}
    s = Settings.load(config_file=path, env=env)
    assert s.input_topic == "from-env"
    assert s.max_keys == 20 and isinstance(s.max_keys, int)
    assert s.device == "cpu"  # not in the environment: the file still counts


def test_explicit_overrides_beat_environment_and_file(tmp_path):
    path = write_toml(tmp_path, 'input_topic = "from-file"\n')
    env = {ENV_PREFIX + "INPUT_TOPIC": "from-env", ENV_PREFIX + "THRESHOLD": "3.5"}
    s = Settings.load(config_file=path, env=env, overrides={"input_topic": "from-cli", "threshold": None})
    assert s.input_topic == "from-cli"
    assert s.threshold == 3.5  # an override left as None (a flag not given) does not clobber


def test_environment_values_are_coerced():
    env = {ENV_PREFIX + "TORCH_THREADS": "4", ENV_PREFIX + "KEY_TTL_S": "60", ENV_PREFIX + "THRESHOLD": "0.25",
           ENV_PREFIX + "METRICS_PORT": "0"}
    s = Settings.load(env=env)
    assert (s.torch_threads, s.key_ttl_s, s.threshold, s.metrics_port) == (4, 60.0, 0.25, 0)
    assert isinstance(s.key_ttl_s, float)


@pytest.mark.parametrize("text", ["", "none", "None"])
def test_threshold_can_be_unset_from_environment(text):
    assert Settings.load(env={ENV_PREFIX + "THRESHOLD": text}).threshold is None


def test_unknown_setting_in_file_rejected_with_its_name_and_source(tmp_path):
    path = write_toml(tmp_path, 'input_topic = "x"\nmax_key = 5\nbogus = 1\n')
    with pytest.raises(ValueError, match="unknown setting") as info:
        Settings.load(config_file=path, env={})
    message = str(info.value)
    assert "max_key" in message and "bogus" in message and str(path) in message


def test_unknown_override_rejected():
    with pytest.raises(ValueError, match="unknown setting.*overrides.*inptu_topic"):
        Settings.load(env={}, overrides={"inptu_topic": "x"})


@pytest.mark.parametrize("name, value", [("max_keys", "lots"), ("batch_max", "1.5"), ("batch_within_s", "soon"),
                                         ("threshold", "high"), ("metrics_port", "")])
def test_bad_environment_values_rejected_naming_the_setting(name, value):
    with pytest.raises(ValueError, match=f"setting {name}: cannot read"):
        Settings.load(env={ENV_PREFIX + name.upper(): value})


def test_bad_file_value_rejected(tmp_path):
    path = write_toml(tmp_path, 'max_keys = "many"\n')
    with pytest.raises(ValueError, match="setting max_keys"):
        Settings.load(config_file=path, env={})


def test_with_changes_returns_a_new_object():
    s = Settings()
    t = s.with_changes(max_keys=7)
    assert t.max_keys == 7 and s.max_keys == 100_000
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.max_keys = 1  # type: ignore[misc]


def test_redacted_returns_every_field_when_nothing_is_secret():
    s = Settings(bootstrap_servers="broker:9092", threshold=1.5)
    out = s.redacted()
    assert out == dataclasses.asdict(s)
    assert set(out) == {f.name for f in dataclasses.fields(Settings)}


def test_redacted_masks_secret_like_names():
    @dataclass(frozen=True)
    class WithSecrets(Settings):
        sasl_password: str = field(default="hunter2")
        api_token: str = field(default="")
        client_secret: str = field(default="s3cr3t")

    s = WithSecrets()
    out = s.redacted()
    assert out["sasl_password"] == "***" and out["client_secret"] == "***"
    assert out["api_token"] == ""  # nothing to hide: shown as unset
    assert out["bootstrap_servers"] == "127.0.0.1:9092"
    assert "hunter2" not in repr(out) and "s3cr3t" not in repr(out)
    assert s.sasl_password == "hunter2"  # the settings themselves are untouched


def test_settings_table_lists_every_field_with_its_env_var():
    table = settings_table()
    lines = table.splitlines()
    names = [f.name for f in dataclasses.fields(Settings)]
    assert len(lines) == 2 + len(names)
    for f, line in zip(dataclasses.fields(Settings), lines[2:]):
        assert line.startswith(f"| `{f.name}` | `{ENV_PREFIX}{f.name.upper()}` |")
        assert f.metadata["doc"] in line and f.metadata["doc"]
    assert "| `threshold` | `STREAM_DETECTOR_THRESHOLD` | unset |" in table


def test_readme_settings_table_is_current():
    assert settings_table() in README.read_text(), "README settings table drifted: regenerate it"
