"""Unit tests for stream_detector.settings: precedence, validation, redaction, docs table."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from stream_detector.settings import CONFIG_ENV, ENV_PREFIX, MAPPING_FIELDS, Settings, SettingsError, settings_table

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
    with pytest.raises(ValueError, match="unknown setting.*flags.*inptu_topic.*did you mean input_topic"):
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
        suffix = "__<PROPERTY>" if f.name in MAPPING_FIELDS else ""
        assert line.startswith(f"| `{f.name}` | `{ENV_PREFIX}{f.name.upper()}{suffix}` |")
        assert f.metadata["doc"] in line and f.metadata["doc"]
    assert "| `threshold` | `STREAM_DETECTOR_THRESHOLD` | unset |" in table


def test_readme_settings_table_is_current():
    assert settings_table() in README.read_text(), "README settings table drifted: regenerate it"


# --- strict values, one-line errors naming the source ---------------------------------------------------


@pytest.mark.parametrize("value, expected", [("true", True), ("FALSE", False), ("1", True), ("off", False),
                                             ("yes", True)])
def test_booleans_read_from_the_environment(value, expected):
    assert Settings.load(env={ENV_PREFIX + "LOG_JSON": value}).log_json is expected


@pytest.mark.parametrize("value", ["ture", "", "2", "enabled"])
def test_a_misspelt_boolean_is_an_error_naming_the_setting_and_the_variable(value):
    with pytest.raises(SettingsError) as info:
        Settings.load(env={ENV_PREFIX + "LOG_JSON": value})
    message = str(info.value)
    assert "setting log_json" in message and "environment variable STREAM_DETECTOR_LOG_JSON" in message
    assert "not a boolean" in message and "\n" not in message


def test_a_bad_number_is_one_line_naming_the_setting_and_the_variable():
    with pytest.raises(SettingsError) as info:
        Settings.load(env={ENV_PREFIX + "BATCH_MAX": "abc"})
    assert str(info.value) == ("setting batch_max: cannot read 'abc' from environment variable "
                               "STREAM_DETECTOR_BATCH_MAX: not a whole number")


@pytest.mark.parametrize("text, name", [("log_json = 1\n", "log_json"), ("max_keys = true\n", "max_keys"),
                                        ("batch_within_s = \"nan\"\n", "batch_within_s"),
                                        ("consumer_group = 5\n", "consumer_group")])
def test_a_toml_value_of_the_wrong_type_names_the_file(tmp_path, text, name):
    path = write_toml(tmp_path, text)
    with pytest.raises(SettingsError, match=f"setting {name}: cannot read .* from config file {path}"):
        Settings.load(config_file=path, env={})


def test_a_flag_value_error_names_the_flag():
    with pytest.raises(SettingsError, match="setting max_keys: cannot read 'x' from flag --max-keys"):
        Settings.load(env={}, overrides={"max_keys": "x"})


def test_a_missing_or_broken_config_file_is_one_clear_line(tmp_path):
    with pytest.raises(SettingsError, match=r"config file .*nope.toml: cannot read it"):
        Settings.load(config_file=tmp_path / "nope.toml", env={})
    path = write_toml(tmp_path, "max_keys = = 3\n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        Settings.load(config_file=path, env={})


def test_unknown_environment_variables_are_warned_about_with_the_closest_name():
    warnings: list[str] = []
    s = Settings.load(env={ENV_PREFIX + "FOO": "1", ENV_PREFIX + "MAX_KEY": "5", ENV_PREFIX + "MAX_KEYS": "6",
                           ENV_PREFIX + "SASL_PASSWORD_FILE": "", ENV_PREFIX + "CONFIG": ""}, warn=warnings.append)
    assert s.max_keys == 6
    assert warnings == ["unknown environment variable STREAM_DETECTOR_FOO ignored",
                        "unknown environment variable STREAM_DETECTOR_MAX_KEY ignored "
                        "(did you mean STREAM_DETECTOR_MAX_KEYS?)"]


def test_a_missing_secret_file_is_an_error_naming_the_variable(tmp_path):
    with pytest.raises(SettingsError, match="sasl_password: cannot read the file .* environment variable "
                                            "STREAM_DETECTOR_SASL_PASSWORD_FILE"):
        Settings.load(env={ENV_PREFIX + "SASL_PASSWORD_FILE": str(tmp_path / "missing")})


# --- Kafka client passthrough and topic settings ---------------------------------------------------------


def test_kafka_client_tables_in_toml_and_their_environment_variables(tmp_path):
    path = write_toml(tmp_path, '[kafka.common]\n"client.id" = "sd-1"\n"socket.keepalive.enable" = true\n'
                                '[kafka.producer]\n"compression.type" = "zstd"\n"linger.ms" = 10\n'
                                '[kafka.consumer]\n"fetch.min.bytes" = 1\n')
    s = Settings.load(config_file=path, env={ENV_PREFIX + "KAFKA_PRODUCER__COMPRESSION_TYPE": "lz4",
                                             ENV_PREFIX + "KAFKA_COMMON__SASL_OAUTHBEARER_SCOPE": "kafka"})
    assert s.kafka_common == {"client.id": "sd-1", "socket.keepalive.enable": True, "sasl.oauthbearer.scope": "kafka"}
    assert s.kafka_producer == {"compression.type": "lz4", "linger.ms": 10}  # the variable beats the file
    assert s.kafka_consumer == {"fetch.min.bytes": 1}


def test_a_kafka_table_may_also_be_written_flat(tmp_path):
    path = write_toml(tmp_path, '[kafka_producer]\n"compression.type" = "zstd"\n')
    assert Settings.load(config_file=path, env={}).kafka_producer == {"compression.type": "zstd"}


@pytest.mark.parametrize("table, prop, value", [
    ("kafka_producer", "acks", "1"), ("kafka_common", "acks", "0"), ("kafka_producer", "enable.idempotence", "false"),
    ("kafka_consumer", "isolation.level", "read_uncommitted"), ("kafka_consumer", "enable.auto.commit", "true"),
    ("kafka_producer", "transactional.id", "t"),
])
def test_passthrough_refuses_to_weaken_the_delivery_guarantees(table, prop, value):
    with pytest.raises(ValueError, match=f"{table}: {prop}={value} refused"):
        Settings.load(env={f"{ENV_PREFIX}{table.upper()}__{prop.upper().replace('.', '_')}": value})


def test_passthrough_accepts_the_safe_values_of_the_safety_keys():
    s = Settings.load(env={ENV_PREFIX + "KAFKA_PRODUCER__ACKS": "all",
                           ENV_PREFIX + "KAFKA_PRODUCER__ENABLE_IDEMPOTENCE": "true",
                           ENV_PREFIX + "KAFKA_CONSUMER__ISOLATION_LEVEL": "read_committed"})
    assert s.kafka_producer == {"acks": "all", "enable.idempotence": "true"}


@pytest.mark.parametrize("prop, setting", [("bootstrap.servers", "bootstrap_servers"),
                                           ("security.protocol", "security_protocol"),
                                           ("sasl.password", "sasl_password"), ("group.id", "consumer_group")])
def test_passthrough_refuses_what_a_setting_owns_naming_the_setting(prop, setting):
    with pytest.raises(ValueError, match=f"{prop} is set by the product; use the setting {setting}"):
        Settings(kafka_common={prop: "x"})


def test_oauthbearer_is_accepted_with_oidc_properties_and_refused_without():
    oidc = {"sasl.oauthbearer.method": "oidc", "sasl.oauthbearer.client.id": "sd",
            "sasl.oauthbearer.client.secret": "s3cr3t", "sasl.oauthbearer.token.endpoint.url": "https://idp/token"}
    s = Settings(security_protocol="SASL_SSL", sasl_mechanism="OAUTHBEARER", kafka_common=oidc)
    assert s.redacted()["kafka_common"]["sasl.oauthbearer.client.secret"] == "***"
    assert "s3cr3t" not in repr(s.redacted())
    with pytest.raises(ValueError, match="OAUTHBEARER needs sasl.oauthbearer.method=oidc"):
        Settings(security_protocol="SASL_SSL", sasl_mechanism="OAUTHBEARER")


def test_topic_replication_factor_and_topic_configs():
    s = Settings.load(env={ENV_PREFIX + "TOPIC_REPLICATION_FACTOR": "3",
                           ENV_PREFIX + "ALERTS_TOPIC_CONFIG__RETENTION_MS": "604800000",
                           ENV_PREFIX + "CHANGELOG_TOPIC_CONFIG__MIN_INSYNC_REPLICAS": "2"})
    assert s.topic_replication_factor == 3
    assert s.alerts_topic_config == {"retention.ms": "604800000"}
    assert s.changelog_topic_config == {"min.insync.replicas": "2"}
    assert Settings().topic_replication_factor == -1  # the broker's default.replication.factor
    with pytest.raises(ValueError, match="topic_replication_factor"):
        Settings(topic_replication_factor=0)
    with pytest.raises(ValueError, match="cleanup.policy=delete refused"):
        Settings(changelog_topic_config={"cleanup.policy": "delete"})


def test_a_mapping_setting_given_as_a_plain_value_in_toml_is_refused(tmp_path):
    path = write_toml(tmp_path, 'kafka_producer = "zstd"\n')
    with pytest.raises(SettingsError, match="kafka_producer: config file .* must give it as a table"):
        Settings.load(config_file=path, env={})
