"""The one settings object: defaults, then a TOML file, then environment variables, then flags.

Every field can be set in a TOML file (``STREAM_DETECTOR_CONFIG=path`` or ``--config``), by an
environment variable named ``STREAM_DETECTOR_<FIELD>`` in upper case and by a flag ``--<field>``
(generated from the fields). Mapping settings (Kafka client properties, topic configs) are TOML
tables and ``STREAM_DETECTOR_<FIELD>__<PROPERTY>`` variables. Values are read strictly: a value
that is not of its setting's type is an error naming the setting and where the value came from.
The README's settings table is generated from the field metadata below, so the documentation
cannot drift from the code.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

ENV_PREFIX = "STREAM_DETECTOR_"
CONFIG_ENV = ENV_PREFIX + "CONFIG"
# STREAM_DETECTOR_<MAPPING>__<PROPERTY>: the property in lower case, `_` read as `.`
# (STREAM_DETECTOR_KAFKA_PRODUCER__COMPRESSION_TYPE -> kafka_producer["compression.type"]).
MAPPING_SEPARATOR = "__"

log = logging.getLogger("stream_detector.settings")


class SettingsError(ValueError):
    """A setting that cannot be used: one line naming the setting and where its value came from."""


def _mapping(text: str) -> Any:
    return field(default_factory=dict, metadata={"doc": text, "mapping": True})


def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


@dataclass(frozen=True)
class Settings:
    """Worker configuration. Secrets are never printed: see :meth:`redacted`."""

    bootstrap_servers: str = field(default="127.0.0.1:9092", metadata=_doc("Kafka bootstrap servers, comma-separated."))
    input_topic: str = field(default="events", metadata=_doc("Topic the worker consumes events from."))
    alerts_topic: str = field(default="alerts", metadata=_doc("Topic alerts are published to, keyed by event key."))
    dead_letter_topic: str = field(
        default="events.dlq", metadata=_doc("Topic invalid events go to, with their original bytes and the reason.")
    )
    scores_topic: str = field(
        default="",
        metadata=_doc("When set, every scored event's score is published here too (audits, offline analysis)."),
    )
    feedback_topic: str = field(
        default="",
        metadata=_doc("Compacted topic of operators' verdicts on incidents (`stream-detector ack`), keyed by "
                      "incident id; empty = `<alerts_topic>.feedback`."),
    )
    shadow_topic: str = field(
        default="",
        metadata=_doc("Topic the challenger's alerts go to while it shadows the champion (never to `alerts_topic`); "
                      "empty = `<alerts_topic>.shadow`."),
    )
    consumer_group: str = field(default="stream-detector", metadata=_doc("Kafka consumer group (Faust app id)."))
    auto_offset_reset: str = field(
        default="earliest", metadata=_doc("Where a new consumer group starts: `earliest` or `latest`.")
    )
    security_protocol: str = field(
        default="PLAINTEXT", metadata=_doc("`PLAINTEXT`, `SSL`, `SASL_PLAINTEXT` or `SASL_SSL`.")
    )
    ssl_cafile: str = field(default="", metadata=_doc("PEM file of the CA that signed the brokers' certificates."))
    ssl_certfile: str = field(default="", metadata=_doc("PEM client certificate, for brokers that require TLS client auth."))
    ssl_keyfile: str = field(default="", metadata=_doc("PEM private key of the client certificate."))
    ssl_key_password: str = field(
        default="", metadata=_doc("Password of the client key (secret: prefer `..._FILE`, never logged).")
    )
    ssl_check_hostname: bool = field(default=True, metadata=_doc("Verify that broker certificates match their host."))
    sasl_mechanism: str = field(default="", metadata=_doc("`PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512` with SASL_*."))
    sasl_username: str = field(default="", metadata=_doc("SASL user name."))
    sasl_password: str = field(
        default="", metadata=_doc("SASL password (secret: prefer `STREAM_DETECTOR_SASL_PASSWORD_FILE`, never logged).")
    )
    sasl_plain_without_tls: bool = field(
        default=False,
        metadata=_doc("Allow `sasl_mechanism` `PLAIN` with `SASL_PLAINTEXT`, which sends the password in clear "
                      "text; refused unless set (use `SASL_SSL`)."),
    )
    kafka_common: dict[str, Any] = _mapping(
        "Client properties (librdkafka names, e.g. `client.id`, `sasl.oauthbearer.method`) given to every Kafka "
        "client: TOML table `[kafka.common]`. Applied after the product's own; those the product sets from its "
        "settings (`bootstrap.servers`, `security.protocol`, `sasl.*` credentials, `ssl.*` files, `group.id`) "
        "and its safety keys are refused. The Faust consumer (aiokafka) takes a subset (README).")
    kafka_consumer: dict[str, Any] = _mapping(
        "Properties of the consuming clients only (`[kafka.consumer]`); `isolation.level` stays "
        "`read_committed`, `enable.auto.commit` is the product's.")
    kafka_producer: dict[str, Any] = _mapping(
        "Properties of the producing clients only (`[kafka.producer]`, e.g. `compression.type`); `acks` stays "
        "`all` and `enable.idempotence` true.")
    topic_replication_factor: int = field(
        default=-1, metadata=_doc("Replication factor of the topics the product creates (input, alerts, dead "
                                  "letters, scores, window changelog); -1 = the broker's "
                                  "`default.replication.factor`.")
    )
    alerts_topic_config: dict[str, Any] = _mapping(
        "Topic configs (e.g. `retention.ms`, `min.insync.replicas`) for the alerts topic when the product creates it.")
    dead_letter_topic_config: dict[str, Any] = _mapping(
        "Topic configs for the dead-letter topic when the product creates it.")
    changelog_topic_config: dict[str, Any] = _mapping(
        "Topic configs for the window-state changelog when the product creates it (`cleanup.policy` stays "
        "`compact`).")
    session_timeout_s: float = field(
        default=10.0,
        metadata=_doc("Consumer group session timeout: how soon a dead worker's partitions move to another."),
    )
    model_dir: str = field(
        default="artifacts/model",
        metadata=_doc("Model artifact directory, or a directory of versions: its `champion` alias is served "
                      "(without aliases, the newest loadable version by creation time)."),
    )
    model_signing_key_file: str = field(
        default="",
        metadata=_doc("HMAC-SHA256 key file (kept outside the model directory); when set, unsigned or wrongly "
                      "signed artifacts are refused."),
    )
    model_poll_s: float = field(
        default=10.0,
        metadata=_doc("How often the model directory is checked for a new champion (or newer version) to "
                      "hot-swap, and for a new or removed challenger to shadow it; 0 disables."),
    )
    device: str = field(default="auto", metadata=_doc("`auto` (CUDA when available), `cpu`, `cuda` or `cuda:N`."))
    torch_threads: int = field(
        default=0, metadata=_doc("Intra-op threads for CPU inference; 0 = one fewer than the cores (the event loop "
                                 "keeps one), at least 1.")
    )
    gil_switch_interval_s: float = field(
        default=0.0001, metadata=_doc("Python's thread switch interval in the worker (`sys.setswitchinterval`; "
                                      "Python: 0.005): how long the inference and Kafka threads may wait for the "
                                      "GIL while the event loop runs Python. Benchmark (b) on 2 cores: "
                                      "36,421 events/s at 0.0005, 42,773 at 0.0001.")
    )
    batch_max: int = field(default=1024, metadata=_doc("Most events gathered into one micro-batch."))
    batch_within_s: float = field(
        default=0.02, metadata=_doc("Longest wait for a micro-batch to fill before it is scored anyway.")
    )
    key_field: str = field(
        default="",
        metadata=_doc("Window key taken from this event field (e.g. `terminal_id`) instead of the event `key`."),
    )
    key_partition_check: str = field(
        default="off",
        metadata=_doc("An event whose Kafka record key is not its window key (null, another key, a `key_field` "
                      "other than the record key) or that reaches another partition than its key's: "
                      "`repartition`: forwarded to `<consumer_group>-<input_topic>-repartition`, keyed by its window "
                      "key, to its key's partition, and windowed there with the key's other events; "
                      "`dead_letter`: dead-lettered (`key_partition_mismatch`); `off`: windowed where it arrives "
                      "(its key's window split across partitions)."),
    )
    repartition_partitioner: str = field(
        default="consistent",
        metadata=_doc("With `key_partition_check=repartition`, the partitioner the input's producers key records "
                      "with, which gives each key its partition: `consistent` (CRC-32, librdkafka's default: "
                      "confluent-kafka and the other librdkafka clients) or `murmur2` (Java clients, Kafka Streams, "
                      "aiokafka). Another than the producers' loses nothing, but forwards their well keyed events too."),
    )
    # Event envelope (README: "Event schema"): where the key, time, id and fields are in a record.
    event_key_from: str = field(
        default="body", metadata=_doc("Where the event key is: `body` (at `event_key_path`) or `record_key` (the "
                                      "Kafka record key, UTF-8).")
    )
    event_key_path: str = field(
        default="key", metadata=_doc("Body path of the event key (dot-separated for nested objects: `meta.device`).")
    )
    event_time_from: str = field(
        default="body", metadata=_doc("Where the event time is: `body` (at `event_time_path`) or `record_timestamp` "
                                      "(the Kafka record timestamp).")
    )
    event_time_path: str = field(default="timestamp", metadata=_doc("Body path of the event time."))
    event_id_from: str = field(
        default="body", metadata=_doc("Where the event id is: `body` (at `event_id_path`) or `record_position` "
                                      "(`topic:partition:offset`, the same when a record is redelivered).")
    )
    event_id_path: str = field(default="event_id", metadata=_doc("Body path of the event id."))
    event_fields_path: str = field(
        default="fields", metadata=_doc("Body path of the object holding the profile's fields; empty = the top "
                                        "level (a flat event).")
    )
    # Schema Registry (README: "Schema Registry"): framed Avro, JSON Schema and Protobuf values.
    schema_registry_url: str = field(
        default="", metadata=_doc("Confluent-compatible Schema Registry (`http(s)://host:port`); when set, values "
                                  "starting with the magic byte 0 are decoded with their registered schema (Avro, "
                                  "JSON Schema, Protobuf), the rest as JSON; empty = JSON only. Needs the "
                                  "`schema-registry` extra.")
    )
    schema_registry_user_info: str = field(
        default="", metadata=_doc("Registry basic auth as `user:password` (secret: prefer "
                                  "`STREAM_DETECTOR_SCHEMA_REGISTRY_USER_INFO_FILE`, never logged).")
    )
    schema_registry_ca_file: str = field(
        default="", metadata=_doc("PEM file of the CA that signed the registry's certificate (https).")
    )
    schema_registry_timeout_s: float = field(
        default=10.0, metadata=_doc("Timeout of one registry request (each schema id is fetched once, then cached).")
    )
    alerts_schema_register: bool = field(
        default=False, metadata=_doc("Register the alert JSON Schema under `<alerts_topic>-value` in the registry "
                                     "at start (alerts stay plain JSON).")
    )
    max_keys: int = field(
        default=100_000, metadata=_doc("Most keys with a live window; the least recently seen is evicted beyond it.")
    )
    key_ttl_s: float = field(
        default=86_400.0,
        metadata=_doc("A key idle this long (monotonic clock: a step of the wall clock evicts nothing) loses its window."),
    )
    state_min_events: int = field(
        default=1,
        metadata=_doc("A key's window is written to the state changelog once it holds this many events. Above 1, "
                      "the offsets of a key's first events are committed before its window is written: after a "
                      "rebalance or a crash the key starts over without them, and as many of its first "
                      "full-window events only fill its window again, never scored."),
    )
    state_flush_s: float = field(
        default=1.0,
        metadata=_doc("A changed key's window snapshot goes to the state changelog this long after the key first "
                      "changed (at the next micro-batch boundary; at once after 0.1 s without events), so a busy "
                      "key is written once per interval, not once per micro-batch, and the writes are spread over "
                      "the batches. Input offsets are acked once the snapshots covering them are written. "
                      "0: after every micro-batch, every key it changed. Probe at 12,000 events/s over 2,000 keys, "
                      "3 runs each: p99 event-to-alert 143 to 358 ms at 0.5 s, 113 to 130 ms at 1 s. A crash "
                      "re-delivers at most about this much more (offsets are committed every second anyway); restored windows take it again."),
    )
    max_message_bytes: int = field(
        default=1_000_000, metadata=_doc("Larger messages are dead-lettered with reason `oversized`.")
    )
    max_future_s: float = field(
        default=86_400.0,
        metadata=_doc("Events timestamped further than this ahead of the wall clock are dead-lettered."),
    )
    threshold: float | None = field(
        default=None, metadata=_doc("Overrides the artifact's alert threshold when set.")
    )
    top_features: int = field(default=3, metadata=_doc("Contributing features listed in each alert."))
    metrics_host: str = field(default="127.0.0.1", metadata=_doc("Address the Prometheus metrics endpoint binds to."))
    metrics_port: int = field(default=9108, metadata=_doc("Port of the Prometheus metrics endpoint; 0 disables it."))
    log_level: str = field(default="info", metadata=_doc("`debug`, `info`, `warning` or `error`."))
    log_json: bool = field(
        default=False, metadata=_doc("Log one JSON object per line (`ts`, `level`, `logger`, `message`) instead of text.")
    )
    lag_exporter: bool = field(
        default=True, metadata=_doc("Read the consumer group's lag and export it (`stream_detector_consumer_lag`); "
                                    "false where kafka_exporter or another exporter already does (README: Metrics).")
    )
    lag_interval_s: float = field(
        default=5.0, metadata=_doc("Seconds between reads of the consumer group's lag (`stream_detector_consumer_lag`).")
    )
    # Thresholds and the alert lifecycle (README: "Thresholds and alert lifecycle").
    tail_calibration: bool = field(
        default=True,
        metadata=_doc("Judge each window by its *surprise*: -log10 of its tail probability under its key's own "
                      "running statistics of model scores and of feature values (the larger of the two). Replaces "
                      "`adaptive_thresholds` when true; a key uses the global threshold during its warm-up."),
    )
    tail_alert_surprise: float = field(
        default=8.0, metadata=_doc("Surprise at which a window is over threshold (8 = a tail probability of "
                                   "1e-8); the alert's severity is surprise / this value.")
    )
    tail_horizon: int = field(
        default=2000, metadata=_doc("Windows of memory of a key's running statistics (exponential; exact until "
                                    "then), so slow drift is followed.")
    )
    tail_warmup: int = field(
        default=100, metadata=_doc("Windows of a key before its own statistics judge it (the global threshold "
                                   "applies until then).")
    )
    tail_values: bool = field(
        default=True, metadata=_doc("Also judge the newest event's feature values against the key's running "
                                    "mean and spread of each feature (false = the model's score alone).")
    )
    tail_values_tail: str = field(
        default="empirical",
        metadata=_doc("Tail of the values check: `empirical` = a value as far out as at least `tail_spike_after` "
                      "of the key's recent windows were is judged by how often that happened (recurring spikes "
                      "stop alerting; a value farther out than any before, or one held longer than 3 windows, "
                      "by the normal tail); `normal` = a normal distribution on the running spread alone."),
    )
    tail_spike_after: float = field(
        default=4.0, metadata=_doc("With an empirical tail: windows of the key's horizon that must have "
                                   "reached a level before a value (or score) at that level stops being rare.")
    )
    tail_score_tail: str = field(
        default="normal",
        metadata=_doc("Tail of the model-score check: `normal` = a normal distribution on the running spread of the "
                      "key's scores; `empirical` = the values check's empirical rule on the score's upper tail (a "
                      "score as high as at least `tail_spike_after` recent windows' is judged by how often that "
                      "happened, unless it is held longer than 3 windows or higher than any before)."),
    )
    tail_seasonal: bool = field(
        default=False,
        metadata=_doc("Also judge the newest values against the same phase of the key's own period: a key whose first "
                      "2 x `tail_season_max` + 1 windows repeat with a period (autocorrelation at least "
                      "`tail_season_min_acf`) learns each phase's value and is judged by its distance from it (a day "
                      "without its usual peak, a flat stretch where the key usually moves). Phases count windows, "
                      "so it assumes a regular cadence. Costs 4 x (2 x `tail_season_max` + 1) bytes per feature "
                      "per key."),
    )
    tail_season_max: int = field(
        default=300, metadata=_doc("With `tail_seasonal`: the longest period, in windows, looked for.")
    )
    tail_season_min_acf: float = field(
        default=0.8, metadata=_doc("With `tail_seasonal`: the autocorrelation at its period below which a key "
                                   "is taken to have none.")
    )
    tail_season_max_features: int = field(
        default=1, metadata=_doc("With `tail_seasonal`: the check runs only for models with at most this many "
                                 "features (its buffer costs memory per feature and key; 1 = univariate streams).")
    )
    adaptive_thresholds: bool = field(
        default=True,
        metadata=_doc("With `tail_calibration` false: per-key thresholds that follow each key's recent normal "
                      "scores, within bounds around the global threshold (which a key uses until its warm-up is "
                      "over); false = the global threshold for every key."),
    )
    threshold_warmup_windows: int = field(
        default=64, metadata=_doc("Windows of a key at or below threshold before its own threshold replaces the "
                                  "global one.")
    )
    threshold_history: int = field(
        default=128, metadata=_doc("Recent normal scores kept per key for its threshold (4 bytes each); scores over "
                                   "the threshold are never added.")
    )
    threshold_min_ratio: float = field(
        default=0.5, metadata=_doc("Lowest per-key threshold, as a fraction of the global threshold.")
    )
    threshold_max_ratio: float = field(
        default=2.0, metadata=_doc("Highest per-key threshold, as a multiple of the global threshold.")
    )
    alert_min_windows: int = field(
        default=2, metadata=_doc("Consecutive windows over threshold that open an incident; a shorter run is a "
                                 "suppressed blip (unless `alert_open_severity` is reached).")
    )
    alert_open_severity: float = field(
        default=2.0, metadata=_doc("A window this far over its threshold (severity = score / threshold) opens an "
                                   "incident at once, whatever `alert_min_windows`.")
    )
    alert_close_after: int = field(
        default=8, metadata=_doc("Consecutive windows at or below threshold that close an incident.")
    )
    alert_update_every: int = field(
        default=16, metadata=_doc("An open incident publishes an update at least every this many new windows over "
                                  "threshold.")
    )
    alert_update_growth: float = field(
        default=1.5, metadata=_doc("An open incident publishes an update as soon as its peak severity grows by this "
                                   "factor over the last one published.")
    )
    incident_idle_close_s: float = field(
        default=600.0, metadata=_doc("An incident whose key has had no scored window this long (monotonic "
                                     "clock: a step of the wall clock closes nothing) is closed.")
    )
    drift_halflife_windows: int = field(
        default=10_000, metadata=_doc("Half-life, in scored windows, of the moving mean of each feature's "
                                      "standardised value behind `stream_detector_feature_drift`.")
    )
    # Throughput (README: "Performance").
    batch_adaptive: bool = field(
        default=True, metadata=_doc("Micro-batches as large as the backlog: a batch is scored as soon as no more "
                                    "events are waiting (1 ms linger), up to `batch_max`, its gathering capped "
                                    "by `batch_within_s`; false = wait `batch_within_s` unless `batch_max` "
                                    "events come first (Faust's `take_events`).")
    )
    batch_pipeline: bool = field(
        default=True, metadata=_doc("With adaptive batches, under a backlog (a full batch or more waiting): window "
                                    "the next batch and queue it for the model before this one is judged, so the "
                                    "model thread never waits for the loop nor the loop for the model. Off: each batch is finished before the next is windowed (measured "
                                    "on the benchmark's backlog: 22,037 and 22,358 events/s on, 18,893 and 18,760 "
                                    "off).")
    )
    consumer_fast_path: bool = field(
        default=True, metadata=_doc("Faust's fetcher hands each event to the stream without the four tasks per "
                                    "event of its `wait_first` (blocking deliveries still go through it), "
                                    "through the worker's own Faust transport "
                                    "(`stream_detector/kafka/faust_fastpath.py`). Off: Faust's own consumer "
                                    "and producer classes.")
    )
    stream_buffer_max: int = field(
        default=65_536, metadata=_doc("Events fetched ahead and waiting for the agent (Faust's "
                                      "`stream_buffer_maxsize`, 4,096 by default). Above 80 % Faust pauses "
                                      "fetching and refetches later; with fetches of up to ~12,000 events "
                                      "(1 MiB per partition) a small buffer does that every fetch (measured: "
                                      "12,000 events/s at 16,384, 27,000 at 65,536, Faust counting only).")
    )
    fetch_max_wait_ms: int = field(
        default=20, metadata=_doc("How long the broker may hold a fetch for partitions with nothing new. Faust "
                                  "uses 1,500 ms, and while such a fetch is out no other is sent to that "
                                  "broker, so events that arrive for partitions left out of it wait that long.")
    )
    score_stride: int = field(
        default=1, metadata=_doc("Score only every this many windows of a hot key (see `hot_key_rate`); the "
                                 "others still enter its window and are counted in "
                                 "`stream_detector_events_unscored_total`. 1 = score every event.")
    )
    hot_key_rate: float = field(
        default=0.0, metadata=_doc("Event-time rate (events/s, moving average over about 8 events) above which "
                                   "a key is hot and `score_stride` applies to it; 0 = every key.")
    )

    def __post_init__(self) -> None:
        problems = []
        if self.auto_offset_reset not in ("earliest", "latest"):
            problems.append(f"auto_offset_reset must be earliest or latest, not {self.auto_offset_reset!r}")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            problems.append(f"log_level must be debug, info, warning or error, not {self.log_level!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            problems.append(f"device must be auto, cpu, cuda or cuda:N, not {self.device!r}")
        for name in ("batch_max", "max_keys", "max_message_bytes", "state_min_events", "stream_buffer_max"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        for name in ("torch_threads", "top_features", "metrics_port"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative")
        if not 6.0 <= self.session_timeout_s <= 300.0:
            problems.append("session_timeout_s must be within 6..300 (the broker's group limits)")
        if self.max_future_s <= 0:
            problems.append("max_future_s must be positive")
        if self.model_poll_s < 0:
            problems.append("model_poll_s must not be negative")
        if self.batch_within_s <= 0 or self.key_ttl_s <= 0:
            problems.append("batch_within_s and key_ttl_s must be positive")
        if not 0 < self.gil_switch_interval_s <= 0.1:
            problems.append("gil_switch_interval_s must be within (0, 0.1]")
        if not 0 <= self.fetch_max_wait_ms <= 30_000:
            problems.append("fetch_max_wait_ms must be within [0, 30000]")
        if not self.lag_interval_s > 0:
            problems.append("lag_interval_s must be positive")
        if not 0 <= self.state_flush_s <= 60:
            problems.append("state_flush_s must be within [0, 60] (Faust's rebalances wait for unacked events)")
        if self.security_protocol not in ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"):
            problems.append(f"security_protocol must be PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL, "
                            f"not {self.security_protocol!r}")
        if self.security_protocol.startswith("SASL"):
            if self.sasl_mechanism not in SASL_MECHANISMS:
                problems.append("sasl_mechanism must be PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or OAUTHBEARER with SASL")
            elif self.sasl_mechanism == "OAUTHBEARER":
                oauth = {**self.kafka_common, **self.kafka_consumer}
                if str(oauth.get("sasl.oauthbearer.method", "")).lower() != "oidc":
                    problems.append("sasl_mechanism OAUTHBEARER needs sasl.oauthbearer.method=oidc (with "
                                    "sasl.oauthbearer.token.endpoint.url, .client.id, .client.secret) in kafka_common")
            elif not self.sasl_username or not self.sasl_password:
                problems.append("sasl_username and sasl_password are required with SASL")
            if (self.security_protocol == "SASL_PLAINTEXT" and self.sasl_mechanism == "PLAIN"
                    and not self.sasl_plain_without_tls):
                problems.append("sasl_mechanism PLAIN over SASL_PLAINTEXT sends the password in clear text: use "
                                "SASL_SSL, a SCRAM mechanism, or set sasl_plain_without_tls=true to accept that")
        if self.topic_replication_factor == 0 or self.topic_replication_factor < -1:
            problems.append("topic_replication_factor must be -1 (the broker's default) or at least 1")
        problems.extend(_passthrough_problems(self))
        for name in ("threshold_history", "threshold_warmup_windows", "alert_min_windows", "alert_close_after",
                     "alert_update_every"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        if self.drift_halflife_windows < 1:
            problems.append("drift_halflife_windows must be at least 1")
        if self.feedback_topic and self.feedback_topic in (self.input_topic, self.alerts_topic,
                                                           self.dead_letter_topic):
            problems.append("feedback_topic must be a topic of its own")
        if self.shadow_topic_name in (self.input_topic, self.alerts_topic, self.dead_letter_topic,
                                      self.feedback_topic_name, self.scores_topic):
            problems.append("shadow_topic must be a topic of its own")
        if self.threshold_warmup_windows > self.threshold_history:
            problems.append("threshold_warmup_windows must not exceed threshold_history")
        if not 0 < self.threshold_min_ratio <= 1:
            problems.append("threshold_min_ratio must be in (0, 1]")
        if not (self.tail_alert_surprise > 0 and self.tail_alert_surprise < float("inf")):
            problems.append("tail_alert_surprise must be positive and finite")
        if self.tail_horizon < 2 or not 2 <= self.tail_warmup <= self.tail_horizon:
            problems.append("tail_horizon must be at least 2 and tail_warmup in [2, tail_horizon]")
        if self.tail_values_tail not in ("normal", "empirical"):
            problems.append(f"tail_values_tail must be normal or empirical, not {self.tail_values_tail!r}")
        if self.tail_season_max < 2 or not 0 < self.tail_season_min_acf <= 1:
            problems.append("tail_season_max must be at least 2 and tail_season_min_acf in (0, 1]")
        if self.tail_season_max_features < 1:
            problems.append("tail_season_max_features must be at least 1")
        if self.tail_score_tail not in ("normal", "empirical"):
            problems.append(f"tail_score_tail must be normal or empirical, not {self.tail_score_tail!r}")
        if not self.tail_spike_after > 0:
            problems.append("tail_spike_after must be positive")
        if not 1 <= self.threshold_max_ratio < float("inf"):
            problems.append("threshold_max_ratio must be at least 1 and finite")
        for name in ("alert_open_severity", "alert_update_growth"):
            if not getattr(self, name) >= 1:
                problems.append(f"{name} must be at least 1")
        if not self.incident_idle_close_s > 0:
            problems.append("incident_idle_close_s must be positive")
        if self.score_stride < 1:
            problems.append("score_stride must be at least 1")
        if not 0 <= self.hot_key_rate < float("inf"):
            problems.append("hot_key_rate must be zero or positive and finite")
        for name, allowed in (("key_partition_check", ("off", "dead_letter", "repartition")),
                              ("repartition_partitioner", ("consistent", "murmur2")), ("event_key_from", ("body", "record_key")), ("event_time_from", ("body", "record_timestamp")),
                              ("event_id_from", ("body", "record_position"))):
            if getattr(self, name) not in allowed:
                problems.append(f"{name} must be {' or '.join(allowed)}, not {getattr(self, name)!r}")
        for name in ("event_key_path", "event_time_path", "event_id_path", "event_fields_path"):
            path = getattr(self, name)
            if (path or name != "event_fields_path") and not all(path.split(".")):
                problems.append(f"{name} must be dot-separated non-empty names, not {path!r}")
        if self.schema_registry_url and not self.schema_registry_url.startswith(("http://", "https://")):
            problems.append("schema_registry_url must start with http:// or https://")
        if not self.schema_registry_timeout_s > 0:
            problems.append("schema_registry_timeout_s must be positive")
        if self.alerts_schema_register and not self.schema_registry_url:
            problems.append("alerts_schema_register needs schema_registry_url")
        if self.key_field and self.event_key_from != "body":
            problems.append("key_field reads the key from the event's fields: it needs event_key_from=body")
        if problems:
            raise SettingsError("invalid settings: " + "; ".join(problems))

    def envelope(self) -> Any:
        """The :class:`~stream_detector.events.Envelope` these settings describe."""
        from .events import Envelope

        return Envelope(key_from=self.event_key_from, key_path=self.event_key_path, time_from=self.event_time_from,
                        time_path=self.event_time_path, event_id_from=self.event_id_from,
                        event_id_path=self.event_id_path, fields_path=self.event_fields_path)

    @classmethod
    def load(
        cls,
        config_file: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
        warn: Callable[[str], None] | None = None,
    ) -> "Settings":
        """Builds settings with precedence: overrides (flags) > environment > file > defaults.

        Raises :class:`SettingsError` (one line: the setting, the value's source, the reason) for a
        value of the wrong type or an unknown name in the file or the overrides; an unknown
        ``STREAM_DETECTOR_*`` variable is reported through ``warn`` (a log warning by default) with
        the closest known name, since other tools may share the prefix.
        """
        env = os.environ if env is None else env
        warn = warn or log.warning
        values: dict[str, tuple[Any, str]] = {}  # name -> (raw value, where it came from)
        mappings: dict[str, dict[str, tuple[Any, str]]] = {name: {} for name in MAPPING_FIELDS}
        path = config_file or env.get(CONFIG_ENV)
        if path:
            source = f"config file {path}"
            try:
                with open(path, "rb") as fh:
                    data = tomllib.load(fh)
            except OSError as exc:
                raise SettingsError(f"{source}: cannot read it: {exc.strerror or exc}") from None
            except tomllib.TOMLDecodeError as exc:
                raise SettingsError(f"{source}: not valid TOML: {exc}") from None
            data = _flatten_tables(data.get("stream_detector", data))
            for name, value in _check_names(cls, data, source=source).items():
                if name in MAPPING_FIELDS:
                    if not isinstance(value, dict):
                        raise SettingsError(f"setting {name}: {source} must give it as a table of properties")
                    mappings[name].update({str(k): (v, source) for k, v in value.items()})
                else:
                    values[name] = (value, source)
        for name in SECRET_FIELDS:  # a secret may come from a file: `<name>_file` / `..._FILE`
            variable = ENV_PREFIX + name.upper() + "_FILE"
            secret_file = values.pop(name + "_file", None)
            if env.get(variable):
                secret_file = (env[variable], f"environment variable {variable}")
            if secret_file:
                values[name] = (_read_secret(name, *secret_file), secret_file[1])
        known = {f.name: f for f in fields(cls)}
        for variable in sorted(env):
            if not variable.startswith(ENV_PREFIX) or variable == CONFIG_ENV:
                continue
            rest = variable[len(ENV_PREFIX):]
            source = f"environment variable {variable}"
            if MAPPING_SEPARATOR in rest:
                name, _, prop = rest.partition(MAPPING_SEPARATOR)
                if name.lower() in MAPPING_FIELDS and prop:
                    mappings[name.lower()][prop.lower().replace("_", ".")] = (env[variable], source)
                    continue
            elif rest.lower() in known and rest.lower() not in MAPPING_FIELDS:
                values[rest.lower()] = (env[variable], source)
                continue
            elif rest.endswith("_FILE") and rest[:-5].lower() in SECRET_FIELDS:
                continue
            warn(f"unknown environment variable {variable} ignored{_suggestion(rest.lower(), known)}")
        if overrides:
            for name, value in _check_names(cls, overrides, source="flags").items():
                if value is None:
                    continue
                flag = "--" + name.replace("_", "-")
                if name in MAPPING_FIELDS:
                    mappings[name].update({str(k): (v, f"flag {flag}") for k, v in dict(value).items()})
                elif name.endswith("_file"):
                    values[name[:-5]] = (_read_secret(name[:-5], value, f"flag {flag}"), f"flag {flag}")
                else:
                    values[name] = (value, f"flag {flag}")
        kwargs: dict[str, Any] = {name: _coerce(cls, name, value, source) for name, (value, source) in values.items()}
        for name, entries in mappings.items():
            if entries:
                kwargs[name] = {prop: _property(name, prop, value, source) for prop, (value, source) in entries.items()}
        return cls(**kwargs)

    def __repr__(self) -> str:
        """Secrets masked: a Settings object in a log line or a traceback never shows a password."""
        return "Settings(" + ", ".join(f"{name}={value!r}" for name, value in self.redacted().items()) + ")"

    __str__ = __repr__

    def with_changes(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)

    def redacted(self) -> dict[str, Any]:
        """A dict safe to log: anything that looks like a secret is masked."""
        out = dataclasses.asdict(self)
        for name in out:
            if name in SECRET_FIELDS or any(word in name for word in ("password", "secret", "token")):
                out[name] = "***" if out[name] else out[name]
            elif name == "schema_registry_url" and "@" in out[name]:  # credentials in the URL
                scheme, _, rest = out[name].partition("://")
                out[name] = f"{scheme}://***@{rest.rpartition('@')[2]}"
            elif name in MAPPING_FIELDS:  # client properties may hold secrets (sasl.oauthbearer.client.secret)
                out[name] = {k: "***" if any(word in k for word in ("password", "secret", "token", "jaas")) else v
                             for k, v in out[name].items()}
        return out

    @property
    def feedback_topic_name(self) -> str:
        """The feedback topic: ``feedback_topic``, or ``<alerts_topic>.feedback`` when it is empty."""
        return self.feedback_topic or f"{self.alerts_topic}.feedback"

    @property
    def repartition_topic_name(self) -> str:
        """The internal topic events are forwarded to with ``key_partition_check=repartition``."""
        return f"{self.consumer_group}-{self.input_topic}-repartition"

    @property
    def shadow_topic_name(self) -> str:
        """The shadow topic: ``shadow_topic``, or ``<alerts_topic>.shadow`` when it is empty."""
        return self.shadow_topic or f"{self.alerts_topic}.shadow"

    @property
    def model_path(self) -> Path:
        return Path(self.model_dir)


SECRET_FIELDS = ("ssl_key_password", "sasl_password", "schema_registry_user_info")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER")
MAPPING_FIELDS = tuple(f.name for f in fields(Settings) if f.metadata.get("mapping"))
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")

# Client properties the product sets from its own settings: given in a passthrough table they are
# refused, naming the setting to use instead.
OWNED_PROPERTIES = {
    "bootstrap.servers": "bootstrap_servers", "metadata.broker.list": "bootstrap_servers",
    "security.protocol": "security_protocol", "sasl.mechanism": "sasl_mechanism", "sasl.mechanisms": "sasl_mechanism",
    "sasl.username": "sasl_username", "sasl.password": "sasl_password",
    "ssl.ca.location": "ssl_cafile", "ssl.certificate.location": "ssl_certfile", "ssl.key.location": "ssl_keyfile",
    "ssl.key.password": "ssl_key_password", "ssl.endpoint.identification.algorithm": "ssl_check_hostname",
    "group.id": "consumer_group", "auto.offset.reset": "auto_offset_reset", "session.timeout.ms": "session_timeout_s",
}
# Safety keys: the only values a passthrough table may give them (at-least-once delivery without
# duplicates rests on them); None: the product's alone.
SAFETY_PROPERTIES: dict[str, dict[str, tuple[str, ...] | None]] = {
    "kafka_producer": {"acks": ("all", "-1"), "enable.idempotence": ("true",), "transactional.id": None},
    "kafka_consumer": {"isolation.level": ("read_committed",), "enable.auto.commit": None,
                       "enable.auto.offset.store": None},
}
SAFETY_PROPERTIES["kafka_common"] = {**SAFETY_PROPERTIES["kafka_producer"], **SAFETY_PROPERTIES["kafka_consumer"]}


def _passthrough_problems(settings: Settings) -> list[str]:
    problems = []
    for name in ("kafka_common", "kafka_consumer", "kafka_producer"):
        for prop, value in getattr(settings, name).items():
            if prop in OWNED_PROPERTIES:
                problems.append(f"{name}: {prop} is set by the product; use the setting "
                                f"{OWNED_PROPERTIES[prop]} instead")
            elif prop in SAFETY_PROPERTIES[name]:
                allowed = SAFETY_PROPERTIES[name][prop]
                if allowed is None or str(value).lower() not in allowed:
                    problems.append(f"{name}: {prop}={value} refused: the product needs "
                                    + (f"{prop}={allowed[0]}" if allowed else "to own it")
                                    + " for at-least-once delivery without duplicates")
    policy = str(settings.changelog_topic_config.get("cleanup.policy", "compact"))
    if policy != "compact":
        problems.append(f"changelog_topic_config: cleanup.policy={policy} refused: window state needs compact")
    return problems


def _flatten_tables(data: Mapping[str, Any]) -> dict[str, Any]:
    """``[kafka.producer]`` (nested tables) -> ``kafka_producer``, for the mapping settings."""
    out = dict(data)
    for name, value in data.items():
        if isinstance(value, dict) and name not in MAPPING_FIELDS and all(
                f"{name}_{sub}" in MAPPING_FIELDS for sub in value):
            del out[name]
            out.update({f"{name}_{sub}": table for sub, table in value.items()})
    return out


def _suggestion(name: str, known: Any, env: bool = True) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.75)
    if not close:
        return ""
    return f" (did you mean {ENV_PREFIX + close[0].upper() if env else close[0]}?)"


def _read_secret(name: str, path: str, source: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise SettingsError(f"setting {name}: cannot read the file {path} named by {source}: "
                            f"{exc.strerror or exc}") from None


def _check_names(cls: type, data: Mapping[str, Any], source: str) -> dict[str, Any]:
    known = {f.name for f in fields(cls)} | {name + "_file" for name in SECRET_FIELDS}
    unknown = sorted(set(data) - known)
    if unknown:
        hint = _suggestion(unknown[0], known, env=False)
        raise SettingsError(f"unknown setting(s) in {source}: {', '.join(unknown)}{hint}")
    return dict(data)


def _coerce(cls: type, name: str, value: Any, source: str = "overrides") -> Any:
    """``value`` as the type of setting ``name``, strictly: a boolean is true/false/1/0/yes/no/on/off,
    a whole number is not read from 1.5 or from a boolean, a number is finite."""
    default = next(f.default for f in fields(cls) if f.name == name)
    if value is None:
        return None
    try:
        if name == "threshold":
            if isinstance(value, str) and value.strip() in ("", "none", "None"):
                return None
            return _number(value, float)
        if isinstance(default, bool):
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
                return value.strip().lower() in _TRUE
            raise ValueError("not a boolean (true or false)")
        if isinstance(default, int):
            return _number(value, int)
        if isinstance(default, float):
            return _number(value, float)
        if not isinstance(value, str):
            raise ValueError(f"not a string (a TOML {type(value).__name__}); quote it")
        return value
    except (TypeError, ValueError, OverflowError) as exc:
        raise SettingsError(f"setting {name}: cannot read {value!r} from {source}: {exc}") from None


def _number(value: Any, kind: type) -> Any:
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise ValueError("empty")
        try:
            value = int(text) if kind is int else float(text)
        except ValueError:
            raise ValueError(f"not {'a whole number' if kind is int else 'a number'}") from None
    if not isinstance(value, (int, float)):
        raise ValueError(f"not a number (a TOML {type(value).__name__})")
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError("not a whole number")
        return int(value)
    if math.isnan(value):
        raise ValueError("not a number (NaN)")
    return float(value)


def _property(name: str, prop: str, value: Any, source: str) -> Any:
    """A client property or topic config as given (strings, numbers, booleans), passed on verbatim."""
    if not prop or prop != prop.strip() or " " in prop:
        raise SettingsError(f"setting {name}: bad property name {prop!r} from {source}")
    if isinstance(value, bool) or isinstance(value, (int, float, str)):
        return value
    raise SettingsError(f"setting {name}: property {prop} from {source} must be a string, number or boolean, "
                        f"not a {type(value).__name__}")


def settings_table() -> str:
    """Markdown table of every setting, for the README."""
    rows = ["| setting | environment variable | default | meaning |", "| --- | --- | --- | --- |"]
    for f in fields(Settings):
        if f.metadata.get("mapping"):
            rows.append(f"| `{f.name}` | `{ENV_PREFIX}{f.name.upper()}{MAPPING_SEPARATOR}<PROPERTY>` | empty | "
                        f"{f.metadata.get('doc', '')} |")
            continue
        default = "unset" if f.default is None else ("empty" if f.default == "" else f"`{f.default}`")
        rows.append(f"| `{f.name}` | `{ENV_PREFIX}{f.name.upper()}` | {default} | {f.metadata.get('doc', '')} |")
    return "\n".join(rows)
